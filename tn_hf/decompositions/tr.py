"""Tensor-Ring: TR-SVD (Zhao et al. 2016) with the reduced-storage search of RSDTR.

The search runs over the ring's cyclic start (which mode is split first) and over the
divisors ``r0`` of the first SVD's rank ``R = r0 * r1``; the candidate with the least
storage wins. TT-SVD of every cyclic shift is also a candidate (ring rank 1), so the
search never stores more than TT-SVD at the same tolerance. Cores are returned in the
tensor's original mode order, so ``tr_to_full(cores)`` rebuilds ``x``.

At fixed ranks TR-SVD is only quasi-optimal: the first SVD basis is split into ring x bond indices
arbitrarily, and a TR tensor of ranks r generally needs TT bonds r[0] * r[k] in the sweep, so
TR-SVD of a tensor that already has TR ranks r does not return it (on the MNIST CNN's weights at
8x it moves such a tensor by 20-50 % of its norm). ``tr_als`` refines cores by alternating least
squares (each core in turn the exact least-squares fit given the others: the error never grows);
started from the cores of a nearby tensor it stays at that tensor's fit, which is what ADMM's
Z-step needs (``ADMMScheduler`` warm-starts every TR projection from the previous one, and the
final decomposition from the last one).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .tt import check_rank_args, check_tensor, truncated_factor, tt_ranks, tt_sweep

__all__ = ["tr_svd", "tr_als", "tr_to_full", "tr_project", "tr_ranks"]

ALS_SWEEPS = 2  # tr_als sweeps per call (a warm-started ADMM projection; tr_project)


def tr_ranks(shape: Sequence[int], ranks) -> list[int]:
    """Normalise ``ranks`` (int or list of d+1 with r[0] == r[d]) to valid TR ranks for TR-SVD.

    Int r: every rank, ring included, = r, clipped so that r0 * r1 <= the first unfolding's
    size and the later bonds fit (the ring rank is reduced first when r*r is too large).
    """
    shape = [int(n) for n in shape]
    d = len(shape)
    if d < 2:
        raise ValueError(f"TR ranks: shape {tuple(shape)} has < 2 modes")
    if isinstance(ranks, bool) or not isinstance(ranks, (int, list, tuple)):
        raise ValueError(f"TR ranks for shape {tuple(shape)}: expected an int or a list of {d + 1} ints, got {ranks!r}")
    first_cap = min(shape[0], math.prod(shape[1:]))
    if isinstance(ranks, int):
        if ranks < 1:
            raise ValueError(f"TR ranks for shape {tuple(shape)}: rank must be >= 1, got {ranks}")
        r0 = min(ranks, max(1, math.isqrt(first_cap)))
        r1 = min(ranks, first_cap // r0)
        # the remaining bonds: a TT on (r1, n2..nd) with a trailing r0 column block
        inner = tt_ranks([r1 * shape[1]] + shape[2:-1] + [shape[-1] * r0], ranks) if d > 2 else [1, 1]
        return [r0, r1] + inner[1:-1] + [r0]
    r = [int(v) for v in ranks]
    if len(r) != d + 1:
        raise ValueError(f"TR ranks for shape {tuple(shape)}: need a list of length {d + 1} "
                         f"(r[0] == r[d] is the ring rank), got length {len(r)}: {r}")
    if r[0] != r[-1]:
        raise ValueError(f"TR ranks for shape {tuple(shape)}: ring rank r[0]={r[0]} must equal r[d]={r[-1]}")
    if min(r) < 1:
        raise ValueError(f"TR ranks for shape {tuple(shape)}: ranks must be >= 1, got {r}")
    if r[0] * r[1] > first_cap:
        raise ValueError(f"TR ranks for shape {tuple(shape)}: r[0]*r[1]={r[0] * r[1]} exceeds the first "
                         f"unfolding's rank {first_cap}; valid ranks e.g. {tr_ranks(shape, max(r))}")
    for k in range(2, d):
        cap = min(r[k - 1] * shape[k - 1], shape[k] * r[k + 1] if k + 1 < d else shape[k] * r[0],
                  math.prod(shape[k:]) * r[0], r[1] * math.prod(shape[1:k]))
        if r[k] > cap:
            raise ValueError(f"TR ranks for shape {tuple(shape)}: r[{k}]={r[k]} exceeds the largest possible "
                             f"rank {cap} there; valid ranks e.g. {tr_ranks(shape, max(r))}")
    return r


def _split_first(L: Tensor, C: Tensor, n0: int, r0: int, shape_rest: Sequence[int]):
    """First TR core from L (n0, r0*r1) and the remainder C (r0*r1, rest) -> (core, C')."""
    R = L.shape[1]
    r1 = R // r0
    core = L.reshape(n0, r0, r1).permute(1, 0, 2).contiguous()
    C = C.reshape(r0, r1, -1).permute(1, 2, 0).reshape(r1, *shape_rest, r0)  # ring index moves last
    return core, C, r1


def _tr_from_first(L, C, shape, r0, ranks, max_rank, tol_sq):
    core0, Crest, r1 = _split_first(L, C, shape[0], r0, shape[1:])
    rest_shape = list(shape[1:-1]) + [shape[-1] * r0]
    inner = None if ranks is None else [r1] + list(ranks[2:-1]) + [1]
    cores = tt_sweep(Crest, rest_shape, r1, inner, max_rank, tol_sq)
    last = cores[-1]
    cores[-1] = last.reshape(last.shape[0], shape[-1], r0)
    return [core0] + cores


def _storage(cores) -> int:
    return sum(c.numel() for c in cores)


def _subchain(cores: Sequence[Tensor], k: int) -> Tensor:
    """Product of every core but ``k`` in ring order k+1, ..., d-1, 0, ..., k-1: ``(r[k+1], M, r[k])``."""
    d = len(cores)
    order = [(k + 1 + j) % d for j in range(d - 1)]
    q = cores[order[0]].reshape(-1, cores[order[0]].shape[-1])
    for j in order[1:]:
        q = (q @ cores[j].reshape(cores[j].shape[0], -1)).reshape(-1, cores[j].shape[-1])
    return q.reshape(cores[order[0]].shape[0], -1, cores[k].shape[0])


def tr_als(x: Tensor, cores: Sequence[Tensor], sweeps: int = ALS_SWEEPS) -> list[Tensor]:
    """Refine TR ``cores`` of ``x`` by ``sweeps`` ALS sweeps at the same ranks; returns the best cores seen
    (the given ones included), in ``x``'s dtype.

    Core k solves ``min ||X_(k) - G_k Q_k||`` exactly (normal equations solved in float64 with a
    1e-12 relative ridge), ``Q_k`` the product of the other cores.
    """
    d = len(cores)
    if [c.shape[1] for c in cores] != list(x.shape) or cores[0].shape[0] != cores[-1].shape[-1]:
        raise ValueError(f"tr_als: cores {[tuple(c.shape) for c in cores]} do not fit a tensor of shape "
                         f"{tuple(x.shape)} (need (r[k], n[k], r[k+1]) with r[0] == r[d])")
    cores = [c.detach().to(x.dtype).clone() for c in cores]
    if d < 2 or sweeps < 1:
        return cores
    xs = [x.permute([(k + j) % d for j in range(d)]).reshape(x.shape[k], -1) for k in range(d)]

    def err(cs):
        return float((tr_to_full(cs) - x).to(torch.float64).pow(2).sum())

    best, best_err = [c.clone() for c in cores], err(cores)
    for _ in range(sweeps):
        for k in range(d):
            ra, n, rb = cores[k].shape
            q = _subchain(cores, k)                               # (rb, M, ra)
            qm = q.permute(2, 0, 1).reshape(ra * rb, -1)          # (ra*rb, M): rows (a, b)
            gram = (qm @ qm.T).to(torch.float64)
            ridge = 1e-12 * float(gram.diagonal().sum()) / gram.shape[0] + 1e-300
            rhs = (xs[k] @ qm.T).to(torch.float64)                # (n, ra*rb)
            g = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device),
                                   rhs.T).T
            cores[k] = g.reshape(n, ra, rb).permute(1, 0, 2).to(cores[k].dtype).contiguous()
        e = err(cores)
        if e < best_err:
            best, best_err = [c.clone() for c in cores], e
    return best


