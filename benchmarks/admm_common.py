"""Shared arms, result storage and table rendering for the ADMM benchmarks (admm_mnist.py, admm_lstm.py).

Arms, all from the same trained dense model, at the same ranks and the same total epochs
(``admm_epochs + ft_epochs``), training with ``tn_hf.demo.train`` (Adam; constant LR under ADMM,
cosine when fine-tuning):

* ADMM: ``ADMMScheduler(model, cfg, total_steps=...)`` with nothing else set, ``admm_epochs`` epochs
  at ``lr``, decomposition (``sched.compress``), fine-tuning ``ft_epochs``;
* direct: decomposition of the dense weights at the ranks ADMM trained for (``sched.plan``),
  fine-tuning ``admm_epochs + ft_epochs`` epochs.

Each arm fine-tunes at ``lr`` and at ``lr / 10`` (fresh Adam, cosine) and its result is the better of
the two: ADMM's weights are already adapted to the constraint and a restart of Adam at the full rate
can throw part of that away (the LSTM), while a decomposed model needs the full rate to recover; one
fixed rate would favour one arm. Both rates are in the JSON and the table.

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

ARMS = ("direct", "admm_default")
FT_LR_DIVISOR = 10.0


def run_cell(dense, train_loader, test_loader, cfg: TNConfig, *, admm_epochs: int, ft_epochs: int,
             lr: float = 1e-3) -> dict:
    """Both arms for one (format, ratio, seed); accuracies in %, times in s."""
    total = admm_epochs * len(train_loader)
    low = lr / FT_LR_DIVISOR
    m = copy.deepcopy(dense)
    sched = ADMMScheduler(m, cfg, total_steps=total)
    t0 = time.perf_counter()
    demo.train(m, train_loader, admm_epochs, sched, lr=lr, progress=False)
    t_admm = time.perf_counter() - t0
    acc_before = demo.evaluate(m, test_loader)
    primal = sched.residuals()["primal"]
    report = sched.compress(m, progress=False)
    acc_dec = demo.evaluate(m, test_loader)
    at_lr = copy.deepcopy(m)
    demo.train(at_lr, train_loader, ft_epochs, lr=lr, progress=False)
    demo.train(m, train_loader, ft_epochs, lr=low, progress=False)
    out = {"admm_default": {"acc_before_decomp": acc_before, "acc_decomposed": acc_dec,
                            "acc_finetuned_at_lr": demo.evaluate(at_lr, test_loader),
                            "acc_finetuned_at_lr10": demo.evaluate(m, test_loader), "primal_end": primal,
                            "admm_s_per_epoch": t_admm / admm_epochs, "zu_seconds": sched.update_seconds},
           "target_ratio": report.totals["target_ratio"], "ranks": sched.ranks, "lr": lr, "ft_lr_admm": low}
    # plain dense epochs, timed beside the ADMM epochs for the overhead
    d = copy.deepcopy(dense)
    t0 = time.perf_counter()
    demo.train(d, train_loader, 1, lr=lr, progress=False, cosine=False)
    out["dense_s_per_epoch"] = time.perf_counter() - t0
    direct = copy.deepcopy(dense)
    compress(direct, sched.plan, progress=False)  # the ranks ADMM trained for
    res = {"acc_decomposed": demo.evaluate(direct, test_loader)}
    for key, rate in (("acc_finetuned_at_lr", lr), ("acc_finetuned_at_lr10", low)):
        f = copy.deepcopy(direct)
        demo.train(f, train_loader, admm_epochs + ft_epochs, lr=rate, progress=False)
        res[key] = demo.evaluate(f, test_loader)
    out["direct"] = res
    return normalize(out)


def normalize(cell: dict) -> dict:
    """Each arm's ``acc_finetuned``: the better of its two fine-tuning rates (cells written before the
    ADMM arm's lr/10 run had its own key name keep their numbers)."""
    a = cell["admm_default"]
    if "acc_finetuned_at_lr10" not in a:
        a["acc_finetuned_at_lr10"] = a["acc_finetuned"]
    for arm in ARMS:
        r = cell[arm]
        r["acc_finetuned"] = max(r["acc_finetuned_at_lr"], r["acc_finetuned_at_lr10"])
    return cell


