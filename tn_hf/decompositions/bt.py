"""Block-term (BT) format: a sum of N Tucker blocks (Ye et al., CVPR 2018, BT-LSTM).

A BT tensor of shape (n_1, ..., n_d) with N blocks of multilinear ranks (r_1, ..., r_d) is

    X = sum_{b=1}^{N} G_b x_1 U_{b,1} x_2 U_{b,2} ... x_d U_{b,d}

stored as one core tensor ``core`` (N, r_1, ..., r_d) (block b's core is ``core[b]``) and one
factor tensor per mode ``factors[k]`` (N, n_k, r_k). It holds ``N * (prod(r) + sum(n_k r_k))``
numbers. N = 1 is Tucker; r_k = 1 for every k is CP of rank N.

Ranks are the list ``[N, r_1, ..., r_d]`` (the shape of ``core``). An int r means
``[DEFAULT_BLOCKS, r, ..., r]`` with every r_k clipped as for Tucker (r_k <= n_k and r_k <= the
product of the other ranks).

Decomposition (``bt_decompose``). Unlike the truncated SVD (matrices), TT-SVD or ST-HOSVD, a
best BT approximation at given ranks has no closed form, and for N >= 2 it need not exist (the
set of BT tensors of given ranks is not closed: CP, the case r_k = 1, already shows it). What is
computed is a local solution by block coordinate descent, with these guarantees:

1. Initialisation by successive Tucker fits of residuals: block 1 is fitted to X, block b to
   X minus blocks 1..b-1, each by ST-HOSVD followed by HOOI steps.
2. Sweeps: each block in turn is refitted to X minus the other blocks by one HOOI step started
   from its current factors: for each mode k, U_k = the leading r_k left singular vectors of the
   mode-k unfolding of ``R x_{j != k} U_j^T`` (R the block's residual target), then the core
   G = R x_1 U_1^T ... x_d U_d^T, the least-squares core for orthonormal factors.

Every HOOI update maximises ``||R x U^T||`` over one factor with the others fixed and the core
is then optimal, so no update increases ``||R - G x U||``: the relative error ``||X - X_hat|| /
||X||`` is non-increasing from sweep to sweep (up to round-off; ``BTResult.history``). Sweeps
stop after ``sweeps`` or when a sweep improves the error by less than ``tol`` (relative). At full
ranks (r_k = n_k) block 1 is exact and the error is zero. The projection used by ADMM's Z-step
(``bt_project``) is this decomposition rebuilt: it is not the nearest BT tensor and not
idempotent in general, but its error is at most that of the ST-HOSVD of X with one block.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .tt import check_tensor, truncated_factor
from .tucker import _mode_dot, tucker_allocate, tucker_params, tucker_ranks, tucker_ranks_for_ratio, tucker_svd

__all__ = ["DEFAULT_BLOCKS", "BTResult", "bt_ranks", "bt_params", "bt_decompose", "bt_to_full", "bt_project",
           "bt_ranks_for_ratio", "bt_allocate"]

DEFAULT_BLOCKS = 2   # blocks of an int rank / a rank chosen for a ratio
DEFAULT_SWEEPS = 10  # block coordinate descent sweeps of bt_decompose
INIT_HOOI = 2        # HOOI steps per block in the initial successive fits


class BTResult(NamedTuple):
    """A block-term decomposition: ``core`` (N, r_1..r_d), ``factors[k]`` (N, n_k, r_k) with
    orthonormal columns per block, its relative error ``||x - bt_to_full(core, factors)|| / ||x||``
    and ``history``: that error after the initialisation and after every sweep (non-increasing)."""
    core: Tensor
    factors: list[Tensor]
    rel_error: float
    history: list[float]


def bt_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Numbers stored by a BT tensor with ranks ``[N, r_1..r_d]``: ``N * (prod(r) + sum(n_k r_k))``."""
    if len(ranks) != len(shape) + 1:
        raise ValueError(f"bt_params: shape {tuple(shape)} needs {len(shape) + 1} ranks [N, r_1..r_d], "
                         f"got {list(ranks)}")
    return int(ranks[0]) * tucker_params(shape, list(ranks[1:]))