def tr_svd(x: Tensor, *, ranks=None, max_rank: int | None = None, rel_error: float | None = None,
           sweeps: int = 0) -> list[Tensor]:
    """TR-SVD: cores ``(r[k-1], n[k], r[k])`` with ring rank ``r[0] == r[d]``, original mode order.

    ``ranks`` (int or list of d+1): TR-SVD at those ranks directly, no search, then ``sweeps`` ALS
    sweeps (``tr_als``; 0, the default: plain TR-SVD).
    ``rel_error`` and/or ``max_rank``: storage search over cyclic starts and ring-rank divisors;
    with ``rel_error=e`` every candidate meets ``||x - tr_to_full(cores)|| <= e ||x||``.
    """
    check_tensor(x, "tr_svd")
    check_rank_args("tr_svd", ranks, max_rank, rel_error)
    shape = list(x.shape)
    d = len(shape)
    if ranks is not None:
        r = tr_ranks(shape, ranks)
        L, C = truncated_factor(x.reshape(shape[0], -1), r[0] * r[1])
        if L.shape[1] < r[0] * r[1]:  # numerically rank-deficient: keep the ring rank, shrink r1
            r0 = r[0] if L.shape[1] % r[0] == 0 else 1
        else:
            r0 = r[0]
        return tr_als(x, _tr_from_first(L, C, shape, r0, r if r0 == r[0] else None, None, None), sweeps)

    norm_sq = float(x.to(torch.float64).pow(2).sum())
    e2 = 0.0 if rel_error is None else rel_error ** 2 * norm_sq
    best: tuple[int, int, list[Tensor]] | None = None
    for s in range(d):
        perm = [(s + j) % d for j in range(d)]
        xs = x.permute(perm)
        sh = [shape[p] for p in perm]
        # candidate: TT-SVD of this shift (ring rank 1), TT error split
        cands = [tt_sweep(xs, sh, 1, None, max_rank, e2 / (d - 1) if rel_error is not None else None)]
        # candidates: Zhao split (sqrt(2) looser first step), every divisor r0 of R = r0*r1
        first_tol = 2 * e2 / d if rel_error is not None else None
        cap = None if max_rank is None else max_rank * max_rank
        L, C = truncated_factor(xs.reshape(sh[0], -1), cap, first_tol)
        R = L.shape[1]
        for r0 in range(2, R + 1):
            if R % r0 or (max_rank is not None and (r0 > max_rank or R // r0 > max_rank)):
                continue
            cands.append(_tr_from_first(L, C, sh, r0, None, max_rank, e2 / d if rel_error is not None else None))
        for cores in cands:
            st = _storage(cores)
            if best is None or st < best[0]:
                best = (st, s, cores)
    assert best is not None  # every cyclic start adds its TT-SVD candidate
    _, s, cores = best
    # cores[j] belongs to mode (s + j) % d -> rotate back to the original order
    return [cores[(m - s) % d] for m in range(d)]


def tr_to_full(cores: Sequence[Tensor]) -> Tensor:
    """Dense tensor from TR cores: ``x[i1..id] = trace(G1[:, i1, :] ... Gd[:, id, :])``."""
    if len(cores) < 1:
        raise ValueError("tr_to_full: need at least one core")
    if cores[0].shape[0] != cores[-1].shape[-1]:
        raise ValueError(f"tr_to_full: ring ranks differ: first core {tuple(cores[0].shape)}, "
                         f"last core {tuple(cores[-1].shape)}")
    r0 = cores[0].shape[0]
    full = cores[0].reshape(-1, cores[0].shape[-1])  # (r0*n1, r1)
    for c in cores[1:]:
        full = (full @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
    full = full.reshape(r0, -1, r0).diagonal(dim1=0, dim2=2).sum(-1)
    return full.reshape(tuple(c.shape[1] for c in cores))


def tr_project(x: Tensor, ranks) -> Tensor:
    """Projection of ``x`` onto TR tensors with ranks <= ``ranks`` (dense): TR-SVD at those ranks refined by
    ``ALS_SWEEPS`` ALS sweeps. A local fit, not the best one (TR has no closed-form best approximation)
    and not idempotent: warm-start ``tr_als`` from the previous cores where projections repeat (ADMM)."""
    return tr_to_full(tr_svd(x, ranks=ranks, sweeps=ALS_SWEEPS))
