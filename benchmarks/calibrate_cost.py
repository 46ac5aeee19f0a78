"""Fit the reference cost model's constants (``tn_hf.cost.COST_CONSTANTS``) to measured layer times.

    python benchmarks/calibrate_cost.py [--models resnet18,vit_small_patch16_224,convnext_tiny,small_cnn]

1. For each model (random init, ratio 3; the demo CNN at 3 and 8) ``tn_hf.tune`` runs the speed planner with
   measured times, which records every candidate form it compares (TN spec, dense layer, input shape) in a
   fresh timing cache.
2. Every (TN form, dense layer) pair of that cache is timed again on one CPU thread by CPU time
   (``time.process_time``, fastest of repeats): CPU time is what the machine's other work disturbs least.
3. Each form is traced on the meta device (``tn_hf.cost.trace``) and the constants are fitted by
   non-negative least squares on relative error (features per kernel kind: count, FLOPs, FLOPs / smallest
   GEMM dimension, bytes), dropping outliers (|log error| > 1, then > 0.7) and refitting.

Prints the constants to paste into ``tn_hf/cost.py`` and how well they order TN against dense; writes
benchmarks/results/calibrate_cost.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tn_hf  # noqa: E402
from tn_hf import cost  # noqa: E402
from tn_hf.demo import SmallCNN  # noqa: E402
from tn_hf.layers import layer_from_spec  # noqa: E402

KINDS = ("gemm", "conv", "conv_cl", "other")
RESULTS = Path(__file__).parent / "results"


def _model(name: str) -> nn.Module:
    if name == "small_cnn":
        m = SmallCNN().eval()
        m.pretrained_cfg = {"input_size": (1, 28, 28)}
        return m
    import timm
    return timm.create_model(name, pretrained=False).eval()


def cpu_seconds(m: nn.Module, x: torch.Tensor, reps: int = 15, budget: float = 0.3) -> float:
    with torch.no_grad():
        m.eval()
        m(x)
        m(x)
        ts: list[float] = []
        while len(ts) < reps and (sum(ts) < budget or len(ts) < 5):
            t0 = time.process_time()
            m(x)
            ts.append(time.process_time() - t0)
    return min(ts)


def features(ops) -> list[float]:
    f: list[float] = []
    for k in KINDS:
        sel = [o for o in ops if o.kind == k]
        f += [len(sel), sum(o.flops for o in sel), sum(o.flops / max(o.inner, 1) for o in sel),
              sum(o.bytes for o in sel)]
    return f


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,vit_small_patch16_224,convnext_tiny,small_cnn")
    args = ap.parse_args()
    cache = Path(tempfile.mkdtemp()) / "cost.json"
    for name in args.models.split(","):
        for ratio in (3.0, 8.0) if name == "small_cnn" else (3.0,):
            tn_hf.tune(_model(name), tn_hf.TNConfig(compression_ratio=ratio), cache=cache)
            print(f"{name} at {ratio:g}x: candidates recorded", flush=True)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for key in json.loads(cache.read_text())["times"]:
        k = json.loads(key)
        what, shape = k["layer"], k["shape"]
        cl = bool(what.get("channels_last"))
        dense = eval("nn." + what["dense"]["repr"].replace("\n", ""), {"nn": nn})  # a torch module's repr
        tn = layer_from_spec(what["tn"])
        x = torch.randn(*shape, generator=gen)
        if cl and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        rows.append((features(cost.trace(tn, shape, torch.float32, cl)), cpu_seconds(tn, x)))
        rows.append((features(cost.trace(dense, shape, torch.float32, cl)), cpu_seconds(dense, x)))
    X = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows])
    keep = np.ones(len(y), bool)
    for limit in (1.0, 1.0, 0.7, 0.7):
        coef, _ = nnls(X[keep] / y[keep, None], np.ones(keep.sum()))
        keep = np.abs(np.log((X @ coef) / y)) < limit
    pred = X @ coef
    r_true, r_pred = y[0::2] / y[1::2], pred[0::2] / pred[1::2]
    agree = float(np.mean((r_true < 1) == (r_pred < 1)))
    err = float(np.median(np.abs(np.log(r_pred / r_true))))
    constants = {}
    for i, kind in enumerate(KINDS):
        c = coef[4 * i:4 * i + 4]
        constants[kind] = {"overhead": float(c[0]), "per_flop": float(c[1]),
                           "small_dim": float(c[2] / c[1]) if c[1] else 0.0, "per_byte": float(c[3])}
    print(json.dumps(constants, indent=1))
    print(f"{len(r_true)} pairs; TN vs dense ordered as measured in {agree:.1%}; median time-ratio error {err:.1%}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "calibrate_cost.json").write_text(json.dumps(
        {"models": args.models, "pairs": len(r_true), "agreement": agree, "median_ratio_error": err,
         "constants": constants, "cpu": cost.device_name(torch.device("cpu")), "torch": torch.__version__},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
