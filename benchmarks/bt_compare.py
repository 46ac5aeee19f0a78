"""Block-term vs TT vs Tucker at the same parameter budget: accuracy right after the decomposition and
after fine-tuning, 3 seeds, on three real data sets.

Tasks (each: a dense model trained per seed, then every format decomposed from it with
``TNConfig(format=..., compression_ratio=R, allocation="uniform")``, so every layer gets the same
budget in every format, and fine-tuned for the same epochs):

* basicmotions, vowels, italypower: sktime's BasicMotions, JapaneseVowels and ItalyPowerDemand
  (seqdata.py), LSTM(channels -> 64) + head (``admm_lstm.LSTMNet``), input and hidden matrices in
  TN form;
* mnist: ``tn_hf.demo.SmallCNN`` on the bundled MNIST-5k digits (conv2..conv4 compressed).

Sizes only: ``plan_for_speed=False``, so no layer is kept dense for speed and every format stores
the same number of parameters per layer (to the rounding of its ranks).

Results: benchmarks/results/bt_compare.json / .md / .png.

    python benchmarks/bt_compare.py --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import _results
import plots
import seqdata
import torch
from admm_lstm import LSTMNet

from tn_hf import TNConfig, compress, demo

FORMATS = ("tt", "tucker", "bt")
# task: (compression ratio, dense epochs, fine-tune epochs, lr)
TASKS = {"basicmotions": (8.0, 100, 10, 5e-3), "vowels": (8.0, 60, 10, 5e-3), "italypower": (8.0, 30, 10, 5e-3),
         "mnist": (8.0, 3, 1, 2e-3)}


def task(name: str, seed: int):
    """(dense model factory, train loader, test loader, TNConfig options) of a task."""
    if name in seqdata.SETS:
        tl, te, n_in, n_cls = seqdata.loaders(name, seed)
        return (lambda: LSTMNet(n_in, 64, n_cls)), tl, te, {"compress_hidden": True}
    tl, te = demo.loaders(seed=seed)
    return (lambda: demo.SmallCNN()), tl, te, {}


def run(names, seeds) -> dict:
    out: dict = {"settings": {n: dict(zip(("ratio", "dense_epochs", "ft_epochs", "lr"), TASKS[n])) for n in names},
                 "tasks": {}}
    for name in names:
        ratio, dense_epochs, ft_epochs, lr = TASKS[name]
        res = out["tasks"][name] = {"dense": {}, "rows": []}
        for seed in seeds:
            make, tl, te, opts = task(name, seed)
            torch.manual_seed(seed)
            dense = make()
            demo.train(dense, tl, dense_epochs, lr=lr, progress=False)
            res["dense"][str(seed)] = {"acc": demo.evaluate(dense, te), "params": demo.n_params(dense)}
            for fmt in FORMATS:
                m = copy.deepcopy(dense)
                torch.manual_seed(1000 + seed)
                t0 = time.perf_counter()
                report = compress(m, TNConfig(format=fmt, compression_ratio=ratio, allocation="uniform",
                                                  plan_for_speed=False, **opts),
                                  progress=False)
                row = {"format": fmt, "seed": seed, "target_ratio": report.totals["target_ratio"],
                       "tn_params": sum(r["tn_params"] for r in report.rows),
                       "dense_params": sum(r["dense_params"] for r in report.rows),
                       "decompose_s": time.perf_counter() - t0, "acc_decomposed": demo.evaluate(m, te),
                       "kept_dense": {r["name"]: r["kept_dense"] for r in report.rows if r.get("kept_dense")}}
                demo.train(m, tl, ft_epochs, lr=lr, progress=False)
                row["acc_finetuned"] = demo.evaluate(m, te)
                res["rows"].append(row)
                print(name, row, flush=True)
    return out


def _ms(xs) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def render(data: dict) -> str:
    lines = ["# Block-term vs TT vs Tucker at the same parameter budget (benchmarks/bt_compare.py)", "",
             "Every format decomposes the same trained dense model per seed at the same compression ratio of "
             "the targets (`allocation=\"uniform\"`: every layer at the ratio; `plan_for_speed=False`: sizes only, "
             "no layer kept dense for speed), then fine-tunes it for the same epochs (Adam, cosine LR). BT: 2 "
             "blocks, block ranks from the weights' mode spectra. Accuracy in %, mean ± sample std over seeds; "
             "'params' = the compressed layers' parameters (dense in brackets).",
             ""]
    for name, res in data["tasks"].items():
        s = data["settings"][name]
        dense = [v["acc"] for v in res["dense"].values()]
        lines += [f"## {name}", "",
                  f"Requested ratio {s['ratio']:g}x; dense {s['dense_epochs']} epochs, fine-tune {s['ft_epochs']} "
                  f"epochs, lr {s['lr']:g}. Dense accuracy: {_ms(dense)} % (n={len(dense)}).", "",
                  "| format | n | params (dense) | ratio got | after decomposition | after fine-tuning |",
                  "|---|---|---|---|---|---|"]
        for fmt in FORMATS:
            rs = [r for r in res["rows"] if r["format"] == fmt]
            if not rs:
                continue
            lines.append(f"| {fmt.upper()} | {len(rs)} | {rs[0]['tn_params']} ({rs[0]['dense_params']}) "
                         f"| {statistics.mean(r['target_ratio'] for r in rs):.2f} "
                         f"| {_ms([r['acc_decomposed'] for r in rs])} | {_ms([r['acc_finetuned'] for r in rs])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    data = run(a.tasks, a.seeds)
    md = _results.write("bt_compare", data, render(data))
    print(md.read_text())
    plots.draw(md.with_suffix(".json"))


if __name__ == "__main__":
    main()
