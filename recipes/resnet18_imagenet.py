"""ADMM-TT compression of timm ResNet-18 on ImageNet (Yin et al., CVPR 2021, Table: ResNet-18 ImageNet).

Phases: data -> model -> dense warm start (or --pretrained / --checkpoint) -> ADMM-regularised
training (tn_hf.ADMMScheduler in an Accelerate loop) -> decompose (TT-SVD at the ADMM ranks) ->
fine-tune -> evaluate -> save (tn_hf.save_pretrained: config.json + model.safetensors + model
card) -> optional --push-to-hub.

Defaults follow the paper's ResNet-18 / ImageNet setting: TT format, about 2.47x FLOPs reduction
of the compressed layers (--compression-ratio 2.47 --budget flops), ADMM penalty rho=1e-3,
SGD with momentum 0.9, cosine learning rate. The epoch counts (dense 90, ADMM 30, fine-tune 30)
are our choice for a full run on ImageNet.

Data: --data-dir DIR (ImageFolder with train/ and val/), --dataset NAME (a Hugging Face
`datasets` name such as "imagenet-1k"; needs `pip install datasets`), or --dataset mnist-5k
(offline, real MNIST digits as 3-channel 32x32 images) for smoke runs.

Examples (two CPU processes with gloo on accelerate 1.15:
  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 recipes/X.py ...;
  `launch --cpu --num_processes 2` starts a single process there):
  accelerate launch recipes/resnet18_imagenet.py --data-dir /data/imagenet --pretrained
  python recipes/resnet18_imagenet.py --dataset mnist-5k --max-steps 3 --output-dir /tmp/r18
"""
from __future__ import annotations

from _lib import data, flags, loop  # noqa: I001  (recipes/ is on sys.path when the script runs)

DEFAULTS = dict(dataset="imagenet-1k", image_size=224, batch_size=128, compression_ratio=2.47,
                budget="flops", rho=1e-3, update_every="epoch", dense_epochs=90, admm_epochs=30,
                finetune_epochs=30, lr=0.01, finetune_lr=0.001, weight_decay=1e-4,
                output_dir="outputs/resnet18_imagenet",
                dataset_help="a Hugging Face datasets name (e.g. imagenet-1k), 'mnist-5k' (offline, real "
                             "MNIST digits as 3-channel images), or use --data-dir for an ImageFolder")


def parse_args(argv=None):
    p = flags.make_parser(__doc__, defaults=DEFAULTS)
    p.add_argument("--model", default="resnet18", help="timm model name")
    p.add_argument("--pretrained", action="store_true",
                   help="start from timm's pretrained ImageNet weights (downloads; skips the dense warm start)")
    return flags.parse(p, argv)


def main(argv=None):
    args = parse_args(argv)
    import timm

    train, test, num_classes = data.image_data(args)
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes)
    base_model = model.pretrained_cfg.get("hf_hub_id") if args.pretrained else None
    run = loop.Run(args, train, test, recipe="resnet18_imagenet", model_name=args.model, base_model=base_model)

    run.warm_start(model, pretrained=args.pretrained)
    sched = run.admm(model, flags.tn_config(args))
    report = run.decompose(model, sched)
    run.finetune(model)
    run.evaluate(model)
    return run.save(model, report)


if __name__ == "__main__":
    main()
