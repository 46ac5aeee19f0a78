"""Tucker layers: Linear, Conv1d/2d/3d, LSTM/GRU with a weight in Tucker form (ADA-Tucker, seed 002).

A weight is reshaped into a tensor of order d (tensorization below) and stored as

    T = G x_1 U_1 ... x_d U_d,     cores = [G (r_1..r_d), U_1 (n_1, r_1), ..., U_d (n_d, r_d)]

(state-dict keys ``cores.0`` = core, ``cores.k`` = factor matrix k), so a layer holds
``prod(r) + sum(n_k r_k)`` numbers. Unlike TT/TR the modes are not paired: any order per side.

Tensorization
  Linear W (O, I): modes (o_1..o_p, i_1..i_q), a plain reshape.
  ConvNd W (O, I, *kernel): modes (o_1..o_p, K, i_1..i_q), K = prod(kernel) (the TT/TR layout).

Forward (cost-aware: the cheaper of the two by FLOP count for the input's size)
  factorized: with A = U_{i_1} kron ... kron U_{i_q} (I, S) and B = U_{o_1} kron ... (O, T),
    Linear: y = B (G_(T,S) (A^T x)) + b
    Conv:   1x1 conv with A^T (I -> S channels), then a conv S -> T with the small kernel
            G x_K U_K (T, S, *kernel) and the layer's stride/padding/dilation, then 1x1 conv with B.
  dense: rebuild W = detensorize(G x_1 U_1 ... x_d U_d) and call F.linear / F.convNd.

Initialisation (variance-matched): U_k ~ N(0, 1/r_k) and G ~ N(0, v) give every entry of the
full tensor variance ``prod(r) * v * prod(1/r_k) = v`` = the dense layer's default variance.

Planning (``plan_tucker``, called by ``targeting.plan`` for ``format="tucker"``): ranks at a
compression ratio come from the tensorized weights' mode spectra, over one budget for all
Linear/Conv targets (``decompositions.tucker_allocate``) or per layer. ADA-Tucker's adaptive
reshaping (``ada_reshape``) first picks, per layer, the orders (1-4 per side) and balanced
dimensions whose Tucker approximation at the ratio has the lowest error. SCADA-Tucker's shared
core (``share_core``) makes every Tucker leaf of a model use one core tensor (one parameter; the
leaves' specs carry ``"shared_core": true`` and loading ties the cores again).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..decompositions.tucker import (
    tucker_allocate,
    tucker_params,
    tucker_project,
    tucker_ranks,
    tucker_ranks_for_ratio,
    tucker_svd,
    tucker_to_full,
)
from .base import TNLayer, _missing, check_factors, default_factors
from .conv import _CONV_FN, _TNConv
from .linear import _LinearLayer
from .recurrent import _TNRNN

DEFAULT_SIDE_MODES = 2  # modes per channel side when neither factors nor n_modes are given


def _kron(mats) -> torch.Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


def _rebuild_flops(modes, ranks) -> int:
    """FLOPs of tucker_to_full (mode products in order)."""
    f, shape = 0, list(ranks)
    for k, n in enumerate(modes):
        f += 2 * math.prod(shape) * n
        shape[k] = n
    return f


class _TuckerLeaf(TNLayer):
    """What every Tucker leaf shares: parameters, init, rebuild, decomposition of a dense weight."""

    format = "tucker"

    def _init_cores(self, spec: dict, target_var: float):
        modes, r = self._modes(spec), spec["ranks"]
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.randn(*r) * math.sqrt(target_var))] +
            [nn.Parameter(torch.randn(n, k) / math.sqrt(k)) for n, k in zip(modes, r)])

    @property
    def ranks(self) -> list[int]:
        return list(self.cores[0].shape)

    def full_tensor(self) -> torch.Tensor:
        return tucker_to_full(self.cores[0], list(self.cores[1:]))

    @classmethod
    def _spec_ranks(cls, spec: dict, ranks) -> list[int]:
        if spec["ranks"] is None:
            raise ValueError(f"{cls._where(spec)}: ranks are required (int or list of {len(cls._modes(spec))})")
        return spec["ranks"]

    @classmethod
    def _norm_ranks(cls, spec: dict) -> dict:
        if spec.get("ranks") is not None:
            try:
                spec["ranks"] = tucker_ranks(cls._modes(spec), spec["ranks"])
            except ValueError as e:
                raise ValueError(f"{cls._where(spec)}: {e}") from None
        return spec

    @classmethod
    def decompose_weight(cls, weight, spec, *, ranks=None, max_rank=None, rel_error=None, compression_ratio=None,
                         where=None):
        """(spec with ranks, [G, U_1..U_d]) from ST-HOSVD of ``tensorize(weight, spec)``."""
        where = where or cls._where(spec)
        t = cls.tensorize(weight.detach(), spec)
        if compression_ratio is not None:
            if not compression_ratio > 0:
                raise ValueError(f"{where}: compression_ratio must be > 0, got {compression_ratio}")
            ranks = tucker_ranks_for_ratio(t.shape, compression_ratio, t.float())
        if ranks is None and max_rank is None and rel_error is None:
            raise ValueError(f"{where}: give one of ranks, max_rank, rel_error, compression_ratio")
        try:
            core, factors = tucker_svd(t, ranks=ranks, max_rank=max_rank, rel_error=rel_error)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return dict(spec, ranks=list(core.shape)), [core, *factors]

    @staticmethod
    def _marked(spec, layer):
        """A layer whose spec says its core is shared keeps the mark; its model's cores get tied."""
        if spec.get("shared_core"):
            layer._spec["shared_core"] = True
        return layer

    def _side(self, lo: int, hi: int) -> torch.Tensor:
        """Kronecker product of factor matrices lo..hi-1 (0-based modes): (prod n, prod r)."""
        return _kron([self.cores[1 + k] for k in range(lo, hi)])


