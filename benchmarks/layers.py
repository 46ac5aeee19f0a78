"""Latency of TT/TR layers vs dense and tensorly-torch (tltorch) at the same parameter count.

    python benchmarks/layers.py [--quick] [--threads N] [--out benchmarks/results/layers.md]

For each case and compression (4x, 8x): eval forward (no_grad) and one training step
(forward + backward) at batch 1 and 32, median over repeats, all in one process. The TN
layer is what ``tn_hf.compress`` makes of the dense layer at that ratio (default layout, speed
planner on, so it may stay dense); the "n_modes=3" case is the balanced TT-matrix layout at the
largest uniform rank within dense/ratio, for comparison. tltorch gets rank=1/ratio (its
fraction-of-parameters rank). For TT convs the per-stage FLOPs and the
achieved GFLOP/s are listed, to show where time goes when a target is missed.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tn_hf  # noqa: E402
from tn_hf.decompositions import ranks_for_ratio  # noqa: E402
from tn_hf.layers import TTConv2d, TTLinear, tn_targets  # noqa: E402
from tn_hf.layers.base import n_params  # noqa: E402


def _conv_case(c, hw, tltorch=True, **cfg):
    """A 3x3 conv c -> c at hw x hw (ResNet-18 shapes), planned by tn_hf.compress with ``cfg``."""
    return (lambda: nn.Conv2d(c, c, 3, padding=1, bias=False),
            lambda r, d: _planned(d, r, (c, hw, hw), **cfg),
            (lambda r: _tl_conv(c, c, r)) if tltorch else None,
            lambda b: torch.randn(b, c, hw, hw))


CASES = {
    # name: (dense factory, TN factory(ratio, dense), tltorch factory(ratio) or None, input(batch))
    "conv 64->64 3x3 @56x56 (ResNet-18 layer1)": _conv_case(64, 56),
    "conv 64->64 3x3 @56x56, kernel_mode='own' (1x1 -> 3x3 -> 1x1)": _conv_case(64, 56, tltorch=False,
                                                                             kernel_mode="own"),
    "conv 256->256 3x3 @14x14 (ResNet-18 layer3)": _conv_case(256, 14),
    "conv 512->512 3x3 @7x7 (ResNet-18 layer4)": _conv_case(512, 7),
    "linear 768->3072 x128 tokens": (
        lambda: nn.Linear(768, 3072),
        lambda r, d: _planned(d, r, (128, 768)),
        lambda r: _tl_lin((8, 8, 12), (12, 16, 16), r),
        lambda b: torch.randn(b, 128, 768)),
    "linear 3072->768 x128 tokens": (
        lambda: nn.Linear(3072, 768),
        lambda r, d: _planned(d, r, (128, 3072)),
        lambda r: _tl_lin((12, 16, 16), (8, 8, 12), r),
        lambda b: torch.randn(b, 128, 3072)),
    "linear 768->3072 x128 tokens, balanced 3-mode TT-matrix (n_modes=3)": (
        lambda: nn.Linear(768, 3072),
        lambda r, d: (_tn(TTLinear, r, 768, 3072, n_modes=3), None),
        None,
        lambda b: torch.randn(b, 128, 768)),
    "LSTM 57600->256, 4 steps": (
        lambda: nn.LSTM(57600, 256),
        lambda r, d: _planned(d, r, (4, 57600), seq_first=True),
        None,
        lambda b: torch.randn(4, b, 57600)),
}


class _One(nn.Module):
    """One layer with a declared input size (what the planner probes); seq_first: (B, T, ...) -> (T, B, ...)."""

    def __init__(self, m, size, seq_first=False):
        super().__init__()
        self.m, self.seq_first = m, seq_first
        self.pretrained_cfg = {"input_size": size}

    def forward(self, x):
        return self.m(x.transpose(0, 1) if self.seq_first else x)


def _planned(dense, ratio, size, seq_first=False, **cfg):
    """What tn_hf.compress makes of this layer at this ratio (speed planner on; uniform allocation;
    ``cfg``: more TNConfig fields). Returns (layer, reason it was kept dense or None)."""
    w = _One(copy.deepcopy(dense), size, seq_first)
    rep = tn_hf.compress(w, tn_hf.TNConfig(compression_ratio=ratio, target_modules=["m"], allocation="uniform",
                                           plan_for_speed=True, **cfg),
                         progress=False)
    return w.m, rep.rows[0].get("kept_dense")


def _tn(cls, ratio, *args, **kw):
    probe = cls(*args, ranks=1, **kw)
    modes = probe._modes(probe._spec)
    ranks = ranks_for_ratio(modes, ratio, cls.format)
    return cls(*args, ranks=ranks, **kw)


def _tl_conv(i, o, ratio):
    import tltorch
    return tltorch.FactorizedConv(i, o, 3, order=2, padding=1, factorization="tt", rank=1 / ratio,
                                  implementation="factorized")


def _tl_lin(fi, fo, ratio):
    import tltorch
    # tltorch's "factorized" TT-matrix path is ~50x slower than dense here; use its faster "reconstructed"
    return tltorch.FactorizedLinear(fi, fo, factorization="blocktt", rank=1 / ratio, implementation="reconstructed")


NOTES = """
## Notes

