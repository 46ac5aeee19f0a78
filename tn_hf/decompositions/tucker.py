"""Tucker format: ST-HOSVD (given ranks or error), reconstruction, projection and rank choice.

A Tucker tensor of shape (n_1, ..., n_d) with multilinear ranks (r_1, ..., r_d) is

    X = G x_1 U_1 x_2 U_2 ... x_d U_d,   X[i_1..i_d] = sum_{a} G[a_1..a_d] prod_k U_k[i_k, a_k]

with core ``G`` (r_1, ..., r_d) and factor matrices ``U_k`` (n_k, r_k); ``x_k`` is the mode-k
product. It holds ``prod(r) + sum(n_k r_k)`` numbers.

ST-HOSVD (sequentially truncated HOSVD, Vannieuwenhoven et al. 2012): for k = 1..d, take the
leading r_k left singular vectors of the mode-k unfolding of the *current* core as ``U_k`` and
replace the core by ``U_k^T`` times it. The squared error is the sum of the discarded squared
singular values of every step, so discarding at most ``e^2 ||X||^2 / d`` per step guarantees
``||X - X_hat|| <= e ||X||``. Every truncated SVD is ``tt.truncated_factor`` (Gram eigenproblem
of the small side), so ``tucker_project`` is cheap enough for ADMM's Z-step.

Ranks are a list of d ints (one per mode). An int rank means every r_k = that int, clipped to
what the shape allows: r_k <= n_k and r_k <= prod_{j != k} r_j (a larger r_k is not attainable).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .tt import check_rank_args, check_tensor, stable, truncated_factor

__all__ = ["tucker_svd", "tucker_to_full", "tucker_project", "tucker_ranks", "tucker_params",
           "tucker_ranks_for_ratio", "tucker_allocate", "mode_spectra"]


def tucker_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Numbers stored by a Tucker tensor: ``prod(r) + sum(n_k * r_k)``."""
    if len(ranks) != len(shape):
        raise ValueError(f"tucker_params: shape {tuple(shape)} needs {len(shape)} ranks, got {list(ranks)}")
    return int(math.prod(ranks)) + sum(int(n) * int(r) for n, r in zip(shape, ranks))


def _clip(shape, r) -> list[int]:
    r = [min(int(a), int(n)) for a, n in zip(r, shape)]
    changed = True
    while changed:  # r_k <= prod of the other ranks (else the mode-k unfolding of G can't have rank r_k)
        changed = False
        for k in range(len(r)):
            cap = math.prod(r[:k] + r[k + 1:]) if len(r) > 1 else r[k]
            if r[k] > cap:
                r[k], changed = cap, True
    return r


def tucker_ranks(shape: Sequence[int], ranks) -> list[int]:
    """Normalise ``ranks`` (int or list of d ints) to a valid Tucker rank list for ``shape``.

    An int is clipped to what the shape allows; a list must have d entries >= 1 that are attainable
    (r_k <= n_k, r_k <= product of the other ranks); ValueError otherwise."""
    shape = [int(n) for n in shape]
    d = len(shape)
    if d < 1:
        raise ValueError("Tucker ranks: shape has no modes")
    if isinstance(ranks, bool) or not isinstance(ranks, (int, list, tuple)):
        raise ValueError(f"Tucker ranks for shape {tuple(shape)}: expected an int or a list of {d} ints, got {ranks!r}")
    if isinstance(ranks, int):
        if ranks < 1:
            raise ValueError(f"Tucker ranks for shape {tuple(shape)}: rank must be >= 1, got {ranks}")
        return _clip(shape, [ranks] * d)
    r = [int(v) for v in ranks]
    if len(r) != d:
        raise ValueError(f"Tucker ranks for shape {tuple(shape)}: need a list of {d} ints (one per mode), "
                         f"got length {len(r)}: {r}")
    if min(r) < 1:
        raise ValueError(f"Tucker ranks for shape {tuple(shape)}: ranks must be >= 1, got {r}")
    if _clip(shape, r) != r:
        raise ValueError(f"Tucker ranks {r} for shape {tuple(shape)} are not attainable (need r_k <= n_k and "
                         f"r_k <= product of the other ranks); nearest valid: {_clip(shape, r)}")
    return r