def bt_ranks(shape: Sequence[int], ranks) -> list[int]:
    """Normalise ``ranks`` to ``[N, r_1, ..., r_d]`` for ``shape``: an int r is ``DEFAULT_BLOCKS``
    blocks of rank r (clipped); a list needs d+1 ints, N >= 1 and attainable block ranks (ValueError
    naming what is wrong otherwise)."""
    shape = [int(n) for n in shape]
    d = len(shape)
    if isinstance(ranks, bool) or not isinstance(ranks, (int, list, tuple)):
        raise ValueError(f"BT ranks for shape {tuple(shape)}: expected an int or a list [N, r_1..r_{d}] "
                         f"({d + 1} ints), got {ranks!r}")
    if isinstance(ranks, int):
        return [DEFAULT_BLOCKS, *tucker_ranks(shape, ranks)]
    r = [int(v) for v in ranks]
    if len(r) != d + 1:
        raise ValueError(f"BT ranks for shape {tuple(shape)}: need a list [N, r_1..r_{d}] of {d + 1} ints "
                         f"(blocks, then one rank per mode), got length {len(r)}: {r}")
    if r[0] < 1:
        raise ValueError(f"BT ranks for shape {tuple(shape)}: the number of blocks N = r[0] must be >= 1, got {r}")
    try:
        return [r[0], *tucker_ranks(shape, r[1:])]
    except ValueError as e:
        raise ValueError(f"BT ranks {r}: {e}") from None


