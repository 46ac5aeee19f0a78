"""Tensor-Train: TT-SVD (Oseledets 2011), reconstruction and fast rank-constrained projection.

One mechanism for every truncated SVD in this package: :func:`truncated_factor` returns an
orthonormal left factor ``L`` and ``R = L.T @ A`` for an unfolding ``A`` (so ``L @ R`` is the best
rank-r approximation), computed from the eigendecomposition of the small side's Gram matrix in
float64 (fast for the wide unfoldings of weight tensors), or by a randomized range finder with
power iterations when both sides are large and the rank is small.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["chain", "tt_svd", "tt_to_full", "tt_project", "tt_ranks", "truncated_factor", "unfolding_spectrum"]

# randomized range finder when both sides exceed this and the rank is small
_RANDOMIZED_MIN_SIDE = 2048


# ---------------------------------------------------------------- checks
def check_tensor(x, where: str, min_modes: int = 2) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_modes:
        raise ValueError(f"{where}: tensor of shape {tuple(x.shape)} has {x.dim()} modes; "
                         f"need at least {min_modes} (reshape/factorize it first)")
    if not x.is_floating_point():
        raise ValueError(f"{where}: need a float32/float64 tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{where}: tensor of shape {tuple(x.shape)} contains NaN or inf")
    return x


def check_rank_args(where: str, ranks, max_rank, rel_error):
    given = [n for n, v in (("ranks", ranks), ("max_rank", max_rank), ("rel_error", rel_error)) if v is not None]
    if not given or ("ranks" in given and len(given) > 1):
        raise ValueError(f"{where}: give exactly one of ranks=, max_rank=, rel_error= "
                         f"(or max_rank together with rel_error); got {given or 'none'}")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"{where}: max_rank must be an int >= 1, got {max_rank!r}")
    if rel_error is not None and not (isinstance(rel_error, (int, float)) and 0 <= rel_error < 1):
        raise ValueError(f"{where}: rel_error must be a float in [0, 1), got {rel_error!r}")


def tt_ranks(shape: Sequence[int], ranks) -> list[int]:
    """Normalise ``ranks`` (int or list of length d+1) to a valid TT rank list for ``shape``.

    An int means every internal rank = that int, clipped to what the unfoldings allow.
    A list must have length d+1, ends 1, entries >= 1 and not exceed the possible ranks
    (ValueError otherwise).
    """
    shape = [int(n) for n in shape]
    d = len(shape)
    if d < 2:
        raise ValueError(f"TT ranks: shape {tuple(shape)} has < 2 modes")
    if isinstance(ranks, bool) or not isinstance(ranks, (int, list, tuple)):
        raise ValueError(f"TT ranks for shape {tuple(shape)}: expected an int or a list of {d + 1} ints, got {ranks!r}")
    if isinstance(ranks, int):
        if ranks < 1:
            raise ValueError(f"TT ranks for shape {tuple(shape)}: rank must be >= 1, got {ranks}")
        r = [1] + [ranks] * (d - 1) + [1]
        for k in range(1, d):  # clip forwards and backwards
            r[k] = min(r[k], r[k - 1] * shape[k - 1])
        for k in range(d - 1, 0, -1):
            r[k] = min(r[k], r[k + 1] * shape[k])
        return r
    r = [int(v) for v in ranks]
    if len(r) != d + 1:
        raise ValueError(f"TT ranks for shape {tuple(shape)}: need a list of length {d + 1} "
                         f"(boundary ranks included), got length {len(r)}: {r}")
    if r[0] != 1 or r[-1] != 1:
        raise ValueError(f"TT ranks for shape {tuple(shape)}: boundary ranks must be 1, got {r}")
    if min(r) < 1:
        raise ValueError(f"TT ranks for shape {tuple(shape)}: ranks must be >= 1, got {r}")
    for k in range(1, d):
        cap = min(r[k - 1] * shape[k - 1], shape[k] * r[k + 1], math.prod(shape[:k]), math.prod(shape[k:]))
        if r[k] > cap:
            raise ValueError(f"TT ranks for shape {tuple(shape)}: r[{k}]={r[k]} exceeds the largest "
                             f"possible rank {cap} there; valid ranks: {tt_ranks(shape, max(r))}")
    return r


# ---------------------------------------------------------------- truncated SVD
def _keep_rank(eig_desc: Tensor, rank: int | None, tol_sq: float | None) -> int:
    """Rank to keep given eigenvalues (squared singular values, descending)."""
    n = eig_desc.numel()
    k = n if rank is None else min(rank, n)
    if tol_sq is not None:
        # tail[j] = energy discarded when keeping j values
        tail = torch.flip(torch.cumsum(torch.flip(eig_desc.clamp_min(0), [0]), 0), [0])
        tail = torch.cat([tail, tail.new_zeros(1)])
        ok = torch.nonzero(tail <= tol_sq).flatten()
        k = min(k, int(ok[0]) if ok.numel() else n)
    return max(k, 1)


def _gram_eig(A: Tensor, gram_dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Eigen-pairs of A @ A.T (the product in ``gram_dtype``, eigh in float64), descending."""
    Ag = A.to(gram_dtype)
    w, V = torch.linalg.eigh((Ag @ Ag.T).to(torch.float64))
    return torch.flip(w, [0]), torch.flip(V, [1])