class _UnpairedLinear(_LinearLayer):
    """The Linear tensorization of Tucker and BT (modes (o_1..o_p, i_1..i_q), a plain reshape) and
    the forward by FLOPs: a subclass gives ``_costs(batch)`` = (factorized, dense) and ``_contract``."""

    # ---------------------------------------------------------------- tensorization
    @classmethod
    def _side_factors(cls, in_features, out_features, in_factors, out_factors, n_modes, where):
        d = n_modes or DEFAULT_SIDE_MODES
        fi = check_factors(in_factors, in_features, "in_factors", where) if in_factors is not None \
            else default_factors(in_features, d)
        fo = check_factors(out_factors, out_features, "out_factors", where) if out_factors is not None \
            else default_factors(out_features, d)
        return fi, fo

    @staticmethod
    def _modes(spec):
        return [*spec["out_factors"], *spec["in_factors"]]

    @classmethod
    def tensorize(cls, weight, spec):
        shape = (spec["out_features"], spec["in_features"])
        if tuple(weight.shape) != shape:
            raise ValueError(f"{cls._where(spec)}: weight shape {tuple(weight.shape)} != {shape}")
        return weight.reshape(cls._modes(spec))

    @classmethod
    def detensorize(cls, tensor, spec):
        return tensor.reshape(spec["out_features"], spec["in_features"])

    # --------------------------------------------------------------------- forward
    def _costs(self, batch: int) -> tuple[int, int]:
        raise _missing(type(self), "_costs")

    def use_dense_path(self, batch: int) -> bool:
        fact, dense = self._costs(batch)
        return dense < fact

    def forward(self, x):
        self._check_input(x)
        if self.use_dense_path(math.prod(x.shape[:-1])):
            return F.linear(x, self._linear_weight(), self.bias)
        return self.contract(x)

    # -------------------------------------------------------------------- helpers
    def _path_flops(self, input_shape):
        b = math.prod(input_shape[:-1])
        return (*self._costs(b), self.use_dense_path(b))

    def flops(self, input_shape) -> int:
        return min(self._costs(math.prod(input_shape[:-1])))


class TuckerLinear(_UnpairedLinear, _TuckerLeaf):
    """nn.Linear with a Tucker weight (see module docstring)."""

    @classmethod
    def _from_spec(cls, spec):
        return cls._marked(spec, super()._from_spec(spec))

    def _costs(self, batch: int) -> tuple[int, int]:
        """(factorized, dense) FLOPs for ``batch`` rows."""
        p, r = len(self.out_factors), self.ranks
        t, s = math.prod(r[:p]), math.prod(r[p:])
        kron = self.in_features * s + self.out_features * t
        fact = kron + 2 * batch * (self.in_features * s + s * t + t * self.out_features)
        dense = _rebuild_flops(self._modes(self._spec), r) + 2 * batch * self.in_features * self.out_features
        return fact, dense

    def _contract(self, x2):
        """x (B, I) -> (B, O) by the factorized path ``B (G (A^T x))`` (no dense weight)."""
        p = len(self.out_factors)
        a, b = self._side(p, len(self.cores) - 1), self._side(0, p)
        g = self.cores[0].reshape(b.shape[1], a.shape[1])
        return ((x2 @ a) @ g.T) @ b.T


