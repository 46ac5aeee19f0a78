"""Time tn_hf TT-SVD / TR-SVD / tt_project against tensorly on every conv/linear weight of resnet18.

Random-init timm resnet18 (no download). Layout as the TN layers use it: conv weights
(out, in, kh, kw) -> modes (out factors..., kh*kw, in factors...); linear (out, in) -> paired
modes (out_k * in_k). Ranks: one int rank per layer for ~3.5x compression (ranks_for_ratio).
Writes benchmarks/results/decompose.{json,md}.  Usage: python benchmarks/decompose.py [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import tensorly as tl
import timm
import torch
from tensorly.decomposition import tensor_ring, tensor_train
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import plots  # noqa: E402
from _results import RESULTS, write  # noqa: E402

from tn_hf.decompositions import (
    auto_modes,
    factorize,
    ranks_for_ratio,
    tn_params,
    tr_svd,
    tr_to_full,
    tt_project,
    tt_svd,
    tt_to_full,
)

RATIO = 3.5


def tensorize(w: torch.Tensor) -> torch.Tensor:
    if w.dim() == 4:  # conv
        o, i, kh, kw = w.shape
        fo, fi = auto_modes(o, 4, 3), auto_modes(i, 4, 3)
        t = w.reshape(*fo, *fi, kh * kw)
        no, ni = len(fo), len(fi)
        perm = list(range(no)) + [no + ni] + list(range(no, no + ni))
        return t.permute(perm).contiguous()
    o, i = w.shape  # linear: paired modes
    d = min(len(auto_modes(o, 4, 3)), len(auto_modes(i, 4, 3))) or 1
    d = max(d, 2)
    fo, fi = factorize(o, d), factorize(i, d)
    t = w.reshape(*fo, *fi)
    perm = [p for k in range(d) for p in (k, d + k)]
    return t.permute(perm).reshape([fo[k] * fi[k] for k in range(d)]).contiguous()


def timed(fn, repeats):
    times, out = [], fn()  # warm-up run, not timed
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def rel(a, b):
    return float((a - b).norm() / b.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="first 6 layers, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    args = ap.parse_args()
    torch.manual_seed(0)
    tl.set_backend("pytorch")
    model = timm.create_model("resnet18", pretrained=False)
    weights = [(n, m.weight.detach().float()) for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    repeats = 1 if args.quick else args.repeats
    if args.quick:
        weights = weights[:6]
    rows, tot = [], {k: 0.0 for k in ("tl_tt", "tt", "proj", "tl_tr", "tr")}
    for name, w in tqdm(weights, desc="layers"):
        x = tensorize(w)
        r_tt = ranks_for_ratio(x.shape, RATIO, "tt")
        r_tr = ranks_for_ratio(x.shape, RATIO, "tr")
        t_tl_tt, f_tl_tt = timed(lambda x=x, r=r_tt: tl.tt_to_tensor(tensor_train(x, rank=r)), repeats)
        t_tt, c_tt = timed(lambda x=x, r=r_tt: tt_svd(x, ranks=r), repeats)
        t_proj, p = timed(lambda x=x, r=r_tt: tt_project(x, r), repeats)
        t_tl_tr, f_tl_tr = timed(lambda x=x, r=r_tr: tl.tr_to_tensor(tensor_ring(x, rank=r)), repeats)
        t_tr, c_tr = timed(lambda x=x, r=r_tr: tr_svd(x, ranks=r), repeats)
        row = dict(name=name, shape="x".join(map(str, x.shape)), tt_ranks=r_tt, tr_ranks=r_tr,
                   ratio_tt=x.numel() / tn_params(x.shape, r_tt), ratio_tr=x.numel() / tn_params(x.shape, r_tr),
                   t_tl_tt=t_tl_tt, t_tt=t_tt, t_proj=t_proj, t_tl_tr=t_tl_tr, t_tr=t_tr,
                   e_tl_tt=rel(f_tl_tt, x), e_tt=rel(tt_to_full(c_tt), x), e_proj=rel(p, x),
                   e_tl_tr=rel(f_tl_tr, x), e_tr=rel(tr_to_full(c_tr), x))
        rows.append(row)
        for k, v in (("tl_tt", t_tl_tt), ("tt", t_tt), ("proj", t_proj), ("tl_tr", t_tl_tr), ("tr", t_tr)):
            tot[k] += v
    lines = [
        "# Decomposition benchmark: tn_hf vs tensorly (timm resnet18, random init)",
        "",
        f"CPU, {torch.get_num_threads()} torch threads, float32, tensorly {tl.__version__} (pytorch backend), "
        f"median of {repeats} run(s) after a warm-up, ranks for ~{RATIO}x per layer. Times in seconds (include "
        "rebuilding the dense tensor for tensorly; tt_project returns the dense tensor).",
        "",
        "| layer | tensor | TT ranks | TT ratio | tensorly TT s | tn_hf tt_svd s | tn_hf tt_project s | "
        "TT err tensorly / tn_hf / project | tensorly TR s | tn_hf tr_svd s | TR ratio | TR err tensorly / tn_hf |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['shape']} | {r['tt_ranks']} | {r['ratio_tt']:.2f} | {r['t_tl_tt']:.4f} | "
            f"{r['t_tt']:.4f} | {r['t_proj']:.4f} | {r['e_tl_tt']:.4f} / {r['e_tt']:.4f} / {r['e_proj']:.4f} | "
            f"{r['t_tl_tr']:.4f} | {r['t_tr']:.4f} | {r['ratio_tr']:.2f} | {r['e_tl_tr']:.4f} / {r['e_tr']:.4f} |")
    lines += [
        "",
        f"**Total**: tensorly TT-SVD {tot['tl_tt']:.3f} s, tn_hf tt_svd {tot['tt']:.3f} s, "
        f"tn_hf tt_project {tot['proj']:.3f} s -> tt_project speed-up **{tot['tl_tt'] / tot['proj']:.1f}x** "
        f"(tt_svd {tot['tl_tt'] / tot['tt']:.1f}x); tensorly TR-SVD {tot['tl_tr']:.3f} s, "
        f"tn_hf tr_svd {tot['tr']:.3f} s ({tot['tl_tr'] / tot['tr']:.1f}x).",
        "",
        f"Max |TT error difference| tn_hf vs tensorly: "
        f"{max(abs(r['e_tt'] - r['e_tl_tt']) for r in rows):.2e} (project: "
        f"{max(abs(r['e_proj'] - r['e_tl_tt']) for r in rows):.2e}); "
        f"max TR error ratio tn_hf/tensorly: {max(r['e_tr'] / r['e_tl_tr'] for r in rows):.4f}.",
        "",
        "Random-init weights have flat spectra (errors near 1 - 1/ratio); fine for timing.",
    ]
    write("decompose", {"ratio": RATIO, "repeats": repeats, "rows": rows, "totals": tot}, "\n".join(lines), args.out)
    plots.draw(Path(args.out) / "decompose.json")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
