"""TT-LSTM video recognition (Yin et al., CVPR 2021, UCF11 experiment): frames -> per-frame
features -> LSTM whose input-to-hidden matrix is in TT (or TR) form -> classifier.

The dense LSTM is trained with the ADMM penalty, decomposed with
tn_hf.compress(model, TNConfig(layer_types=["lstm"], ...)) (nn.LSTM -> TT-LSTM), fine-tuned,
evaluated and saved: the same loop as the ResNet recipes (recipes/_common.py).

Data:
  --dataset moving-mnist  (default, offline) clips of real MNIST digits translating across
                          the frame, label = digit; raw frames (--image-size^2 pixels) feed the LSTM
                          as in the paper's raw-frame TT-LSTM.
  --dataset basic-motions (offline, needs `pip install sktime`) real accelerometer/gyroscope
                          sequences (4 activities, 100 steps x 6 channels), embedded per step by
                          a Linear layer.
  --data-dir DIR          UCF11-style: DIR/<class>/<video file or folder of frame images>;
                          video files need PyAV (`pip install av`); 80/20 split by a fixed seed.

Defaults (ours for this small setting; the paper's UCF11 runs use much larger raw frames):
TT format, 8x parameter compression of the LSTM input-to-hidden weights, rho=1e-3, ADMM 20
epochs, fine-tune 10 epochs, Adam-free SGD as in the other recipes.

Examples (two CPU processes with gloo on accelerate 1.15:
  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 recipes/X.py ...;
  `launch --cpu --num_processes 2` starts a single process there):
  python recipes/tt_lstm_video.py --max-steps 3 --output-dir /tmp/ttlstm
  accelerate launch recipes/tt_lstm_video.py --dataset basic-motions
"""
from __future__ import annotations

import _common as C  # noqa: I001  (recipes/ is on sys.path when the script runs)

import torch
import torch.nn as nn

DEFAULTS = dict(dataset="moving-mnist", image_size=28, batch_size=32, compression_ratio=8.0, budget="params",
                rho=1e-3, update_every="epoch", dense_epochs=10, admm_epochs=20, finetune_epochs=10,
                lr=0.05, finetune_lr=0.01, weight_decay=1e-4, output_dir="outputs/tt_lstm_video",
                dataset_help="'moving-mnist' (offline), 'basic-motions' (sktime, offline) or use --data-dir")


class LSTMVideoClassifier(nn.Module):
    """(B, T, D) frame features -> [Linear embed] -> nn.LSTM -> last hidden state -> Linear."""

    def __init__(self, in_dim=784, hidden_size=64, num_classes=10, embed_dim=0, **_):
        super().__init__()
        self.embed = nn.Linear(in_dim, embed_dim) if embed_dim else nn.Identity()
        self.lstm = nn.LSTM(embed_dim or in_dim, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)
        self.num_classes, self.num_features = num_classes, hidden_size  # timm model attributes

    def forward(self, x):
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])


C.register_timm_model("lstm_video_classifier", LSTMVideoClassifier, input_size=(1, 8, 784), classifier="head")


def moving_mnist(args):
    (xtr, ytr), (xte, yte) = C.moving_mnist_clips(args.frames, args.image_size)
    norm = lambda x: ((x - C.MNIST_MEAN) / C.MNIST_STD).flatten(2)  # noqa: E731
    ds = torch.utils.data.TensorDataset
    return ds(norm(xtr), ytr), ds(norm(xte), yte), 10, dict(in_dim=args.image_size ** 2)


def basic_motions(args):
    try:
        from sktime.datasets import load_basic_motions
    except ImportError as e:
        raise SystemExit("--dataset basic-motions needs sktime: pip install sktime "
                         "(or use --dataset moving-mnist)") from e
    xs, ys = [], []
    for split in ("train", "test"):
        x, y = load_basic_motions(split=split, return_type="numpy3D")  # (N, 6, 100)
        xs.append(torch.as_tensor(x, dtype=torch.float32).transpose(1, 2))
        ys.append(y)
    classes = sorted(set(ys[0]))
    mean, std = xs[0].mean((0, 1)), xs[0].std((0, 1))
    ds = [torch.utils.data.TensorDataset((x - mean) / std, torch.tensor([classes.index(v) for v in y]))
          for x, y in zip(xs, ys)]
    return ds[0], ds[1], len(classes), dict(in_dim=xs[0].shape[2], embed_dim=64)


def video_folder(args):
    """DIR/<class>/<clip>: a video file (PyAV) or a folder of frame images; grey frames at --image-size."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(args.data_dir)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"--data-dir {root}: expected one sub-folder per class")

    def frames_of(path):
        if path.is_dir():
            return [Image.open(f) for f in sorted(path.iterdir()) if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
        try:
            import av
        except ImportError as e:
            raise SystemExit(f"{path}: reading video files needs PyAV (pip install av)") from e
        with av.open(str(path)) as c:
            return [f.to_image() for f in c.decode(video=0)]

    clips, labels = [], []
    for ci, cname in enumerate(classes):
        for clip in sorted((root / cname).iterdir()):
            frames = frames_of(clip)
            if not frames:
                continue
            idx = np.linspace(0, len(frames) - 1, args.frames).round().astype(int)
            arr = np.stack([np.asarray(frames[i].convert("L").resize((args.image_size,) * 2), np.float32) / 255
                            for i in idx])
            clips.append(torch.from_numpy(arr).flatten(1))
            labels.append(ci)
    x, y = torch.stack(clips), torch.tensor(labels)
    x = (x - x.mean()) / x.std()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_tr = int(0.8 * len(y))
    ds = torch.utils.data.TensorDataset
    return (ds(x[perm[:n_tr]], y[perm[:n_tr]]), ds(x[perm[n_tr:]], y[perm[n_tr:]]), len(classes),
            dict(in_dim=x.shape[2]))


def main(argv=None):
    p = C.make_parser(__doc__, defaults=DEFAULTS)
    p.add_argument("--frames", type=int, default=8, help="frames per clip")
    p.add_argument("--hidden-size", type=int, default=64, help="LSTM hidden size")
    args = p.parse_args(argv)
    if args.data_dir:
        train, test, num_classes, dims = video_folder(args)
    elif args.dataset == "moving-mnist":
        train, test, num_classes, dims = moving_mnist(args)
    elif args.dataset == "basic-motions":
        train, test, num_classes, dims = basic_motions(args)
    else:
        raise SystemExit(f"--dataset {args.dataset!r}: valid choices are moving-mnist, basic-motions "
                         "(or --data-dir)")
    import timm

    model = timm.create_model("lstm_video_classifier", num_classes=num_classes, hidden_size=args.hidden_size,
                              **dims)
    cfg = C.tn_config(args, layer_types=["lstm"])
    return C.run_pipeline(args, model, train, test, cfg, recipe="tt_lstm_video", base_model="lstm_video_classifier")


if __name__ == "__main__":
    main()
