"""Rank bookkeeping and per-layer rank allocation for a global budget (params or FLOPs)."""
from __future__ import annotations

import heapq
import math
from typing import Sequence

import torch
from torch import Tensor

from .bt import bt_ranks_for_ratio
from .tr import tr_ranks
from .tt import check_tensor, stable, tt_ranks, unfolding_spectrum
from .tucker import tucker_ranks_for_ratio

__all__ = ["tn_params", "ranks_for_ratio", "allocate_ranks", "allocation_summary"]

CHAIN_FORMATS = ("tt", "tr")  # chains of 3-way cores (Tucker: decompositions.tucker)
ALLOC_BUDGETS = ("params", "flops", "params+flops")


def tn_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of TN parameters: ``sum r[k] * n[k] * r[k+1]``."""
    if len(ranks) != len(shape) + 1:
        raise ValueError(f"tn_params: shape {tuple(shape)} needs {len(shape) + 1} ranks, got {list(ranks)}")
    return int(sum(ranks[k] * int(n) * ranks[k + 1] for k, n in enumerate(shape)))


def _norm_ranks(shape, r, fmt):
    return tt_ranks(shape, r) if fmt == "tt" else tr_ranks(shape, r)


def ranks_for_ratio(shape: Sequence[int], ratio: float, format: str = "tt") -> list[int]:
    """Largest single int rank (clipped list) whose TN params are <= dense / ``ratio``, then
    internal bonds raised one at a time (middle first) while the budget allows.

    Returns the rank-1 list when even that exceeds the budget.
    """
    if format == "tucker":
        return tucker_ranks_for_ratio(shape, ratio)
    if format == "bt":
        return bt_ranks_for_ratio(shape, ratio)
    if format not in CHAIN_FORMATS:
        raise ValueError(f"ranks_for_ratio: format must be one of {CHAIN_FORMATS + ('tucker', 'bt')}, got {format!r}")
    if not ratio > 0:
        raise ValueError(f"ranks_for_ratio: ratio must be > 0, got {ratio}")
    shape = [int(n) for n in shape]
    budget = math.prod(shape) / ratio
    lo, hi = 1, max(shape) ** 2  # params are monotone in the int rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tn_params(shape, _norm_ranks(shape, mid, format)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    r = _norm_ranks(shape, lo, format)
    # fill the rest of the budget: raise internal bonds one at a time, middle bonds first
    d = len(shape)
    order = sorted(range(1, d), key=lambda k: abs(k - d / 2))
    grown = True
    while grown:
        grown = False
        for k in order:
            new = list(r)
            new[k] += 1
            try:
                ok = _norm_ranks(shape, new, format) == new
            except ValueError:
                ok = False
            if ok and tn_params(shape, new) <= budget:
                r, grown = new, True
    return r


def _validate(tensors, format, compression_ratio, budget, flops_per_param, allocation):
    if format not in CHAIN_FORMATS:
        raise ValueError(f"allocate_ranks: format must be one of {CHAIN_FORMATS} (Tucker: tucker_allocate), "
                         f"got {format!r}")
    if budget not in ALLOC_BUDGETS:
        raise ValueError(f"allocate_ranks: budget must be one of {ALLOC_BUDGETS}, got {budget!r}")
    if allocation not in ("global", "uniform"):
        raise ValueError(f"allocate_ranks: allocation must be 'global' or 'uniform', got {allocation!r}")
    if not (isinstance(compression_ratio, (int, float)) and compression_ratio > 0):
        raise ValueError(f"allocate_ranks: compression_ratio must be > 0, got {compression_ratio!r}")
    if not tensors:
        raise ValueError("allocate_ranks: no tensors given")
    for name, t in tensors.items():
        check_tensor(t, f"allocate_ranks[{name!r}]")
    if budget != "params":
        missing = [n for n in tensors if flops_per_param is None or n not in flops_per_param]
        if missing:
            raise ValueError(f"allocate_ranks: budget={budget!r} needs flops_per_param for every tensor; "
                             f"missing {missing}")


def _weights(tensors, budget, flops_per_param):
    return {n: (float(flops_per_param[n]) if budget == "flops" else 1.0) for n in tensors}


def _caps(tensors, budget, flops_per_param, ratio) -> list[tuple[dict[str, float], float]]:
    """The budgets an allocation must fit, as (cost per TN param of each tensor, budget): params,
    FLOP-weighted params, or both ("params+flops"), each at the dense total / ``ratio``."""
    kinds = ("params", "flops") if budget == "params+flops" else (budget,)
    out = []
    for kind in kinds:
        w = _weights(tensors, kind, flops_per_param)
        out.append((w, sum(t.numel() * w[n] for n, t in tensors.items()) / ratio))
    return out


def _clip_tt(shape, r):
    r = list(r)
    d = len(shape)
    for k in range(1, d):
        r[k] = max(1, min(r[k], r[k - 1] * shape[k - 1]))
    for k in range(d - 1, 0, -1):
        r[k] = min(r[k], r[k + 1] * shape[k])
    return r


def _ladder(t: Tensor, floor: list[int], levels: int = 48):
    """[(TN params, est. squared error, ranks, unfolding tails)] for relative tolerances from 1 down to 0,
    every rank list raised to at least ``floor``."""
    shape = [int(s) for s in t.shape]
    d = len(shape)
    energy = float(stable(t.to(torch.float64).pow(2).sum().reshape(1))[0] or 1.0) / t.numel()
    tails = []
    for k in range(1, d):
        spec = unfolding_spectrum(t, k) / energy
        tail = torch.flip(torch.cumsum(torch.flip(spec, [0]), 0), [0])
        tails.append(torch.cat([tail, tail.new_zeros(1)]))  # tail[r] = error at rank r
    total = float(tails[0][0])
    out: list[tuple[int, float, list[int], list[Tensor]]] = []
    for tau in [None, *torch.logspace(0, -4, levels, device="cpu").tolist(), 0.0]:
        if tau is None:
            r = list(floor)
        else:
            per_bond = tau * tau * total / max(d - 1, 1)
            r = [1] + [max(1, int(torch.nonzero(tl <= per_bond * (1 + 1e-9)).flatten()[0])) for tl in tails] + [1]
            r = _clip_tt(shape, [max(a, b) for a, b in zip(r, floor)])
        err = sum(float(tl[min(r[k + 1], tl.numel() - 1)]) for k, tl in enumerate(tails))
        entry = (tn_params(shape, r), err, r, tails)
        if not out or entry[2] != out[-1][2]:
            out.append(entry)
    return out


FLOOR_FACTOR = 4.0


def allocation_summary(tensors: dict[str, Tensor], ranks: dict[str, list[int]], *, budget="params",
                       flops_per_param=None) -> dict:
    """Dense vs TN cost (params or FLOP-weighted params) and the achieved compression ratio."""
    w = _weights(tensors, budget, flops_per_param)
    dense = sum(t.numel() * w[n] for n, t in tensors.items())
    tn = sum(tn_params(t.shape, ranks[n]) * w[n] for n, t in tensors.items())
    return {"dense": dense, "tn": tn, "ratio": dense / tn}


FILL = 0.97  # with two budgets, the params budget is this full at least (while the FLOPs budget allows)


def _greedy(shapes, ladders, caps, unit):
    """Greedy ladder climb, then single-bond +1 steps, most error removed per ``unit`` cost first,
    every step within every cap. Returns (ranks, totals used per cap)."""
    names = list(shapes)
    level = {n: 0 for n in names}
    used = [sum(ladders[n][0][0] * w[n] for n in names) for w, _ in caps]

    def fits(n, add):  # add: TN params added to tensor n
        return all(u + add * w[n] <= b for u, (w, b) in zip(used, caps))

    def take(n, add):
        for i, (w, _) in enumerate(caps):
            used[i] += add * w[n]

    heap: list[tuple[float, int, str, int]] = []

    def push(n):
        lad, i = ladders[n], level[n]
        for j in range(i + 1, len(lad)):  # next level that lowers the error
            add, gain = lad[j][0] - lad[i][0], lad[i][1] - lad[j][1]
            if gain > 0 and add > 0:
                heapq.heappush(heap, (-gain / (add * unit[n]), add, n, j))
                return

    for n in names:
        push(n)
    while heap:
        _, add, n, j = heapq.heappop(heap)
        if not fits(n, add):
            if len(caps) > 1:
                break  # two budgets: the single-bond steps below spend the rest in score order
            continue  # does not fit; other tensors' cheaper steps may still
        take(n, add)
        level[n] = j
        push(n)
    ranks = {n: list(ladders[n][level[n]][2]) for n in names}
    # fill what the coarse ladder left: single-bond +1 steps, best error gain per cost first
    # (one heap entry per bond, recomputed when its tensor's ranks change; totals only grow, so a
    # step that does not fit now never will)
    tails = {n: ladders[n][-1][3] for n in names}
    version = {n: 0 for n in names}
    bonds: list[tuple[float, str, int, int, int]] = []

    def push_bonds(n):
        sh, r = shapes[n], ranks[n]
        for k in range(1, len(sh)):
            new = list(r)
            new[k] += 1
            tl = tails[n][k - 1]
            if _clip_tt(sh, new) != new or new[k] >= tl.numel():
                continue
            add = tn_params(sh, new) - tn_params(sh, r)
            gain = float(tl[r[k]] - tl[new[k]])
            if gain > 0 and add > 0:
                heapq.heappush(bonds, (-gain / (add * unit[n]), n, k, add, version[n]))

    for n in names:
        push_bonds(n)
    while bonds:
        _, n, k, add, v = heapq.heappop(bonds)
        if v != version[n] or not fits(n, add):
            continue
        take(n, add)
        ranks[n][k] += 1
        version[n] += 1
        push_bonds(n)
    return ranks, used


def allocate_ranks(tensors: dict[str, Tensor], *, format: str = "tt", compression_ratio: float,
                   budget: str = "params", flops_per_param: dict[str, float] | None = None,
                   allocation: str = "global") -> dict[str, list[int]]:
    """Per-tensor ranks so that total TN cost ~= total dense cost / ``compression_ratio``.

    Cost (``budget``): "params"; "flops", params weighted by ``flops_per_param[name]`` (a layer's
    output positions: its FLOPs in the layouts whose FLOPs are params x positions); or
    "params+flops", both at once: the TN params *and* the FLOP-weighted params are each within the
    dense total / ``compression_ratio`` (smaller and as many times cheaper to run).

    ``allocation="uniform"``: every tensor at the ratio on its own (largest single int rank).
    ``allocation="global"`` (TT): greedy from a floor (each tensor at ``FLOOR_FACTOR`` x the target
    ratio on its own); repeatedly raise the bond whose
    next singular value (squared, of that unfolding, relative to the tensor's mean energy per
    element) removes the most approximation error per added cost, while every total stays within
    its budget. With two budgets a step costs the sum of its shares of each budget; where the FLOPs
    budget runs out with params to spare, FLOPs are weighted up (bisection) until the params budget
    is at least ``FILL`` spent, so the ratio asked for is the params ratio reached.
    For TR the TT allocation fixes each tensor's share of the budget, and each tensor then gets the
    largest single TR rank (ring rank included) that fits its share.
    The achieved cost never exceeds the budget unless rank 1 everywhere already does.
    """
    _validate(tensors, format, compression_ratio, budget, flops_per_param, allocation)
    if allocation == "uniform":
        return {n: ranks_for_ratio(t.shape, compression_ratio, format) for n, t in tensors.items()}

    names = list(tensors)
    shapes = {n: [int(s) for s in tensors[n].shape] for n in names}
    caps = _caps(tensors, budget, flops_per_param, compression_ratio)
    # per tensor: a ladder of rank lists from a grid of TT-SVD tolerances (equal split over
    # bonds, as tt_svd(rel_error=) does), each with its params and estimated squared error
    # (sum of discarded unfolding energies, relative to the mean energy per element)
    # floor: no tensor is compressed more than FLOOR_FACTOR x the target ratio (a layer at rank 1
    # everywhere destroys accuracy however well the rest is kept)
    floors = {n: ranks_for_ratio(shapes[n], compression_ratio * FLOOR_FACTOR, "tt") for n in names}
    ladders = {n: _ladder(tensors[n].detach(), floors[n]) for n in names}

    def run(lam: float):
        unit = {n: sum((lam if i else 1.0) * w[n] / b for i, (w, b) in enumerate(caps)) for n in names}
        return _greedy(shapes, ladders, caps, unit)
    def filled(got) -> bool:
        return got[1][0] >= FILL * caps[0][1]
    best = run(1.0)
    if len(caps) > 1 and not filled(best):
        # the FLOPs budget ran out first: FLOPs must count for more, until the params budget is spent
        lo, hi = 1.0, 2.0
        while not filled(best := run(hi)) and hi < 1e6:
            lo, hi = hi, hi * 4
        for _ in range(12 if filled(best) else 0):  # the least weight that still fills it
            mid = (lo * hi) ** 0.5
            got = run(mid)
            lo, hi, best = (lo, mid, got) if filled(got) else (mid, hi, best)
    ranks = best[0]
    if format == "tt":
        return ranks
    # TR: each tensor's share of the budget from the TT allocation -> largest int TR rank in it
    out = {}
    for n in names:
        share = max(tn_params(shapes[n], ranks[n]), 1)
        out[n] = ranks_for_ratio(shapes[n], tensors[n].numel() / share, "tr")
    return out
