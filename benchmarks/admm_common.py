"""Shared arms, result storage and table rendering for the ADMM benchmarks (admm_mnist.py, admm_lstm.py).

Arms, all from the same trained dense model, at the same ranks and the same total epochs
(``admm_epochs + ft_epochs``):

* direct: decomposition of the dense weights, fine-tune ``admm_epochs + ft_epochs`` epochs;
* admm_default: ``ADMMScheduler(model, cfg, total_steps=...)`` with nothing else set, ``admm_epochs``
  epochs, decomposition, fine-tune ``ft_epochs``;
* admm_tuned: the hand-made schedule (gradient W-step, rho 1e-2 x10 at 25/50/75 % of the steps,
  Z/U every 10 steps), same epochs.

Training is ``tn_hf.demo.train`` (Adam lr 1e-3; cosine LR when fine-tuning, constant under ADMM).
Each cell (format, ratio, seed) is appended to a JSON file as soon as it is done, so a run can be
split into chunks; the markdown table is rendered from the JSON (mean +- sample std over seeds).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
from _results import environment  # noqa: E402

from tn_hf import TNConfig, demo
from tn_hf.admm import ADMMScheduler
from tn_hf.convert import compress

ARMS = ("direct", "admm_default", "admm_tuned")


def tuned_kwargs(total_steps: int) -> dict:
    return {"w_step": "grad", "rho": 1e-2, "update_every": 10,
            "rho_schedule": {"type": "step", "factor": 10.0,
                             "milestones": [max(1, int(total_steps * f)) for f in (0.25, 0.5, 0.75)]}}


def run_cell(dense, train_loader, test_loader, cfg: TNConfig, *, admm_epochs: int, ft_epochs: int,
             lr: float = 1e-3) -> dict:
    """The three arms for one (format, ratio, seed); accuracies in %, times in s."""
    total = admm_epochs * len(train_loader)
    out = {}
    ranks = plan = None
    for arm in ("admm_default", "admm_tuned"):
        m = copy.deepcopy(dense)
        sched = ADMMScheduler(m, cfg, total_steps=total, **({} if arm == "admm_default" else tuned_kwargs(total)))
        t0 = time.perf_counter()
        demo.train(m, train_loader, admm_epochs, sched, lr=lr, progress=False)
        t_admm = time.perf_counter() - t0
        acc_before = demo.evaluate(m, test_loader)
        primal = sched.residuals()["primal"]
        report = sched.compress(m, progress=False)
        acc_dec = demo.evaluate(m, test_loader)
        demo.train(m, train_loader, ft_epochs, lr=lr, progress=False)
        out[arm] = {"acc_before_decomp": acc_before, "acc_decomposed": acc_dec,
                    "acc_finetuned": demo.evaluate(m, test_loader), "primal_end": primal,
                    "admm_s_per_epoch": t_admm / admm_epochs, "zu_seconds": sched.update_seconds}
        ranks = ranks or sched.ranks
        plan = plan or sched.plan  # the plan at the ranks ADMM trained for
        out["target_ratio"] = report.totals["target_ratio"]
    m = copy.deepcopy(dense)
    compress(m, plan, progress=False)  # same ranks as the ADMM arms
    acc_dec = demo.evaluate(m, test_loader)
    # plain dense epochs, timed beside the ADMM epochs for the overhead
    d = copy.deepcopy(dense)
    t0 = time.perf_counter()
    demo.train(d, train_loader, 1, lr=lr, progress=False, cosine=False)
    out["dense_s_per_epoch"] = time.perf_counter() - t0
    demo.train(m, train_loader, admm_epochs + ft_epochs, lr=lr, progress=False)
    out["direct"] = {"acc_decomposed": acc_dec, "acc_finetuned": demo.evaluate(m, test_loader)}
    out["ranks"] = ranks
    return out


def grid_parser() -> argparse.ArgumentParser:
    """The flags every ADMM benchmark takes: formats, ratios, seeds."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="+", default=["tt", "tr"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[4.0, 8.0, 16.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return ap


def start(out: str) -> tuple[str, dict]:
    """2 threads; the results so far (``out``.json, for chunked runs) with this run's environment."""
    torch.set_num_threads(2)
    path = out + ".json"
    data = load(path)
    data["environment"] = environment()
    return path, data


def load(path: str) -> dict:
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {"cells": {}, "dense": {}}


def save(path: str, data: dict):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def render(data: dict, title: str, intro: str) -> str:
    dense = [v["acc"] for v in data["dense"].values()]
    lines = [f"# {title}", "", intro, "",
             f"Dense accuracy over seeds: {_ms(dense)} % (seeds {sorted(data['dense'])}). "
             f"Environment: {data.get('environment')}.", "",
             "Accuracy in %, mean ± sample std over seeds (n). 'after decomp' = right after the "
             "decomposition, before any fine-tuning; 'final' = after fine-tuning at equal total epochs; "
             "'ADMM default - direct' = per seed, then mean ± std (positive: ADMM ahead). "
             "ADMM overhead = ADMM epoch time / plain dense epoch time - 1, measured in the same process, "
             "median over seeds (2 shared CPU cores: noisy).", "",
             "| format | ratio (got) | n | direct: after decomp | ADMM default: after decomp "
             "| ADMM tuned: after decomp "
             "| direct: final | ADMM default: final | ADMM tuned: final | ADMM default - direct: final "
             "| primal at end (default) | ADMM overhead (default) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for key, c in data["cells"].items():
        fmt, ratio, _seed = key.split("|")
        groups.setdefault((fmt, float(ratio)), []).append(c)
    for (fmt, ratio), cs in sorted(groups.items()):
        got = statistics.mean(c["target_ratio"] for c in cs)
        ov = [100 * (c["admm_default"]["admm_s_per_epoch"] / c["dense_s_per_epoch"] - 1) for c in cs]
        lines.append(
            f"| {fmt.upper()} | {ratio:g} ({got:.2f}) | {len(cs)} | {_ms([c['direct']['acc_decomposed'] for c in cs])} "
            f"| {_ms([c['admm_default']['acc_decomposed'] for c in cs])} "
            f"| {_ms([c['admm_tuned']['acc_decomposed'] for c in cs])} "
            f"| {_ms([c['direct']['acc_finetuned'] for c in cs])} "
            f"| {_ms([c['admm_default']['acc_finetuned'] for c in cs])} "
            f"| {_ms([c['admm_tuned']['acc_finetuned'] for c in cs])} "
            f"| {_ms([c['admm_default']['acc_finetuned'] - c['direct']['acc_finetuned'] for c in cs])} "
            f"| {statistics.mean(c['admm_default']['primal_end'] for c in cs):.4f} "
            f"| {statistics.median(ov):+.0f} % |")
    return "\n".join(lines) + "\n"