- TT conv: modes (out factors, kernel, in factors), run as 1x1 conv I -> r_b, kxk conv
  r_b -> r_a, 1x1 conv r_a -> O with the merged factors cached in eval; or, with
  kernel_mode "in" (chosen by the planner where measured faster), modes (O, K*I): kxk conv
  I -> r, 1x1 conv r -> O, one pass less over the activations. "1x1 stages as GEMMs"
  (pointwise="gemm", chosen by the planner where measured faster): the 1x1 stages run as
  batched matrix products over the NCHW maps instead of the conv kernel. Ranks: the planner's
  choice within dense/ratio params (aligned to multiples of 8/16 where that was measured
  faster). Targets (batch 32 eval, 256->256 3x3 @14x14): 4x <= 0.30x dense, 8x <= 0.18x.
- TT linear: the default layout is the two-core low-rank form (in factors (1, I), out factors
  (O, 1)), run as two GEMMs: 2 r (I + O) FLOPs per token, i.e. FLOPs = 2 x params, the least
  of any TT-matrix layout of that size. The balanced 3-mode TT-matrix (n_modes=3, row "balanced")
  costs r^2-times-modes FLOPs per token and falls back to rebuilding the weight, ~1x dense or
  slower. Target: 768->3072 at 8x <= 0.4x dense at the default layout.
- LSTM: TT over the input-to-hidden matrix (1024 x 57600, default low-rank layout, the
  projection of all steps in one call); hidden-to-hidden dense.
- tltorch: TT conv "factorized" implementation (its 4-core TT over (O, I, kh, kw), run as
  1x1 -> kh x 1 -> 1 x kw -> 1x1); TT-matrix linear ("blocktt") with its "reconstructed"
  implementation (its "factorized" one is ~10-50x slower than dense here). tltorch has no LSTM.