def truncated_factor(A: Tensor, rank: int | None = None, tol_sq: float | None = None) -> tuple[Tensor, Tensor]:
    """Best low-rank factorisation ``A ~= L @ R`` with orthonormal ``L`` (m x k), ``R = L.T @ A``.

    k = ``rank`` and/or the least rank whose discarded squared singular values sum to
    <= ``tol_sq``. Gram eigendecomposition of the smaller side (float64), or a randomized
    range finder (2 power iterations) when both sides are >= 2048 and the rank is small.
    """
    m, n = A.shape
    if rank is not None and tol_sq is None and min(m, n) >= _RANDOMIZED_MIN_SIDE and 4 * rank < min(m, n):
        return _randomized_factor(A, rank)
    # fixed rank (projection): the Gram product in the input's precision is enough to find the
    # leading subspace and halves the cost; an error tolerance needs the small eigenvalues exactly
    gd = A.dtype if tol_sq is None else torch.float64
    if m <= n:
        w, U = _gram_eig(A, gd)
        k = _keep_rank(w, rank, tol_sq)
        L = U[:, :k].to(A.dtype)
    else:
        w, V = _gram_eig(A.T, gd)
        k = _keep_rank(w, rank, tol_sq)
        L = torch.linalg.qr((A.to(gd) @ V[:, :k].to(gd))).Q.to(A.dtype)
    return L, L.T @ A


