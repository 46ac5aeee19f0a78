"""Block-term layers: Linear, Conv1d/2d/3d, LSTM/GRU with a weight in BT form (Ye et al., CVPR 2018).

A weight is tensorized as for Tucker (``layers.tucker``: Linear modes (o_1..o_p, i_1..i_q), ConvNd
modes (o_1..o_p, K, i_1..i_q)) and stored as a sum of N Tucker blocks

    T = sum_b G_b x_1 U_{b,1} ... x_d U_{b,d},   cores = [G (N, r_1..r_d), U_1 (N, n_1, r_1), ..., U_d (N, n_d, r_d)]

(state-dict keys ``cores.0`` = the blocks' cores, ``cores.k`` = the blocks' factors of mode k), so a
layer holds ``N * (prod(r) + sum(n_k r_k))`` numbers; its ranks are ``[N, r_1..r_d]`` (an int r:
``decompositions.bt.DEFAULT_BLOCKS`` blocks of rank r).

Forward (the cheaper of the two by FLOP count for the input's size)
  factorized: with A_b = U_{b,i_1} kron ... kron U_{b,i_q} (I, S) and B_b likewise (O, T),
    Linear: y = sum_b B_b (G_b (A_b^T x)) + bias, as three products over all blocks at once:
            x -> [A_1 .. A_N]^T x (N S), block-diagonal cores (N T), then [B_1 .. B_N] (O).
    Conv:   1x1 conv I -> N*S channels, a grouped conv (groups=N) N*S -> N*T with the blocks'
            kernels G_b x_K U_{b,K} and the layer's stride/padding/dilation, 1x1 conv N*T -> O.
  dense: rebuild W and call F.linear / F.convNd.

Initialisation (variance-matched): U ~ N(0, 1/r_k) and G ~ N(0, v / N) give every entry of the
full tensor variance ``N * prod(r) * (v / N) * prod(1/r_k) = v``, the dense layer's default.

Planning (``plan_bt``, called by ``targeting.plan`` for ``format="bt"``): like Tucker, ranks at a
compression ratio from the tensorized weights' mode spectra (``decompositions.bt_allocate``:
DEFAULT_BLOCKS blocks, one budget over the Linear/Conv targets; ``allocation="uniform"``: every
layer at the ratio); recurrent layers get theirs per matrix in ``from_dense``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..decompositions.bt import bt_allocate, bt_decompose, bt_ranks, bt_ranks_for_ratio, bt_to_full
from .base import TNLayer
from .conv import _CONV_FN, _TNConv
from .recurrent import _TNRNN
from .tucker import _kron, _rebuild_flops, _UnpairedLinear


class _BTLeaf(TNLayer):
    """What every BT leaf shares: parameters, init, rebuild, decomposition of a dense weight."""

    format = "bt"

    def _init_cores(self, spec: dict, target_var: float):
        modes, (n, *r) = self._modes(spec), spec["ranks"]
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.randn(n, *r) * math.sqrt(target_var / n))] +
            [nn.Parameter(torch.randn(n, m, k) / math.sqrt(k)) for m, k in zip(modes, r)])

    @property
    def ranks(self) -> list[int]:
        return list(self.cores[0].shape)

    def full_tensor(self) -> torch.Tensor:
        return bt_to_full(self.cores[0], list(self.cores[1:]))

    @classmethod
    def _spec_ranks(cls, spec: dict, ranks) -> list[int]:
        if spec["ranks"] is None:
            raise ValueError(f"{cls._where(spec)}: ranks are required (int or [N, r_1..r_{len(cls._modes(spec))}])")
        return spec["ranks"]

    @classmethod
    def _norm_ranks(cls, spec: dict) -> dict:
        if spec.get("ranks") is not None:
            try:
                spec["ranks"] = bt_ranks(cls._modes(spec), spec["ranks"])
            except ValueError as e:
                raise ValueError(f"{cls._where(spec)}: {e}") from None
        return spec

    @classmethod
    def decompose_weight(cls, weight, spec, *, ranks=None, max_rank=None, rel_error=None, compression_ratio=None,
                         where=None):
        """(spec with ranks, [G, U_1..U_d]) from ``bt_decompose`` of ``tensorize(weight, spec)``."""
        where = where or cls._where(spec)
        if rel_error is not None or max_rank is not None:
            raise ValueError(f"{where}: a block-term decomposition is fitted at fixed ranks; give ranks= or "
                             "compression_ratio= (rel_error= / max_rank= are for tt, tr and tucker)")
        t = cls.tensorize(weight.detach(), spec)
        if compression_ratio is not None:
            if not compression_ratio > 0:
                raise ValueError(f"{where}: compression_ratio must be > 0, got {compression_ratio}")
            ranks = bt_ranks_for_ratio(t.shape, compression_ratio, t.float())
        if ranks is None:
            raise ValueError(f"{where}: give ranks= or compression_ratio=")
        try:
            res = bt_decompose(t, ranks=ranks)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return dict(spec, ranks=list(res.core.shape)), [res.core, *res.factors]

    def _sides(self, lo: int, hi: int) -> torch.Tensor:
        """Per block, the Kronecker product of factor matrices lo..hi-1 (0-based modes): (N, prod n, prod r)."""
        return torch.stack([_kron([self.cores[1 + k][b] for k in range(lo, hi)])
                            for b in range(self.cores[0].shape[0])])

    def _dense_rebuild_flops(self) -> int:
        n, *r = self.ranks
        return n * _rebuild_flops(self._modes(self._spec), r) + n * math.prod(self._modes(self._spec))


class BTLinear(_UnpairedLinear, _BTLeaf):
    """nn.Linear with a block-term weight (see module docstring)."""

    def _costs(self, batch: int) -> tuple[int, int]:
        """(factorized, dense) FLOPs for ``batch`` rows."""
        p, (n, *r) = len(self.out_factors), self.ranks
        t, s = math.prod(r[:p]), math.prod(r[p:])
        kron = n * (self.in_features * s + self.out_features * t)
        fact = kron + 2 * batch * n * (self.in_features * s + s * t + t * self.out_features)
        return fact, self._dense_rebuild_flops() + 2 * batch * self.in_features * self.out_features

    def _contract(self, x2):
        """x (B, I) -> (B, O) as ``sum_b B_b (G_b (A_b^T x))`` (no dense weight)."""
        p = len(self.out_factors)
        a, b = self._sides(p, len(self.cores) - 1), self._sides(0, p)   # (N, I, S), (N, O, T)
        n, s, t = a.shape[0], a.shape[2], b.shape[2]
        g = self.cores[0].reshape(n, t, s)
        y = (x2 @ a.permute(1, 0, 2).reshape(self.in_features, n * s)).reshape(-1, n, s)
        y = torch.bmm(y.transpose(0, 1), g.transpose(1, 2))            # (N, B, T)
        return y.transpose(0, 1).reshape(-1, n * t) @ b.permute(0, 2, 1).reshape(n * t, self.out_features)


class _BTConv(_BTLeaf, _TNConv):
    """BT convolution; spec, tensorization and padding are the TT/TR convolutions' (conv.py)."""
    kernel_modes = ("own",)  # the factorized forward needs the kernel mode on its own

    def _stage_flops(self, input_shape):
        """FLOPs of the factorized path's stages and of the dense path (rebuild, conv)."""
        b, spatial = math.prod(input_shape[:-self.dim - 1]), input_shape[-self.dim:]
        hw_in, hw_out = math.prod(spatial), math.prod(self._out_spatial(spatial))
        p, (n, *r), modes = len(self.out_factors), self.ranks, self._modes(self._spec)
        t, rk, s, k = math.prod(r[:p]), r[p], math.prod(r[p + 1:]), modes[p]
        tn = {"merge": n * (self.in_channels * s + self.out_channels * t + 2 * t * s * rk * k),
              "in": 2 * b * hw_in * self.in_channels * n * s, "kernel": 2 * b * hw_out * n * t * s * k,
              "out": 2 * b * hw_out * n * t * self.out_channels}
        dense = {"rebuild": self._dense_rebuild_flops(),
                 "conv": 2 * b * hw_out * self.out_channels * self.in_channels * k}
        return tn, dense

    def _factorized(self, x, store=None):
        unbatched = x.dim() == self.dim + 1
        if unbatched:
            x = x.unsqueeze(0)
        p = len(self.out_factors)
        a, b, uk = self._sides(p + 1, len(self.cores) - 1), self._sides(0, p), self.cores[1 + p]
        n, s, t = a.shape[0], a.shape[2], b.shape[2]
        g = self.cores[0].reshape(n, t, uk.shape[2], s)
        kw = torch.einsum("ntcs,nkc->ntsk", g, uk).reshape(n * t, s, *self.kernel_size)
        y = self._pointwise(a.permute(0, 2, 1).reshape(n * s, self.in_channels), x)
        y = _CONV_FN[self.dim](self._pad_input(y), kw, None, self.stride, self._conv_padding, self.dilation, n)
        y = self._pointwise(b.permute(1, 0, 2).reshape(self.out_channels, n * t), y, self.bias)
        return y.squeeze(0) if unbatched else y


