"""ADMM-TT compression of CIFAR ResNet-20/32/56 on CIFAR-10/100 (Yin et al., CVPR 2021, CIFAR tables).

The CIFAR ResNets (3x3 stem, 3 stages of BasicBlocks with 16/32/64 channels) are defined in
recipes/_common.py and registered with timm as resnet{20,32,44,56,110}_cifar, so the saved
checkpoint reloads with tn_hf.from_pretrained after `import _common` (or this recipe).

Defaults follow the paper's CIFAR setting: TT format, parameter compression 2.3x for ResNet-20,
2.4x for ResNet-32 (and ResNet-56, our choice) of the compressed layers, ADMM penalty
rho=1e-3 with Z/U updated every epoch, SGD momentum 0.9, weight decay 5e-4, cosine learning
rate. Epochs (ours): dense warm start 200 (skip with --checkpoint), ADMM 200, fine-tune 100.

Data: --dataset cifar10 | cifar100 with --data-dir pointing at an existing torchvision CIFAR
folder (containing cifar-10-batches-py / cifar-100-python; nothing is downloaded), or
--dataset mnist-5k (offline, real MNIST digits as 3-channel 32x32 images) for smoke runs.

Examples (two CPU processes with gloo on accelerate 1.15:
  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 recipes/X.py ...;
  `launch --cpu --num_processes 2` starts a single process there):
  accelerate launch recipes/resnet_cifar.py --depth 20 --dataset cifar100 --data-dir /data/cifar
  python recipes/resnet_cifar.py --dataset mnist-5k --depth 20 --max-steps 3 --output-dir /tmp/r20
"""
from __future__ import annotations

import _common as C  # noqa: I001  (recipes/ is on sys.path when the script runs)

RATIO = {20: 2.3, 32: 2.4, 56: 2.4}
DEFAULTS = dict(dataset="cifar10", image_size=32, batch_size=128, compression_ratio=None, budget="params",
                rho=1e-3, update_every="epoch", dense_epochs=200, admm_epochs=200, finetune_epochs=100,
                lr=0.1, finetune_lr=0.01, weight_decay=5e-4, output_dir="outputs/resnet_cifar",
                dataset_help="'cifar10' | 'cifar100' (with --data-dir, an existing torchvision CIFAR "
                             "folder) or 'mnist-5k' (offline, real MNIST digits)")


def cifar(args):
    from torchvision import datasets, transforms as T
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}.get(args.dataset)
    if cls is None:
        raise SystemExit(f"--dataset {args.dataset!r}: valid choices are cifar10, cifar100, mnist-5k")
    norm = T.Normalize(C.CIFAR_MEAN, C.CIFAR_STD)
    tr = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    te = T.Compose([T.ToTensor(), norm])
    try:
        train = cls(args.data_dir, train=True, transform=tr, download=False)
        test = cls(args.data_dir, train=False, transform=te, download=False)
    except RuntimeError as e:
        raise SystemExit(f"--data-dir {args.data_dir}: no {args.dataset} found there ({e}); "
                         "download it with torchvision first or use --dataset mnist-5k") from e
    return train, test, len(train.classes)


def main(argv=None):
    p = C.make_parser(__doc__, defaults=DEFAULTS)
    p.add_argument("--depth", type=int, default=20, choices=(20, 32, 44, 56, 110), help="ResNet depth")
    args = p.parse_args(argv)
    if args.compression_ratio is None:
        args.compression_ratio = RATIO.get(args.depth, 2.4)
    if args.dataset != "mnist-5k" and args.data_dir is None:
        raise SystemExit(f"--dataset {args.dataset} needs --data-dir (an existing CIFAR folder), "
                         "or use --dataset mnist-5k")
    import timm

    train, test, num_classes = (C.mnist_images(args.image_size) if args.dataset == "mnist-5k" else cifar(args))
    name = f"resnet{args.depth}_cifar"
    model = timm.create_model(name, num_classes=num_classes)
    return C.run_pipeline(args, model, train, test, C.tn_config(args), recipe="resnet_cifar", base_model=name)


if __name__ == "__main__":
    main()
