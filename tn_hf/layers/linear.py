"""TTLinear / TRLinear: the weight (out_features, in_features) as a TT/TR matrix.

Tensorization: W reshaped to (o1..od, i1..id), modes paired as (o_k, i_k) and merged,
so core k has shape (r[k-1], o_k * i_k, r[k]) (the pair flattened out-major).

Default layout (TT, no factors or n_modes given): two cores with in_factors (1, I) and
out_factors (O, 1), i.e. W = B A with B = core0 (O, r) and A = core1 (r, I). Among TT-matrix
layouts of a given size it is the one whose forward costs least: 2 r (I + O) FLOPs per row
of x, exactly twice its parameter count, run as two GEMMs (``x A^T B^T``). Balanced
multi-mode layouts (``n_modes`` or explicit factors) cost r^2-times-mode FLOPs per row and
win only at very high compression. TR keeps the balanced default (its ring rank multiplies
the cost of a two-core ring).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import TNLayer, _missing, chain_flops, pair_factors

# The core sweep runs as several small einsums with reshapes/permutes between them; measured on
# CPU it reaches roughly half the FLOP rate of one large GEMM, so its FLOPs count double when
# choosing the forward path.
SWEEP_OVERHEAD = 2.0


class _LinearLayer(TNLayer):
    """What every TN nn.Linear shares: constructor, spec, dense module, accounting, the forward
    with bias. Subclasses choose the factors (``_side_factors``) and the tensorization."""

    dense_type = nn.Linear
    _args_doc = """Args:
    in_features, out_features, bias: as in ``nn.Linear``.
    ranks: an int (clipped to what the tensorized shape allows) or the full list: TT/TR d+1
        values (TT: r[0] == r[d] == 1; TR: r[0] == r[d] is the ring rank), Tucker d values
        (one per mode). Required.
    in_factors, out_factors: factorisations of in_features / out_features into modes (the
        product must be the size). Default: TT two-core (1, I), (O, 1); TR balanced; Tucker two
        balanced modes per side.
    n_modes: number of modes per side when no factors are given.
    init_var: variance of the rebuilt weight at init (default nn.Linear's, 1 / (3 in_features)).
"""

    def __init__(self, in_features, out_features, bias=True, *, ranks, in_factors=None, out_factors=None,
                 n_modes=None, init_var=None):
        super().__init__()
        spec = type(self).dense_spec_from_sizes(in_features, out_features, bias, ranks=ranks,
                                                in_factors=in_factors, out_factors=out_factors, n_modes=n_modes)
        spec["ranks"] = self._spec_ranks(spec, ranks)
        self._spec = spec
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.in_factors, self.out_factors = tuple(spec["in_factors"]), tuple(spec["out_factors"])
        # nn.Linear default init: kaiming_uniform(a=sqrt(5)) -> Var(W) = 1 / (3 * fan_in)
        self._init_cores(spec, init_var if init_var is not None else 1.0 / (3 * in_features))
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    # ---------------------------------------------------------------- tensorization
    @classmethod
    def _side_factors(cls, in_features: int, out_features: int, in_factors, out_factors, n_modes,
                      where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(in_factors, out_factors) of a layer: the given ones checked, the default ones filled in."""
        raise _missing(cls, "_side_factors")

    @classmethod
    def dense_spec_from_sizes(cls, in_features, out_features, bias=True, *, ranks=None, in_factors=None,
                              out_factors=None, n_modes=None):
        where = f"{cls.__name__}({in_features}->{out_features})"
        fi, fo = cls._side_factors(int(in_features), int(out_features), in_factors, out_factors, n_modes, where)
        spec = {"class": cls.__name__, "format": cls.format, "in_features": int(in_features),
                "out_features": int(out_features), "bias": bool(bias), "in_factors": list(fi),
                "out_factors": list(fo), "ranks": ranks}
        return cls._norm_ranks(spec)

    @classmethod
    def dense_spec(cls, module, *, ranks=None, in_factors=None, out_factors=None, n_modes=None):
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{cls.__name__}.dense_spec: expected nn.Linear, got {type(module).__name__}")
        return cls.dense_spec_from_sizes(module.in_features, module.out_features, module.bias is not None,
                                         ranks=ranks, in_factors=in_factors, out_factors=out_factors,
                                         n_modes=n_modes)

    @classmethod
    def _where(cls, spec):
        return f"{cls.__name__}({spec['in_features']}->{spec['out_features']})"

    @classmethod
    def _from_spec(cls, spec):
        return cls(spec["in_features"], spec["out_features"], spec.get("bias", True), ranks=spec["ranks"],
                   in_factors=spec["in_factors"], out_factors=spec["out_factors"])

    # --------------------------------------------------------------------- forward
    def _contract(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, I) -> (B, O) without the dense weight and without the bias."""
        raise _missing(type(self), "_contract")

    def contract(self, x, **kw):
        """Forward without the dense weight (bias included); see the subclass's ``_contract``."""
        y = self._contract(x.reshape(-1, self.in_features), **kw)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _linear_weight(self) -> torch.Tensor:
        """The rebuilt weight as ``F.linear`` takes it, (out_features, in_features)."""
        return self.weight

    def _check_input(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self._where(self._spec)}: input last dim {x.shape[-1]} != in_features "
                             f"{self.in_features}")

    # -------------------------------------------------------------------- helpers
    def to_dense(self) -> nn.Linear:
        w = self.weight.detach()
        return self._filled(nn.Linear(self.in_features, self.out_features, self.bias is not None,
                                      device=w.device, dtype=w.dtype))

    def dense_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def dense_flops(self, input_shape) -> int:
        return 2 * math.prod(input_shape[:-1]) * self.in_features * self.out_features

    def _shape_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"in_factors={self.in_factors}, out_factors={self.out_factors}")


