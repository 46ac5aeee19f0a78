"""Rank allocations at one parameter budget: accuracy and speed on real MNIST-5k.

    python benchmarks/allocation_mnist.py [--ratio 8] [--seeds 0 1 2] [--epochs 3]

Per seed: the SmallCNN of admm_mnist.py (trained 3 epochs, cached), then for every allocation
("uniform", "global", "time") the same model compressed by direct decomposition at the same
compression ratio (conv2-4, measured planning at the 1x28x28 input), its test accuracy right after
the decomposition and after ``--epochs`` epochs of fine-tuning, and its eval time against the
dense model (timed alternately in one process, median over repeats of the per-repeat ratio).
Writes benchmarks/results/allocation_mnist.{json,md}.
"""
import argparse
import copy
import statistics

import admm_mnist
import torch
from _results import write
from speed_models import alternate

from tn_hf import TNConfig, compress, demo

ALLOCATIONS = ("uniform", "global", "time")


def time_ratio(dense, tn, batch: int, repeats: int = 9) -> float:
    x = torch.randn(batch, 1, 28, 28)
    with torch.no_grad():
        alternate([lambda: dense(x), lambda: tn(x)], repeats, torch.device("cpu"))
    return alternate.paired[1]


def run(ratio: float, seeds, epochs: int) -> dict:
    torch.set_num_threads(2)
    data = {"dense": {}, "cells": []}
    for seed in seeds:
        dense, tl, te = admm_mnist.dense_model(seed, data)
        dense.eval()
        for alloc in ALLOCATIONS:
            m = copy.deepcopy(dense)
            m.pretrained_cfg = {"input_size": (1, 28, 28)}  # lets the planner time the layers
            rep = compress(m, TNConfig(compression_ratio=ratio, allocation=alloc), progress=False)
            m.eval()
            cell = {"seed": seed, "allocation": alloc, "target_ratio": rep.totals["target_ratio"],
                    "ranks": {r["name"]: r["ranks"] for r in rep.rows},
                    "acc_decomposed": demo.evaluate(m, te),
                    "time_b1": time_ratio(dense, m, 1), "time_b32": time_ratio(dense, m, 32)}
            torch.manual_seed(seed)
            demo.train(m, tl, epochs, progress=False)
            cell["acc_finetuned"] = demo.evaluate(m, te)
            print(cell)
            data["cells"].append(cell)
    return data


def render(data: dict, ratio: float, epochs: int) -> str:
    def ms(xs):
        return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"
    dense = [v["acc"] for v in data["dense"].values()]
    lines = ["# Rank allocations at one parameter budget (MNIST-5k, SmallCNN)", "",
             f"Direct decomposition of conv2-4 at {ratio:g}x (`TNConfig(compression_ratio={ratio:g}, "
             f"allocation=...)`, measured planning), then {epochs} epochs of fine-tuning (Adam, cosine). "
             f"Seeds: {len(dense)}; mean ± std. Dense test accuracy {ms(dense)} %. Time: TN over dense eval "
             "time, both timed alternately in one process (median over repeats of the per-repeat ratio), "
             "2 threads.", "",
             "| allocation | ratio reached | acc after decomp % | acc fine-tuned % | time b1 | time b32 |",
             "|---|---|---|---|---|---|"]
    for alloc in ALLOCATIONS:
        cs = [c for c in data["cells"] if c["allocation"] == alloc]
        if cs:
            lines.append(f"| {alloc} | {ms([c['target_ratio'] for c in cs])} | {ms([c['acc_decomposed'] for c in cs])}"
                         f" | {ms([c['acc_finetuned'] for c in cs])} | {ms([c['time_b1'] for c in cs])}x | "
                         f"{ms([c['time_b32'] for c in cs])}x |")
    lines += ["", "Ranks (seed 0):", ""]
    lines += [f"- {c['allocation']}: " + ", ".join(f"{n} {r}" for n, r in c["ranks"].items())
              for c in data["cells"] if c["seed"] == data["cells"][0]["seed"]]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=8.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    data = run(args.ratio, args.seeds, args.epochs)
    data.update(ratio=args.ratio, epochs=args.epochs)
    print(write("allocation_mnist", data, render(data, args.ratio, args.epochs)))


if __name__ == "__main__":
    main()