def grid_parser() -> argparse.ArgumentParser:
    """The flags every ADMM benchmark takes: formats, ratios, seeds."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="+", default=["tt", "tr"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[4.0, 8.0, 16.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return ap


def start(out: str) -> tuple[str, dict]:
    """Threads from ``BENCH_THREADS`` (default 2; 1 each when two grids share the 2 cores); the results so
    far (``out``.json, for chunked runs) with this run's environment."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
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
    for c in data.get("cells", {}).values():
        normalize(c)
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
             "Accuracy in %, mean ± sample std over seeds (n). 'after decomp' = right after the decomposition, "
             "before any fine-tuning; 'final' = after fine-tuning, equal total epochs, each arm at lr and at "
             "lr/10; 'best' = the better of the two per seed. 'ADMM - direct' = best minus best per seed, then "
             "mean ± std (positive: ADMM ahead); "
             "'ADMM >= direct' counts seeds. ADMM overhead = ADMM epoch time / plain dense epoch time - 1, same "
             "process, median over seeds (2 shared CPU cores: noisy).", "",
             "| format | ratio (got) | n | direct: after decomp | ADMM: after decomp | direct: final at lr "
             "| direct: final at lr/10 | ADMM: final at lr | ADMM: final at lr/10 | direct: best | ADMM: best "
             "| ADMM - direct | ADMM >= direct | primal at end | ADMM overhead |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (fmt, ratio), cs in sorted(groups(data).items(), key=lambda kv: (kv[0][1], kv[0][0])):
        got = statistics.mean(c["target_ratio"] for c in cs)
        ov = [100 * (c["admm_default"]["admm_s_per_epoch"] / c["dense_s_per_epoch"] - 1) for c in cs]
        diff = [c["admm_default"]["acc_finetuned"] - c["direct"]["acc_finetuned"] for c in cs]
        lines.append(
            f"| {fmt.upper()} | {ratio:g} ({got:.2f}) | {len(cs)} | {_ms([c['direct']['acc_decomposed'] for c in cs])} "
            f"| {_ms([c['admm_default']['acc_decomposed'] for c in cs])} "
            f"| {_ms([c['direct']['acc_finetuned_at_lr'] for c in cs])} "
            f"| {_ms([c['direct']['acc_finetuned_at_lr10'] for c in cs])} "
            f"| {_ms([c['admm_default']['acc_finetuned_at_lr'] for c in cs])} "
            f"| {_ms([c['admm_default']['acc_finetuned_at_lr10'] for c in cs])} "
            f"| {_ms([c['direct']['acc_finetuned'] for c in cs])} "
            f"| {_ms([c['admm_default']['acc_finetuned'] for c in cs])} "
            f"| {_ms(diff)} | {sum(x >= 0 for x in diff)}/{len(diff)} "
            f"| {statistics.mean(c['admm_default']['primal_end'] for c in cs):.4f} "
            f"| {statistics.median(ov):+.0f} % |")
    return "\n".join(lines) + "\n"


def groups(data: dict) -> dict[tuple[str, float], list[dict]]:
    """Cells of the current protocol grouped by (format, ratio)."""
    out: dict[tuple[str, float], list[dict]] = {}
    for key, c in data["cells"].items():
        fmt, ratio, _seed = key.split("|")
        out.setdefault((fmt, float(ratio)), []).append(normalize(c))
    return out


def summary(data: dict, model: str) -> list[str]:
    """Markdown rows (model, format, ratio got, n, after decomp, best final per arm, difference, seeds won,
    primal) of results/README.md's combined table, from a benchmark's JSON."""
    rows = []
    for (fmt, ratio), cs in sorted(groups(data).items(), key=lambda kv: (kv[0][1], FORMATS.index(kv[0][0]))):
        diff = [c["admm_default"]["acc_finetuned"] - c["direct"]["acc_finetuned"] for c in cs]

        def ms(key, arm, cs=cs):
            return _ms([c[arm][key] for c in cs])
        rows.append(f"| {model} | {fmt.upper()} | {ratio:g}x ({statistics.mean(c['target_ratio'] for c in cs):.1f}) "
                    f"| {len(cs)} | {ms('acc_decomposed', 'direct')} | {ms('acc_decomposed', 'admm_default')} "
                    f"| {ms('acc_finetuned', 'direct')} | {ms('acc_finetuned', 'admm_default')} | {_ms(diff)} "
                    f"| {sum(x >= 0 for x in diff)}/{len(diff)} "
                    f"| {statistics.mean(c['admm_default']['primal_end'] for c in cs):.4f} |")
    return rows


FORMATS = ("tt", "tr", "tucker", "bt")
