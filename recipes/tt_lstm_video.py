"""TT-LSTM video recognition (Yin et al., CVPR 2021, UCF11 experiment): frames -> LSTM whose
weight matrices are in TT (or TR) form -> classifier.

Phases: data -> model -> dense warm start -> ADMM-regularised training -> decompose
(TNConfig(layer_types=["lstm"]): nn.LSTM -> TT-LSTM) -> fine-tune -> evaluate -> save: the same
Accelerate run as the ResNet recipes (recipes/_lib/loop.py).

Data:
  --dataset mnist-5k      (default, offline) clips of the real MNIST-5k digits moving across
                          the frame, label = digit; raw frames (--image-size^2 pixels) feed the
                          LSTM as in the paper's raw-frame TT-LSTM.
  --dataset basic-motions (offline, needs `pip install sktime`) real accelerometer/gyroscope
                          sequences (4 activities, 100 steps x 6 channels), embedded per step by
                          a Linear layer (--embed-dim).
  --data-dir DIR          UCF11-style: DIR/<class>/<video file or folder of frame images>;
                          video files need PyAV (`pip install av`); 80/20 split by a fixed seed.

Defaults (ours for this small setting; the paper's UCF11 runs use much larger raw frames):
TT format, 8x parameter compression of the LSTM weights, rho=1e-3, dense 10 epochs, ADMM 20
epochs, fine-tune 10 epochs, SGD as in the other recipes.

Examples (two CPU processes with gloo on accelerate 1.15:
  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 recipes/X.py ...;
  `launch --cpu --num_processes 2` starts a single process there):
  python recipes/tt_lstm_video.py --dataset mnist-5k --max-steps 3 --output-dir /tmp/ttlstm
  accelerate launch recipes/tt_lstm_video.py --dataset basic-motions
"""
from __future__ import annotations

from _lib import (  # noqa: I001  (recipes/ is on sys.path when the script runs)
    data,
    flags,
    loop,
    models,  # noqa: F401  (registers lstm_video_classifier with timm)
)

DEFAULTS = dict(dataset="mnist-5k", image_size=28, mnist_image_size=28, batch_size=32, compression_ratio=8.0,
                budget="params", rho=1e-3, update_every="epoch", dense_epochs=10, admm_epochs=20,
                finetune_epochs=10, lr=0.05, finetune_lr=0.01, weight_decay=1e-4, output_dir="outputs/tt_lstm_video",
                dataset_help="'mnist-5k' (offline, moving MNIST digits), 'basic-motions' (sktime, offline) "
                             "or use --data-dir")


def parse_args(argv=None):
    p = flags.make_parser(__doc__, defaults=DEFAULTS)
    p.add_argument("--frames", type=int, default=8, help="frames per clip")
    p.add_argument("--hidden-size", type=int, default=64, help="LSTM hidden size")
    p.add_argument("--embed-dim", type=int, default=None,
                   help="Linear frame embedding before the LSTM (default: 64 for inputs narrower than 64, else none)")
    return flags.parse(p, argv)


def main(argv=None):
    args = parse_args(argv)
    import timm

    train, test, num_classes = data.sequence_data(args)
    in_dim = train[0][0].shape[-1]
    embed_dim = args.embed_dim if args.embed_dim is not None else (64 if in_dim < 64 else 0)
    model = timm.create_model("lstm_video_classifier", num_classes=num_classes, in_dim=in_dim,
                              hidden_size=args.hidden_size, embed_dim=embed_dim)
    run = loop.Run(args, train, test, recipe="tt_lstm_video", model_name="lstm_video_classifier")

    run.warm_start(model)
    sched = run.admm(model, flags.tn_config(args, layer_types=["lstm"]))
    report = run.decompose(model, sched)
    run.finetune(model)
    run.evaluate(model)
    return run.save(model, report)


if __name__ == "__main__":
    main()