class BTConv1d(_BTConv):
    dim = 1


class BTConv2d(_BTConv):
    dim = 2


class BTConv3d(_BTConv):
    dim = 3


# ----------------------------------------------------------------------------- recurrent
class _BTRNN(_TNRNN):
    """LSTM/GRU whose input-to-hidden (and with compress_hidden, hidden-to-hidden) matrices are
    BTLinear children (see recurrent.py for the layout and equations)."""

    format = "bt"

    @classmethod
    def _leaf(cls):
        return BTLinear


class BTLSTM(_BTRNN):
    mode, gates, dense_type = "LSTM", 4, nn.LSTM


class BTGRU(_BTRNN):
    mode, gates, dense_type = "GRU", 3, nn.GRU


# ----------------------------------------------------------------------------- planning
def plan_bt(targets, config) -> None:
    """Ranks of every BT Linear/Conv target at ``config.compression_ratio``, in place:
    ``allocation="global"``: one budget over all of them (``bt_allocate``), ``"uniform"``: every layer
    at the ratio (``bt_ranks_for_ratio``). Recurrent layers get theirs per matrix in ``from_dense``."""
    leaves = [t for t in targets if not t.cls.composite]
    if config.compression_ratio is None or not leaves:
        return
    tensors = {}
    for t in leaves:
        (w,) = t.cls.dense_weights(t.module).values()
        tensors[t.name] = t.cls.tensorize(w.detach().float().cpu(), t.spec)
    if config.allocation == "global":
        ranks = bt_allocate(tensors, config.compression_ratio)
    else:
        ranks = {n: bt_ranks_for_ratio(x.shape, config.compression_ratio, x) for n, x in tensors.items()}
    for t in leaves:
        t.spec = dict(t.spec, ranks=ranks[t.name])