def _randomized_factor(A: Tensor, rank: int, oversample: int = 10, power_iters: int = 2):
    m, n = A.shape
    g = torch.Generator(device=A.device).manual_seed(0)
    Om = torch.randn(n, min(n, rank + oversample), generator=g, device=A.device, dtype=A.dtype)
    Q = torch.linalg.qr(A @ Om).Q
    for _ in range(power_iters):
        Q = torch.linalg.qr(A.T @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    B = Q.T @ A
    w, Ub = _gram_eig(B)
    L = Q @ Ub[:, :rank].to(A.dtype)
    return L, L.T @ A


SPECTRUM_DIGITS = 9


def stable(x: Tensor, digits: int = SPECTRUM_DIGITS) -> Tensor:
    """``x`` (float64, >= 0) rounded to ``digits`` significant digits: spectra that feed rank choices
    are made independent of the BLAS's summation order (thread count, CPU, library), so that the same
    weights give the same ranks on every machine."""
    scale = torch.pow(10.0, torch.floor(torch.log10(x.clamp_min(1e-300))) - (digits - 1))
    return torch.where(x > 0, torch.round(x / scale) * scale, torch.zeros_like(x))


def unfolding_spectrum(x: Tensor, k: int) -> Tensor:
    """Squared singular values (descending, float64, ``stable``) of the unfolding modes[:k] x modes[k:]."""
    A = x.reshape(math.prod(x.shape[:k]), -1)
    if A.shape[0] > A.shape[1]:
        A = A.T
    A64 = A.to(torch.float64)
    return stable(torch.flip(torch.linalg.eigvalsh(A64 @ A64.T), [0]).clamp_min(0))


# ---------------------------------------------------------------- TT
def tt_sweep(C: Tensor, shape: Sequence[int], r_first: int, ranks: Sequence[int] | None,
             max_rank: int | None, tol_sq: float | None) -> list[Tensor]:
    """Left-to-right TT-SVD sweep of ``C`` (r_first, shape..., [trailing]) -> cores.

    ``ranks[k]`` (if given) caps bond k (1-based internal bonds), ``max_rank`` caps all,
    ``tol_sq`` is the per-step discarded energy. The last core takes all remaining columns.
    """
    d = len(shape)
    cores, r_prev = [], r_first
    C = C.reshape(r_prev * shape[0], -1)
    for k in range(d - 1):
        cap = ranks[k + 1] if ranks is not None else None
        if max_rank is not None:
            cap = max_rank if cap is None else min(cap, max_rank)
        L, C = truncated_factor(C, cap, tol_sq)
        r = L.shape[1]
        cores.append(L.reshape(r_prev, shape[k], r))
        r_prev = r
        C = C.reshape(r_prev * shape[k + 1], -1)
    cores.append(C.reshape(r_prev, shape[-1], -1))
    return cores


def tt_svd(x: Tensor, *, ranks=None, max_rank: int | None = None, rel_error: float | None = None) -> list[Tensor]:
    """TT-SVD: cores ``(r[k-1], n[k], r[k])`` with ``r[0] = r[d] = 1``.

    Exactly one of ``ranks`` (int: every internal rank, clipped; or the full list of d+1),
    ``max_rank``, ``rel_error`` (or ``max_rank`` with ``rel_error``). With ``rel_error=e`` alone
    the result satisfies ``||x - tt_to_full(cores)|| <= e ||x||`` (e/sqrt(d-1) per step).
    """
    check_tensor(x, "tt_svd")
    check_rank_args("tt_svd", ranks, max_rank, rel_error)
    shape = list(x.shape)
    r = tt_ranks(shape, ranks) if ranks is not None else None
    tol_sq = None
    if rel_error is not None:
        tol_sq = (rel_error ** 2) * float(x.to(torch.float64).pow(2).sum()) / (len(shape) - 1)
    return tt_sweep(x, shape, 1, r, max_rank, tol_sq)


def chain(cores: Sequence[Tensor]) -> Tensor:
    """Contract a chain of cores (r0, n1, r1)...(r_{m-1}, n_m, r_m) into (r0, n1*...*n_m, r_m)."""
    r0 = cores[0].shape[0]
    m = cores[0].reshape(-1, cores[0].shape[-1])  # (r0*n1, r1)
    for c in cores[1:]:
        m = (m @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
    return m.reshape(r0, -1, m.shape[-1])


def tt_to_full(cores: Sequence[Tensor]) -> Tensor:
    """Dense tensor of shape ``tuple(c.shape[1] for c in cores)`` from TT cores."""
    if len(cores) < 1:
        raise ValueError("tt_to_full: need at least one core")
    if cores[0].shape[0] != 1 or cores[-1].shape[-1] != 1:
        raise ValueError(f"tt_to_full: boundary ranks must be 1, got {cores[0].shape[0]} and "
                         f"{cores[-1].shape[-1]} (use tr_to_full for tensor rings)")
    return chain(cores).reshape(tuple(c.shape[1] for c in cores))


def tt_project(x: Tensor, ranks) -> Tensor:
    """Quasi-optimal projection of ``x`` onto TT tensors with ranks <= ``ranks`` (dense result).

    TT-SVD at those ranks with the fast truncated factorisation; idempotent up to round-off.
    """
    return tt_to_full(tt_svd(x, ranks=ranks))