def bt_to_full(core: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """Dense tensor ``sum_b core[b] x_1 factors[0][b] ... x_d factors[d-1][b]``."""
    if core.dim() != len(factors) + 1:
        raise ValueError(f"bt_to_full: core of shape {tuple(core.shape)} (N, r_1..r_d) needs {core.dim() - 1} "
                         f"factor tensors, got {len(factors)}")
    n = core.shape[0]
    for k, u in enumerate(factors):
        if u.dim() != 3 or u.shape[0] != n or u.shape[2] != core.shape[k + 1]:
            raise ValueError(f"bt_to_full: factor {k} has shape {tuple(u.shape)}, needs ({n}, n_{k + 1}, "
                             f"{core.shape[k + 1]})")
    out = None
    for b in range(n):
        t = core[b]
        for k, u in enumerate(factors):
            t = _mode_dot(t, u[b], k)
        out = t if out is None else out + t
    assert out is not None
    return out


def _project_core(x: Tensor, us: Sequence[Tensor]) -> Tensor:
    for k, u in enumerate(us):
        x = _mode_dot(x, u.T, k)
    return x


def _hooi_step(target: Tensor, us: list[Tensor], ranks: Sequence[int]) -> Tensor:
    """One HOOI sweep over the modes of ``target`` (factors ``us`` updated in place); returns the core."""
    d = target.dim()
    for k in range(d):
        y = target
        for j in range(d):
            if j != k:
                y = _mode_dot(y, us[j].T, j)
        a = torch.movedim(y, k, 0).reshape(target.shape[k], -1)
        us[k] = truncated_factor(a, int(ranks[k]))[0]
    return _project_core(target, us)


def _block(core: Tensor, us: Sequence[Tensor]) -> Tensor:
    t = core
    for k, u in enumerate(us):
        t = _mode_dot(t, u, k)
    return t


def bt_decompose(x: Tensor, *, ranks=None, compression_ratio: float | None = None,
                 n_blocks: int = DEFAULT_BLOCKS, sweeps: int = DEFAULT_SWEEPS, tol: float = 1e-6,
                 init: Sequence[Tensor] | None = None) -> BTResult:
    """Block-term decomposition of ``x`` at ``ranks`` (an int or ``[N, r_1..r_d]``) or at a
    ``compression_ratio`` (``n_blocks`` blocks, ranks from ``bt_ranks_for_ratio``); see the module
    docstring for the algorithm and what it guarantees. Computed in ``x``'s dtype.

    ``init``: ``[core, *factors]`` of a nearby tensor at these ranks (a warm start: ADMM's previous
    Z): the sweeps start from it instead of the successive Tucker fits."""
    check_tensor(x, "bt_decompose", min_modes=1)
    if (ranks is None) == (compression_ratio is None):
        raise ValueError("bt_decompose: give exactly one of ranks= or compression_ratio= (a block-term "
                         "decomposition is fitted at fixed ranks; it has no error-driven truncation)")
    if not (isinstance(sweeps, int) and sweeps >= 0):
        raise ValueError(f"bt_decompose: sweeps must be an int >= 0, got {sweeps!r}")
    shape = list(x.shape)
    r = bt_ranks(shape, ranks) if ranks is not None else \
        bt_ranks_for_ratio(shape, float(compression_ratio), x, n_blocks)  # type: ignore[arg-type]  # one is set
    n, br = r[0], r[1:]
    norm = float(x.norm()) or 1.0
    cores, facs, blocks = [], [], []
    resid = x
    if init is not None:
        want = [tuple(r)] + [(n, m, k) for m, k in zip(shape, br)]
        if [tuple(t.shape) for t in init] != want:
            raise ValueError(f"bt_decompose: init shapes {[tuple(t.shape) for t in init]} do not match the ranks "
                             f"{r} of a tensor of shape {tuple(shape)} (need {want})")
        for b in range(n):
            cores.append(init[0][b].to(x.dtype))
            facs.append([u[b].to(x.dtype) for u in init[1:]])
            blocks.append(_block(cores[b], facs[b]))
            resid = resid - blocks[b]
    for _ in range(n if init is None else 0):  # successive Tucker fits of the residuals
        g, us = tucker_svd(resid, ranks=br)
        for _ in range(INIT_HOOI):
            g = _hooi_step(resid, us, br)
        blk = _block(g, us)
        cores.append(g)
        facs.append(us)
        blocks.append(blk)
        resid = resid - blk
    history = [float(resid.norm()) / norm]
    total = x - resid
    for _ in range(sweeps):
        for b in range(n):  # block coordinate descent: refit block b to what the others leave
            target = x - (total - blocks[b])
            cores[b] = _hooi_step(target, facs[b], br)
            new = _block(cores[b], facs[b])
            total = total - blocks[b] + new
            blocks[b] = new
        history.append(float((x - total).norm()) / norm)
        if history[-2] - history[-1] <= tol * max(history[-2], 1e-30):
            break
    core = torch.stack(cores)
    factors = [torch.stack([facs[b][k] for b in range(n)]) for k in range(len(shape))]
    return BTResult(core, factors, history[-1], history)


def bt_project(x: Tensor, ranks) -> Tensor:
    """Dense BT approximation of ``x`` at ``ranks`` (``[N, r_1..r_d]`` or an int): ``bt_decompose``
    rebuilt (ADMM's Z-step; a local solution, see the module docstring)."""
    res = bt_decompose(x, ranks=ranks)
    return bt_to_full(res.core, res.factors)


def _blocks_that_fit(shape: Sequence[int], ratio: float, n_blocks: int) -> int:
    """``n_blocks``, lowered (to 1 at least) while even rank-1 blocks exceed the budget."""
    if not (isinstance(n_blocks, int) and n_blocks >= 1):
        raise ValueError(f"BT: n_blocks must be an int >= 1, got {n_blocks!r}")
    one = tucker_params(shape, [1] * len(shape))
    return max(1, min(n_blocks, int(math.prod(shape) / ratio // one)))


def bt_ranks_for_ratio(shape: Sequence[int], ratio: float, tensor: Tensor | None = None,
                       n_blocks: int = DEFAULT_BLOCKS) -> list[int]:
    """Ranks ``[N, r_1..r_d]`` whose BT params are <= ``prod(shape) / ratio``: N = ``n_blocks``
    (fewer when even rank-1 blocks do not fit), every block at the Tucker ranks of
    ``tucker_ranks_for_ratio`` for ``N * ratio`` (from ``tensor``'s mode spectra when given)."""
    if not ratio > 0:
        raise ValueError(f"bt_ranks_for_ratio: ratio must be > 0, got {ratio}")
    shape = [int(v) for v in shape]
    n = _blocks_that_fit(shape, ratio, n_blocks)
    return [n, *tucker_ranks_for_ratio(shape, ratio * n, tensor)]


def bt_allocate(tensors: dict, ratio: float, n_blocks: int = DEFAULT_BLOCKS) -> dict[str, list[int]]:
    """Ranks for several tensors sharing one budget (total BT params <= total size / ``ratio``):
    ``n_blocks`` blocks each, the block ranks from ``tucker_allocate`` at ``n_blocks * ratio``; a
    tensor whose blocks would together outgrow it (its spectrum asks for near-full ranks) keeps
    fewer blocks, one at least."""
    if not ratio > 0:
        raise ValueError(f"bt_allocate: ratio must be > 0, got {ratio}")
    if not (isinstance(n_blocks, int) and n_blocks >= 1):
        raise ValueError(f"bt_allocate: n_blocks must be an int >= 1, got {n_blocks!r}")
    out = {}
    for k, r in tucker_allocate(tensors, ratio * n_blocks).items():
        shape = tensors[k].shape
        out[k] = [max(1, min(n_blocks, tensors[k].numel() // tucker_params(shape, r))), *r]
    return out