class _TuckerConv(_TuckerLeaf, _TNConv):
    """Tucker convolution; spec, tensorization and padding are the TT/TR convolutions' (conv.py)."""
    kernel_modes = ("own",)  # the factorized forward needs the kernel mode on its own

    @classmethod
    def _from_spec(cls, spec):
        return cls._marked(spec, super()._from_spec(spec))

    def _stage_flops(self, input_shape):
        """FLOPs of the factorized path's stages and of the dense path (rebuild, conv)."""
        b, spatial = math.prod(input_shape[:-self.dim - 1]), input_shape[-self.dim:]
        hw_in, hw_out = math.prod(spatial), math.prod(self._out_spatial(spatial))
        p, r, modes = len(self.out_factors), self.ranks, self._modes(self._spec)
        t, rk, s, k = math.prod(r[:p]), r[p], math.prod(r[p + 1:]), modes[p]
        tn = {"merge": self.in_channels * s + self.out_channels * t + 2 * t * s * rk * k,
              "in": 2 * b * hw_in * self.in_channels * s, "kernel": 2 * b * hw_out * t * s * k,
              "out": 2 * b * hw_out * t * self.out_channels}
        dense = {"rebuild": _rebuild_flops(modes, r),
                 "conv": 2 * b * hw_out * self.out_channels * self.in_channels * k}
        return tn, dense

    def _factorized(self, x, store=None):
        unbatched = x.dim() == self.dim + 1
        if unbatched:
            x = x.unsqueeze(0)
        p = len(self.out_factors)
        a, b, uk = self._side(p + 1, len(self.cores) - 1), self._side(0, p), self.cores[1 + p]
        t, s = b.shape[1], a.shape[1]
        g = self.cores[0].reshape(t, uk.shape[1], s)
        kw = torch.einsum("tcs,kc->tsk", g, uk).reshape(t, s, *self.kernel_size)
        y = self._pointwise(a.T, x)
        y = _CONV_FN[self.dim](self._pad_input(y), kw, None, self.stride, self._conv_padding, self.dilation)
        y = self._pointwise(b, y, self.bias)
        return y.squeeze(0) if unbatched else y


class TuckerConv1d(_TuckerConv):
    dim = 1


class TuckerConv2d(_TuckerConv):
    dim = 2


class TuckerConv3d(_TuckerConv):
    dim = 3


# ----------------------------------------------------------------------------- recurrent
class _TuckerRNN(_TNRNN):
    """LSTM/GRU whose input-to-hidden (and with compress_hidden, hidden-to-hidden) matrices are
    TuckerLinear children (see recurrent.py for the layout and equations)."""

    format = "tucker"

    @classmethod
    def _leaf(cls):
        return TuckerLinear


class TuckerLSTM(_TuckerRNN):
    mode, gates, dense_type = "LSTM", 4, nn.LSTM


class TuckerGRU(_TuckerRNN):
    mode, gates, dense_type = "GRU", 3, nn.GRU


# ----------------------------------------------------------------------------- planning
def _side_orders(n: int, max_order: int = 4) -> list[tuple[int, ...]]:
    """Balanced factorisations of ``n`` into 1..max_order modes (no factor 1 unless n is 1)."""
    out: list[tuple[int, ...]] = [(n,)]
    for d in range(2, max_order + 1):
        f = default_factors(n, d)
        if min(f) > 1:
            out.append(f)
    return out


def tucker_error(cls, weight, spec) -> float:
    """Relative error of the ST-HOSVD of ``tensorize(weight, spec)`` at ``spec["ranks"]``."""
    t = cls.tensorize(weight.detach().float(), spec)
    return float((t - tucker_project(t, spec["ranks"])).norm() / t.norm().clamp_min(1e-30))


