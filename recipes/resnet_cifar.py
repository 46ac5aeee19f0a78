"""ADMM-TT compression of CIFAR ResNet-20/32/56 on CIFAR-10/100 (Yin et al., CVPR 2021, CIFAR tables).

The CIFAR ResNets (3x3 stem, 3 stages of BasicBlocks with 16/32/64 channels) are defined in
recipes/_lib/models.py and registered with timm as resnet{20,32,44,56,110}_cifar, so the saved
checkpoint reloads with tn_hf.from_pretrained once that module (or this recipe) is imported.

Phases: data -> model -> dense warm start (or --checkpoint) -> ADMM-regularised training ->
decompose -> fine-tune -> evaluate -> save (-> optional --push-to-hub).

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

from _lib import (  # noqa: I001  (recipes/ is on sys.path when the script runs)
    data,
    flags,
    loop,
    models,  # noqa: F401  (registers resnet{20,32,44,56,110}_cifar with timm)
)

RATIO = {20: 2.3, 32: 2.4, 56: 2.4}
DEFAULTS = dict(dataset="cifar10", image_size=32, batch_size=128, compression_ratio=None, budget="params",
                rho=1e-3, update_every="epoch", dense_epochs=200, admm_epochs=200, finetune_epochs=100,
                lr=0.1, finetune_lr=0.01, weight_decay=5e-4, output_dir="outputs/resnet_cifar",
                dataset_help="'cifar10' | 'cifar100' (with --data-dir, an existing torchvision CIFAR "
                             "folder) or 'mnist-5k' (offline, real MNIST digits)")


def parse_args(argv=None):
    p = flags.make_parser(__doc__, defaults=DEFAULTS)
    p.add_argument("--depth", type=int, default=20, choices=(20, 32, 44, 56, 110), help="ResNet depth")
    args = flags.parse(p, argv)
    if args.compression_ratio is None:
        args.compression_ratio = RATIO.get(args.depth, 2.4)
    return args


def main(argv=None):
    args = parse_args(argv)
    import timm

    train, test, num_classes = data.cifar(args)
    name = f"resnet{args.depth}_cifar"
    model = timm.create_model(name, num_classes=num_classes)
    run = loop.Run(args, train, test, recipe="resnet_cifar", model_name=name)

    run.warm_start(model)
    sched = run.admm(model, flags.tn_config(args))
    report = run.decompose(model, sched)
    run.finetune(model)
    run.evaluate(model)
    return run.save(model, report)


if __name__ == "__main__":
    main()