- A row "kept dense" means the speed planner measured the TN form as not faster and left the
  dense layer in place (the timing is then the dense layer's).
- Batch-1 timings of millisecond-scale layers on a 2-core machine shared with other jobs are
  easily inflated by scheduling delays (each parallel region waits for a time slice); treat
  batch-1 rows as indicative.
"""


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timeit(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    _sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(module, make_x, batch, repeats):
    x = make_x(batch).to(DEVICE)
    module.to(DEVICE).eval()

    def fwd():
        with torch.no_grad():
            module(x)

    def train():
        module.zero_grad(set_to_none=True)
        y = module(x)
        (y[0] if isinstance(y, tuple) else y).float().square().mean().backward()

    module.train()
    t_train = timeit(train, max(2, repeats // 2))
    module.eval()
    return timeit(fwd, repeats), t_train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats, batch 32 only for the LSTM")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "layers.md"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = 5 if args.quick else 20
    rows, stage_rows, lin_rows = [], [], []
    for name, (mk_dense, mk_tn, mk_tl, mk_x) in CASES.items():
        if args.only not in name:
            continue
        dense = mk_dense().to(DEVICE)
        t_dense = {b: measure(dense, mk_x, b, repeats) for b in (1, 32)}
        for ratio in (4, 8):
            tn, kept = mk_tn(ratio, dense)
            tl = None
            if mk_tl is not None:
                try:
                    tl = mk_tl(ratio)
                except Exception as e:  # noqa: BLE001 - tltorch is an optional baseline: skip it on any failure
                    print(f"tltorch failed on {name}: {e}", file=sys.stderr)
            for batch in (1, 32):
                t_tn = measure(tn, mk_x, batch, repeats)
                t_tl = measure(tl, mk_x, batch, repeats) if tl is not None else None
                form = f"kept dense: {kept}" if kept else "; ".join(
                    f"{c.in_factors if hasattr(c, 'in_features') else ''} ranks {c.ranks}".strip()
                    + (" (kernel_mode 'in': 3x3 -> 1x1)" if getattr(c, "kernel_mode", "own") == "in" else "")
                    + (" (1x1 stages as GEMMs)" if getattr(c, "pointwise", "conv") == "gemm" else "")
                    for _, c in tn_targets(tn))
                rows.append(dict(case=name, batch=batch, ratio=ratio, dense=t_dense[batch], tn=t_tn, tl=t_tl,
                                 form=form, p_dense=n_params(dense), p_tn=n_params(tn),
                                 p_tl=n_params(tl) if tl else None))
                print(f"{name} b={batch} {ratio}x: dense {t_dense[batch][0]*1e3:.2f}ms TT {t_tn[0]*1e3:.2f}ms "
                      f"({t_tn[0]/t_dense[batch][0]:.2f}x) tltorch {t_tl[0]*1e3 if t_tl else float('nan'):.2f}ms "
                      f"[{form}]", flush=True)
                if batch == 32 and isinstance(tn, TTLinear):
                    lin_rows.append((name, ratio, tn.in_factors, tn.out_factors, tn.ranks,
                                     tn._contract_flops(32 * 128), tn._dense_path_flops(32 * 128),
                                     tn.dense_flops((32 * 128, tn.in_features)), tn.use_dense_path(32 * 128),
                                     t_tn[0], t_dense[batch][0]))
                if batch == 32 and isinstance(tn, TTConv2d):
                    x = mk_x(batch)
                    tn_f, dense_f = tn._stage_flops(tuple(x.shape))
                    stage_rows.append((name, ratio, tn.ranks, tn_f, dense_f, t_tn[0], t_dense[batch][0],
                                       tn.use_dense_path(tuple(x.shape))))
    write(args.out, rows, stage_rows, lin_rows, repeats)


def write(path, rows, stage_rows, lin_rows, repeats):
    """Render rows (merged with the cases of earlier runs kept in the JSON beside ``path``)."""
    js = Path(path).with_suffix(".json")
    if js.exists():  # keep the cases not rerun now (runs can be split with --only)
        old = json.loads(js.read_text())
        done = {r["case"] for r in rows}
        rows = [r for r in old["rows"] if r["case"] not in done] + rows
        stage_rows = [tuple(r) for r in old.get("stage_rows", []) if r[0] not in done] + stage_rows
        lin_rows = [tuple(r) for r in old.get("lin_rows", []) if r[0] not in done] + lin_rows
    order = list(CASES)
    rows.sort(key=lambda r: (order.index(r["case"]) if r["case"] in order else 99, r["batch"], r["ratio"]))

    def ms(t):
        return "n/a" if t is None else f"{t * 1e3:.2f}"

    lines = [
        f"# TN layer latency ({DEVICE.type.upper()})", "",
        f"torch {torch.__version__}, device {DEVICE}, {torch.get_num_threads()} threads, median of {repeats} runs "
        "(train: forward+backward, median of half as many). Shared machine: treat as indicative.", "",
        "| case | batch | ratio | TT form (in factors, ranks) | params dense / TT / tltorch | eval ms dense | "
        "eval ms TT (x dense) | eval ms tltorch | train ms dense | train ms TT (x dense) | train ms tltorch |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['ratio']}x | {r['form']} | "
            f"{r['p_dense']} / {r['p_tn']} / {r['p_tl'] or 'n/a'} | "
            f"{ms(r['dense'][0])} | {ms(r['tn'][0])} ({r['tn'][0] / r['dense'][0]:.2f}) | "
            f"{ms(r['tl'][0] if r['tl'] else None)} | {ms(r['dense'][1])} | {ms(r['tn'][1])} "
            f"({r['tn'][1] / r['dense'][1]:.2f}) | {ms(r['tl'][1] if r['tl'] else None)} |")
    lines += ["", "## TT conv, batch 32: FLOPs per stage", "",
              "| case | ratio | ranks | merge / in 1x1 / kernel conv / out 1x1 (MFLOP) | TT total vs dense FLOPs | "
              "path | achieved GFLOP/s TT vs dense |", "|---|---|---|---|---|---|---|"]
    for name, ratio, ranks, tn_f, dense_f, t_tn, t_dense, dense_path in stage_rows:
        tot = sum(tn_f.values())
        lines.append(f"| {name} | {ratio}x | {ranks} | " + " / ".join(f"{v / 1e6:.0f}" for v in tn_f.values()) +
                     f" | {tot / dense_f['conv']:.2f} | {'dense' if dense_path else 'factorized'} | "
                     f"{tot / t_tn / 1e9:.0f} vs {dense_f['conv'] / t_dense / 1e9:.0f} |")
    lines += ["", "## TT linear, batch 32 (4096 tokens): FLOPs of both forward paths", "",
              "| case | ratio | in / out factors | ranks | core contraction GFLOP | rebuild+GEMM GFLOP | dense GFLOP | "
              "path | achieved GFLOP/s TT vs dense |", "|---|---|---|---|---|---|---|---|---|"]
    for name, ratio, fi, fo, ranks, f_c, f_d, f_dense, dense_path, t_tn, t_dense in lin_rows:
        f = f_d if dense_path else f_c
        lines.append(f"| {name} | {ratio}x | {fi} / {fo} | {ranks} | {f_c / 1e9:.2f} | {f_d / 1e9:.2f} | "
                     f"{f_dense / 1e9:.2f} | {'rebuild' if dense_path else 'contract'} | "
                     f"{f / t_tn / 1e9:.0f} vs {f_dense / t_dense / 1e9:.0f} |")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n" + NOTES)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
           "repeats": repeats}
    js.write_text(json.dumps({"env": env, "rows": rows, "stage_rows": stage_rows, "lin_rows": lin_rows},
                             indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