def ada_reshape(cls, module, compression_ratio: float, max_order: int = 4) -> tuple[dict, list[dict]]:
    """ADA-Tucker's adaptive dimension choice for one Linear/Conv module.

    Candidates: every pair of balanced factorisations of the output and input sizes into 1..
    ``max_order`` modes (convolutions keep the kernel mode between them); each gets the ranks of
    ``tucker_ranks_for_ratio`` at ``compression_ratio`` and its ST-HOSVD error. Returns the spec
    with the lowest error and every candidate (out_factors, in_factors, ranks, params, rel_error)."""
    (w,) = cls.dense_weights(module).values()
    w = w.detach().float().cpu()
    if isinstance(module, nn.Linear):
        sizes = (module.out_features, module.in_features)
    else:
        sizes = (module.out_channels, module.in_channels)
    cands = []
    for fo, fi in itertools.product(_side_orders(sizes[0], max_order), _side_orders(sizes[1], max_order)):
        spec = cls.dense_spec(module, in_factors=list(fi), out_factors=list(fo))
        t = cls.tensorize(w, spec)
        spec["ranks"] = tucker_ranks_for_ratio(t.shape, compression_ratio, t)
        cands.append({"spec": spec, "out_factors": list(fo), "in_factors": list(fi), "ranks": spec["ranks"],
                      "params": tucker_params(t.shape, spec["ranks"]),
                      "rel_error": tucker_error(cls, w, spec)})
    best = min(cands, key=lambda c: (c["rel_error"], c["params"]))
    return best["spec"], [{k: v for k, v in c.items() if k != "spec"} for c in cands]


def shared_core_spec(cls, module, rank: int, n_modes: int | None = None) -> dict:
    """Spec of order ``d = 2 * n_modes`` (default n_modes 2) with ranks ``(rank,) * d``, the same for
    every layer so that they can share one core: Linear (n_modes out, n_modes in), Conv (n_modes out,
    kernel, n_modes - 1 in). ValueError if a mode is smaller than ``rank``."""
    n = n_modes or DEFAULT_SIDE_MODES
    if isinstance(module, nn.Linear):
        fo, fi = default_factors(module.out_features, n), default_factors(module.in_features, n)
    else:
        if n < 2:
            raise ValueError(f"shared core: convolutions need n_modes >= 2 (got {n})")
        fo, fi = default_factors(module.out_channels, n), default_factors(module.in_channels, n - 1)
    spec = cls.dense_spec(module, in_factors=list(fi), out_factors=list(fo))
    modes = cls._modes(spec)
    if min(modes) < rank or tucker_ranks(modes, rank) != [rank] * len(modes):
        raise ValueError(f"{cls._where(spec)}: a shared core of rank {rank} needs every mode >= {rank}, but the "
                         f"modes are {tuple(modes)}; use a smaller rank or n_modes (valid ranks <= {min(modes)})")
    spec["ranks"] = [rank] * len(modes)
    return spec


def _leaves(model):
    return [m for m in model.modules() if isinstance(m, _TuckerLeaf)]


@torch.no_grad()
def share_core(model: nn.Module, *, sweeps: int = 4, cg_iters: int = 30) -> nn.Parameter:
    """SCADA-Tucker: make every Tucker leaf of ``model`` use one core ``G`` (one nn.Parameter).

    All leaves need the same core shape (``TNConfig(format="tucker", ranks=r, shared_core=True)``
    plans that). The shared core and the factor matrices are fitted to the leaves' current weights
    ``T_l`` by alternating least squares on ``sum_l ||T_l - G x_1 U_l1 ... x_d U_ld||^2``: each
    ``U_lk`` in closed form, ``G`` by conjugate gradients on its normal equations
    ``sum_l G x_k (U_lk^T U_lk) = sum_l T_l x_k U_lk^T``. Idempotent: leaves already sharing one
    core are left as they are. Returns the shared parameter."""
    from ..decompositions.tucker import _mode_dot
    leaves = _leaves(model)
    if not leaves:
        raise ValueError(f"share_core: {type(model).__name__} has no Tucker layer")
    shapes = {tuple(m.cores[0].shape) for m in leaves}
    if len(shapes) != 1:
        raise ValueError(f"share_core: Tucker layers have different core shapes {sorted(shapes)}; a shared core "
                         "needs one shape (TNConfig(format='tucker', ranks=int, shared_core=True))")
    if len({id(m.cores[0]) for m in leaves}) == 1:
        return leaves[0].cores[0]
    ref = leaves[0].cores[0]
    T = [m.full_tensor().double() for m in leaves]
    U = [[u.double().clone() for u in m.cores[1:]] for m in leaves]
    G = max((m.cores[0] for m in leaves), key=lambda c: c.norm()).double().clone()
    d = G.dim()

    def apply(g, mats):
        for k, u in enumerate(mats):
            g = _mode_dot(g, u, k)
        return g

    for _ in range(sweeps):
        for t, us in zip(T, U):  # factor matrices: least squares, one mode at a time
            for k in range(d):
                eye = torch.eye(G.shape[k], dtype=G.dtype, device=G.device)
                m = apply(G, [us[j] if j != k else eye for j in range(d)])
                mk = torch.movedim(m, k, 0).reshape(G.shape[k], -1)
                tk = torch.movedim(t, k, 0).reshape(t.shape[k], -1)
                us[k] = torch.linalg.lstsq(mk.T, tk.T).solution.T
        grams = [[u.T @ u for u in us] for us in U]
        b = sum(apply(t, [u.T for u in us]) for t, us in zip(T, U))
        x = G
        r = b - sum(apply(x, gs) for gs in grams)
        p, rs = r.clone(), float((r * r).sum())
        for _ in range(cg_iters):  # G: conjugate gradients on the normal equations
            if rs < 1e-28:
                break
            ap = sum(apply(p, gs) for gs in grams)
            alpha = rs / float((p * ap).sum())
            x, r = x + alpha * p, r - alpha * ap
            rs_new = float((r * r).sum())
            p, rs = r + (rs_new / rs) * p, rs_new
        G = x
    shared = nn.Parameter(G.to(ref.dtype).to(ref.device))
    for m, us in zip(leaves, U):
        m.cores[0] = shared
        for p_, u in zip(m.cores[1:], us):
            p_.copy_(u)
    return shared