def _mode_dot(t: Tensor, m: Tensor, k: int) -> Tensor:
    """Mode-k product ``t x_k m`` for m of shape (p, t.shape[k])."""
    return torch.movedim(torch.tensordot(m, t, dims=([1], [k])), 0, k)


def tucker_svd(x: Tensor, *, ranks=None, max_rank: int | None = None,
               rel_error: float | None = None) -> tuple[Tensor, list[Tensor]]:
    """ST-HOSVD: ``(core, [U_1, ..., U_d])`` with ``U_k`` (n_k, r_k) orthonormal columns.

    Exactly one of ``ranks`` (int, clipped; or a list of d ints), ``max_rank``, ``rel_error`` (or
    ``max_rank`` with ``rel_error``). With ``rel_error=e`` the result satisfies
    ``||x - tucker_to_full(core, factors)|| <= e ||x||``.
    """
    check_tensor(x, "tucker_svd", min_modes=1)
    check_rank_args("tucker_svd", ranks, max_rank, rel_error)
    shape = list(x.shape)
    d = len(shape)
    r = tucker_ranks(shape, ranks) if ranks is not None else [max_rank] * d if max_rank is not None else [None] * d
    tol_sq = None
    if rel_error is not None:
        tol_sq = (rel_error ** 2) * float(x.to(torch.float64).pow(2).sum()) / d
    core, factors = x, []
    for k in range(d):
        a = torch.movedim(core, k, 0)
        rest = a.shape[1:]
        L, R = truncated_factor(a.reshape(a.shape[0], -1), r[k], tol_sq)
        factors.append(L)
        core = torch.movedim(R.reshape(L.shape[1], *rest), 0, k)
    return core, factors