class _TNLinear(_LinearLayer):
    @classmethod
    def _side_factors(cls, in_features, out_features, in_factors, out_factors, n_modes, where):
        if cls.format == "tt" and in_factors is None and out_factors is None and n_modes is None:
            in_factors, out_factors = (1, in_features), (out_features, 1)
        fi, fo = pair_factors(in_features, out_features, in_factors, out_factors, n_modes, where)
        if len(fi) != len(fo):
            raise ValueError(f"{where}: in_factors {fi} and out_factors {fo} must have the same length "
                             f"(modes are paired (out_k, in_k))")
        return fi, fo

    @staticmethod
    def _modes(spec):
        return [o * i for o, i in zip(spec["out_factors"], spec["in_factors"])]

    @classmethod
    def tensorize(cls, weight, spec):
        fo, fi = spec["out_factors"], spec["in_factors"]
        d = len(fo)
        if tuple(weight.shape) != (math.prod(fo), math.prod(fi)):
            raise ValueError(f"{cls._where(spec)}: weight shape {tuple(weight.shape)} "
                             f"!= {(math.prod(fo), math.prod(fi))}")
        perm = [p for k in range(d) for p in (k, d + k)]
        return weight.reshape(*fo, *fi).permute(perm).reshape(cls._modes(spec))

    @classmethod
    def detensorize(cls, tensor, spec):
        fo, fi = spec["out_factors"], spec["in_factors"]
        d = len(fo)
        t = tensor.reshape([x for k in range(d) for x in (fo[k], fi[k])])
        perm = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
        return t.permute(perm).reshape(math.prod(fo), math.prod(fi))

    # --------------------------------------------------------------------- forward
    @staticmethod
    def _sweep_flops(fo, fi, r, batch) -> int:
        a, f, o_done = r[0], 0, 1
        for k in range(len(fo)):
            f += 2 * batch * o_done * a * (r[k] if k else 1) * fi[k] * math.prod(fi[k + 1:]) * fo[k] * r[k + 1]
            o_done *= fo[k]
        return f

    def _sweep_costs(self, batch: int):
        """FLOPs of contracting the cores first-to-last and last-to-first."""
        fo, fi, r = self.out_factors, self.in_factors, self.ranks
        return self._sweep_flops(fo, fi, r, batch), self._sweep_flops(fo[::-1], fi[::-1], r[::-1], batch)

    def _contract_flops(self, batch: int) -> int:
        return min(self._sweep_costs(batch))

    def _dense_path_flops(self, batch: int) -> int:
        return chain_flops(self._modes(self._spec), self.ranks) + 2 * batch * self.in_features * self.out_features

    @property
    def low_rank(self) -> bool:
        """Two-core TT with in_factors (1, I), out_factors (O, 1): the forward is two GEMMs."""
        return (self.format == "tt" and len(self.in_factors) == 2 and self.in_factors[0] == 1
                and self.out_factors[1] == 1)

    def use_dense_path(self, batch: int) -> bool:
        """Cheaper path by FLOPs (the sweep weighted by SWEEP_OVERHEAD unless it is two GEMMs); while
        ``cached`` keeps the rebuilt weight (eval, no_grad), the rebuild does not count."""
        overhead = 1.0 if self.low_rank else SWEEP_OVERHEAD
        dense = 2 * batch * self.in_features * self.out_features if self.caching() else self._dense_path_flops(batch)
        return dense < overhead * self._contract_flops(batch)

    def _low_rank_factors(self):
        r = self.cores[0].shape[-1]
        return (self.cores[1].reshape(r, self.in_features).contiguous(),
                self.cores[0].reshape(self.out_features, r).contiguous())

    def _sweep_cores(self, reverse):
        """Cores as (r, o_k, i_k, q) in sweep order (reversed ring: transposed, last first)."""
        fo, fi, cores = list(self.out_factors), list(self.in_factors), list(self.cores)
        if reverse:
            fo, fi, cores = fo[::-1], fi[::-1], [c.permute(2, 1, 0) for c in cores[::-1]]
        return [c.reshape(c.shape[0], o, i, -1).contiguous() for c, o, i in zip(cores, fo, fi)]

    def _contract(self, x, reverse=None):
        """x (B, I) -> (B, O) by contracting the cores one at a time (no dense weight).

        The sweep runs first-to-last or last-to-first core, whichever costs fewer FLOPs; the
        reversed sweep is the same sweep over the reversed ring (cores transposed)."""
        fo, fi = list(self.out_factors), list(self.in_factors)
        if reverse is None:
            fwd, bwd = self._sweep_costs(x.shape[0])
            reverse = bwd < fwd
        b, d = x.shape[0], len(fo)
        cores = self.cached(("sweep", bool(reverse)), lambda: self._sweep_cores(reverse))
        if reverse:
            fo, fi = fo[::-1], fi[::-1]
            x = x.reshape(b, *fi[::-1]).permute(0, *range(d, 0, -1)).reshape(b, -1)
        a = cores[0].shape[0]
        t = torch.einsum("bis,aoiq->boaqs", x.reshape(b, fi[0], -1), cores[0])  # (B, O, A, r, I_rest)
        for k in range(1, d):
            g = cores[k]
            t = t.reshape(b, t.shape[1], a, g.shape[0], fi[k], -1)
            t = torch.einsum("bOaris,roiq->bOoaqs", t, g)
            t = t.reshape(b, -1, a, g.shape[-1], t.shape[-1])
        t = t.reshape(b, -1, a, a)
        y = torch.diagonal(t, dim1=2, dim2=3).sum(-1) if a > 1 else t.reshape(b, -1)
        if reverse:
            y = y.reshape(b, *fo).permute(0, *range(d, 0, -1)).reshape(b, -1)
        return y

    def forward(self, x):
        self._check_input(x)
        store, n = self._store(), math.prod(x.shape[:-1])
        if self._memo(store, ("path", n), lambda: self.use_dense_path(n)):
            return F.linear(x, self._memo(store, "weight", self._linear_weight), self.bias)
        if self.low_rank:
            a, b = self._memo(store, "low_rank", self._low_rank_factors)
            return F.linear(F.linear(x, a), b, self.bias)
        return self.contract(x)

    # -------------------------------------------------------------------- helpers
    def _path_flops(self, input_shape):
        b = math.prod(input_shape[:-1])
        return self._contract_flops(b), self._dense_path_flops(b), self.use_dense_path(b)

    def flops(self, input_shape) -> int:
        """FLOPs of the forward path this layer takes for that input shape."""
        contract, rebuild, use_rebuild = self._path_flops(input_shape)
        return rebuild if use_rebuild else contract


class TTLinear(_TNLinear):
    """``nn.Linear`` with a Tensor-Train matrix weight (modes (o_k, i_k) paired per core)."""
    format = "tt"


class TRLinear(_TNLinear):
    """``nn.Linear`` with a Tensor-Ring matrix weight (modes (o_k, i_k) paired per core)."""
    format = "tr"