def _tie(leaves) -> None:
    for m in leaves[1:]:
        m.cores[0] = leaves[0].cores[0]


def tie_shared_cores(model) -> None:
    """After compress: fit and tie the shared core, mark the specs (``"shared_core": true``).
    After apply_specs (loading, layers on the meta device): tie, and tie again once the weights are
    loaded (allocating meta parameters gives every module its own tensor)."""
    cfg = getattr(model, "tn_hf_config", None) or {}
    leaves = [m for m in _leaves(model) if m._spec.get("shared_core") or cfg.get("shared_core")]
    if not leaves:
        return
    if any(m.cores[0].is_meta for m in leaves):
        _tie(leaves)
        if not getattr(model, "_tn_hf_tucker_retie", False):
            model.register_load_state_dict_post_hook(lambda mod, keys: _tie(leaves))
            model._tn_hf_tucker_retie = True
        return
    share_core(model)
    specs = getattr(model, "tn_hf_specs", None) or {}
    for name, mod in model.named_modules():
        if mod in leaves:
            mod._spec["shared_core"] = True
            if name in specs:
                specs[name]["shared_core"] = True


def plan_tucker(targets, config) -> None:
    """Ranks (and with ``adaptive_reshape`` the reshaping) of every Tucker target, in place.

    ``compression_ratio``: ranks of the Linear/Conv layers from their tensorized weights' spectra,
    ``allocation="global"``: one budget over all of them (``tucker_allocate``), ``"uniform"``: every
    layer at the ratio (``tucker_ranks_for_ratio``); recurrent layers get it per matrix in
    ``from_dense``. ``adaptive_reshape``: ``ada_reshape`` per Linear/Conv layer first (at the
    ratio), then the allocation over the chosen reshapings. ``shared_core``: ``shared_core_spec``
    per layer; ``compress`` then ties the cores (``share_core``)."""
    for t in targets:
        if t.cls.composite:
            if config.shared_core:
                raise ValueError(f"shared_core: {t.name} ({type(t.module).__name__}) is recurrent; a shared core "
                                 "covers Linear/Conv layers (exclude it or set layer_types=['linear', 'conv'])")
            continue
        if config.shared_core:
            t.spec = shared_core_spec(t.cls, t.module, config.ranks, config.n_modes)
        elif config.adaptive_reshape:
            t.spec = ada_reshape(t.cls, t.module, config.compression_ratio)[0]
    leaves = [t for t in targets if not t.cls.composite]
    if config.compression_ratio is None or config.shared_core or not leaves:
        return
    tensors = {}
    for t in leaves:
        (w,) = t.cls.dense_weights(t.module).values()
        tensors[t.name] = t.cls.tensorize(w.detach().float().cpu(), t.spec)
    if config.allocation == "global":
        ranks = tucker_allocate(tensors, config.compression_ratio)
    else:
        ranks = {n: tucker_ranks_for_ratio(x.shape, config.compression_ratio, x) for n, x in tensors.items()}
    for t in leaves:
        t.spec = dict(t.spec, ranks=ranks[t.name])