def tucker_to_full(core: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """Dense tensor ``core x_1 U_1 ... x_d U_d`` of shape ``(U_k.shape[0] for k)``."""
    if core.dim() != len(factors):
        raise ValueError(f"tucker_to_full: core of order {core.dim()} needs {core.dim()} factor matrices, "
                         f"got {len(factors)}")
    t = core
    for k, u in enumerate(factors):
        if u.dim() != 2 or u.shape[1] != t.shape[k]:
            raise ValueError(f"tucker_to_full: factor {k} has shape {tuple(u.shape)}, needs (n, {t.shape[k]})")
        t = _mode_dot(t, u, k)
    return t


def tucker_project(x: Tensor, ranks) -> Tensor:
    """Quasi-optimal projection of ``x`` onto Tucker tensors with ranks <= ``ranks`` (dense result):
    ST-HOSVD at those ranks, rebuilt (error within sqrt(d) of the best; idempotent up to round-off)."""
    return tucker_to_full(*tucker_svd(x, ranks=ranks))


def mode_spectra(x: Tensor) -> list[Tensor]:
    """Squared singular values (descending, float64, ``tt.stable``) of every mode-k unfolding of ``x``."""
    out = []
    for k in range(x.dim()):
        a = torch.movedim(x, k, 0).reshape(x.shape[k], -1).to(torch.float64)
        out.append(stable(torch.flip(torch.linalg.eigvalsh(a @ a.T), [0]).clamp_min(0)))
    return out


def tucker_ranks_for_ratio(shape: Sequence[int], ratio: float, tensor: Tensor | None = None) -> list[int]:
    """Ranks whose Tucker params are <= ``prod(shape) / ratio`` (all-ones when nothing smaller fits).

    With ``tensor``: ``tucker_allocate({"x": tensor}, ratio)["x"]`` (greedy on the spectra).
    Without it: the largest common rank (clipped), then single ranks raised while they fit,
    largest mode first."""
    if not ratio > 0:
        raise ValueError(f"tucker_ranks_for_ratio: ratio must be > 0, got {ratio}")
    shape = [int(n) for n in shape]
    if tensor is not None:
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tucker_ranks_for_ratio: tensor shape {tuple(tensor.shape)} != {tuple(shape)}")
        return tucker_allocate({"x": tensor}, ratio)["x"]
    d, budget = len(shape), math.prod(shape) / ratio
    lo, hi = 1, max(shape)
    while lo < hi:  # params grow with the common rank
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if tucker_params(shape, _clip(shape, [mid] * d)) <= budget else (lo, mid - 1)
    r = _clip(shape, [lo] * d)
    for k in sorted(range(d), key=lambda k: -shape[k]):
        while r[k] < shape[k]:
            c = r[:k] + [r[k] + 1] + r[k + 1:]
            if _clip(shape, c) != c or tucker_params(shape, c) > budget:
                break
            r = c
    return r


def tucker_allocate(tensors: dict, ratio: float) -> dict[str, list[int]]:
    """Ranks for several tensors sharing one budget: total Tucker params <= total size / ``ratio``.

    Objective: ``sum_tensors sum_k log f_k(r_k)``, i.e. the product over tensors of their captured
    energy fractions estimated from the mode spectra as ``prod_k f_k(r_k)`` (``f_k`` = captured
    fraction of the mode-k unfolding at rank r_k; exact for order 2, the usual HOSVD proxy beyond);
    the log keeps any one layer from being starved. Greedy from all-ones: each move
    raises one rank of one tensor (and, where r_k <= prod of the other ranks demands it, that
    tensor's other ranks with the most energy to gain); the move with the largest gain per added
    parameter that fits and gains is taken until none is left. Small tensors get ranks cheaply, so a layer is
    not left at rank 1 because its own share of the budget is tiny."""
    if not ratio > 0:
        raise ValueError(f"tucker_allocate: ratio must be > 0, got {ratio}")
    names = list(tensors)
    shapes = {n: [int(v) for v in tensors[n].shape] for n in names}
    frac = {}
    for n in names:
        cum = [torch.cumsum(sp, 0) for sp in mode_spectra(tensors[n])]
        frac[n] = [(c / c[-1].clamp_min(1e-300)).tolist() for c in cum]
    budget = sum(math.prod(shapes[n]) for n in names) / ratio
    r = {n: [1] * len(shapes[n]) for n in names}
    used = sum(tucker_params(shapes[n], r[n]) for n in names)

    def captured(n, c):  # log of the captured fraction
        return sum(math.log(max(frac[n][k][c[k] - 1], 1e-300)) for k in range(len(c)))

    def move(n, k):
        shape, c = shapes[n], list(r[n])
        if c[k] >= shape[k]:
            return None
        c[k] += 1
        while _clip(shape, c) != c:  # r_k > product of the others: raise the most rewarding other rank
            others = [j for j in range(len(c)) if j != k and c[j] < shape[j]]
            if not others:
                return None
            j = max(others, key=lambda j: frac[n][j][c[j]] - frac[n][j][c[j] - 1])
            c[j] += 1
        return c

    while True:
        best = None
        for n in names:
            base_p, base_c = tucker_params(shapes[n], r[n]), captured(n, r[n])
            for k in range(len(shapes[n])):
                c = move(n, k)
                if c is None:
                    continue
                dp = tucker_params(shapes[n], c) - base_p
                if used + dp > budget:
                    continue
                g = (captured(n, c) - base_c) / max(1, dp)
                if g > 1e-12 and (best is None or g > best[0]):  # no parameters for nothing
                    best = (g, n, c, dp)
        if best is None:
            return r
        _, n, c, dp = best
        r[n], used = c, used + dp
