"""TT/TR convolutions (1d/2d/3d) sharing one implementation, parametrised by spatial dim.

Tensorization (ADMM-TT layout): W (O, I, *kernel) -> modes (o1..op, K, i1..iq), K = prod(kernel):
output-channel cores, then one kernel core, then input-channel cores. Core shapes
(r[k-1], n[k], r[k]); for TR the ring rank r[0] == r[d] closes the chain.
``kernel_mode="in"`` puts the kernel mode in the input core instead: modes (o1..op, K*I), the
last core (r_a, K*I, A) being a small conv I -> r_a per ring index (two steps, no separate
1x1 input stage: fewer passes over the activations, which is what memory-bound layers pay for).

Factorized forward (a sequence of 1x1 convs around one small conv; merged factors cached in eval):
  1. input cores merged to U (r_b, I, A) -> 1x1 conv I -> A*r_b channels (ring index a folded
     into the channel dim, A = ring rank, 1 for TT)
  2. kernel core (r_a, K, r_b) -> conv with the layer's kernel/stride/padding/dilation,
     A*r_b -> A*r_a channels, groups=A (the same small kernel for each ring index)
  3. output cores merged to V (A, O, r_a) -> 1x1 conv A*r_a -> O channels (sums the ring), + bias.
For a 1x1 kernel, steps 1-2 merge into one (strided) 1x1 conv I -> A*r_a; with kernel_mode="in"
steps 1-2 are one conv I -> A*r_a with the layer's kernel (the last core).
Padding is applied only in step 2: 1x1 maps are pointwise linear, so they commute with
zero/reflect/replicate/circular padding. The alternative path rebuilds W and calls F.convNd;
the cheaper one (FLOP estimate for the given input size) is used.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CONV_LAYOUTS
from .base import TNLayer, canonical, chain, chain_flops, check_factors, default_factors

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DENSE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
POINTWISE = ("conv", "gemm")


def _tuple(v, n, what, where):
    if isinstance(v, int):
        return (int(v),) * n
    t = tuple(int(x) for x in v)
    if len(t) != n:
        raise ValueError(f"{where}: {what} {v!r} must be an int or {n} ints")
    return t


class _TNConv(TNLayer):
    dim: int = 2
    kernel_modes: tuple[str, ...] = CONV_LAYOUTS
    pointwise_modes = POINTWISE
    _args_doc = """Args:
    in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode: as
        in ``nn.ConvNd`` (padding: ints, 'same' (stride 1) or 'valid'; padding_mode: zeros,
        reflect, replicate or circular).
    groups: must be 1.
    ranks: an int (clipped to what the tensorized shape allows) or the full list: TT/TR d+1
        values (TT: r[0] == r[d] == 1; TR: r[0] == r[d] is the ring rank), Tucker d values
        (one per mode). Required. Modes: out_factors, prod(kernel_size), in_factors.
    in_factors, out_factors: factorisations of in_channels / out_channels into modes (the
        product must be the channel count). Default: ``n_modes`` balanced modes per side.
    n_modes: number of modes per side when no factors are given (default 2).
    kernel_mode: "own" (default: the kernel mode is a core of its own between the channel cores)
        or "in" (the kernel mode and the input channels form one mode: two steps, conv then 1x1).
    pointwise: how the factorized path runs its 1x1 stages on contiguous (NCHW) inputs: "gemm"
        (default: one batched matrix product per stage, no layout conversion, markedly faster on
        CPU) or "conv" (the convolution kernel; a spec without the key, as written by tn_hf < 0.9,
        means "conv"). Channels-last inputs always take the conv kernel. Same result either way;
        the speed planner picks per layer.
"""

    def __init_subclass__(cls, **kw):
        cls.dense_type = _DENSE[cls.dim]
        super().__init_subclass__(**kw)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", *, ranks, in_factors=None, out_factors=None, n_modes=None,
                 kernel_mode="own", pointwise="gemm"):
        super().__init__()
        spec = type(self).dense_spec_from_args(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            ranks=ranks, in_factors=in_factors, out_factors=out_factors, n_modes=n_modes, kernel_mode=kernel_mode,
            pointwise=pointwise)
        spec["ranks"] = self._spec_ranks(spec, ranks)
        self._spec = spec
        self.in_channels, self.out_channels = spec["in_channels"], spec["out_channels"]
        self.kernel_size, self.stride = tuple(spec["kernel_size"]), tuple(spec["stride"])
        self.padding = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
        self.dilation, self.groups, self.padding_mode = tuple(spec["dilation"]), 1, spec["padding_mode"]
        self.in_factors, self.out_factors = tuple(spec["in_factors"]), tuple(spec["out_factors"])
        self.kernel_mode = spec.get("kernel_mode", "own")
        self.pointwise = spec.get("pointwise", "conv")
        fan_in = self.in_channels * math.prod(self.kernel_size)
        self._init_cores(spec, 1.0 / (3 * fan_in))  # = nn.ConvNd default (kaiming_uniform a=sqrt(5))
        if bias:
            bound = 1.0 / math.sqrt(fan_in)
            self.bias = nn.Parameter(torch.empty(self.out_channels).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        # explicit padding (F.pad) for non-zero modes and asymmetric 'same'
        self._pad, self._conv_padding = self._padding_plan()
        # a 1x1 kernel at stride 1 without padding: the conv is a pointwise map
        self._unit = (math.prod(self.kernel_size) == 1 and max(self.stride) == 1 and self._pad is None
                      and not any(self._conv_padding))

    # ---------------------------------------------------------------- tensorization
    @classmethod
    def dense_spec_from_args(cls, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                             groups=1, bias=True, padding_mode="zeros", *, ranks=None, in_factors=None,
                             out_factors=None, n_modes=None, kernel_mode="own", pointwise="gemm"):
        n = cls.dim
        where = f"{cls.__name__}({in_channels}->{out_channels}, kernel={kernel_size})"
        if groups != 1:
            raise ValueError(f"{where}: groups={groups} is not supported; TN convolutions need groups=1")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"{where}: padding_mode {padding_mode!r}; valid: {PADDING_MODES}")
        ks = _tuple(kernel_size, n, "kernel_size", where)
        st = _tuple(stride, n, "stride", where)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{where}: padding {padding!r}; valid: 'same', 'valid' or ints")
            if padding == "same" and any(s != 1 for s in st):
                raise ValueError(f"{where}: padding='same' needs stride 1, got stride={st}")
            pad: str | list[int] = padding
        else:
            pad = list(_tuple(padding, n, "padding", where))
        if kernel_mode not in cls.kernel_modes:
            raise ValueError(f"{where}: kernel_mode {kernel_mode!r}; valid: {cls.kernel_modes}")
        if pointwise not in POINTWISE:
            raise ValueError(f"{where}: pointwise {pointwise!r}; valid: {POINTWISE}")
        if kernel_mode == "in":  # one mode K*I: the input channels are not factorized
            if in_factors is not None and len(in_factors) != 1:
                raise ValueError(f"{where}: kernel_mode='in' takes one input mode, got in_factors={in_factors}")
            in_factors = [in_channels]
            if out_factors is None and n_modes is None:  # two cores: a rank-r (O, K*I) matrix
                out_factors = [out_channels]
        d_in = len(in_factors) if in_factors is not None else (n_modes or 2)
        d_out = len(out_factors) if out_factors is not None else (n_modes or 2)
        fi = check_factors(in_factors, in_channels, "in_factors", where) if in_factors is not None \
            else default_factors(in_channels, d_in)
        fo = check_factors(out_factors, out_channels, "out_factors", where) if out_factors is not None \
            else default_factors(out_channels, d_out)
        spec = {"class": cls.__name__, "format": cls.format, "in_channels": int(in_channels),
                "out_channels": int(out_channels), "kernel_size": list(ks), "stride": list(st), "padding": pad,
                "dilation": list(_tuple(dilation, n, "dilation", where)), "groups": 1, "bias": bool(bias),
                "padding_mode": padding_mode, "in_factors": list(fi), "out_factors": list(fo), "ranks": ranks}
        if kernel_mode != "own":  # only the non-default layout is written (older specs stay valid)
            spec["kernel_mode"] = kernel_mode
        if pointwise != "conv":  # written when not the kernel older specs (without the key) ran
            spec["pointwise"] = pointwise
        return cls._norm_ranks(spec)

    @classmethod
    def dense_spec(cls, module, *, ranks=None, in_factors=None, out_factors=None, n_modes=None, kernel_mode="own",
                   pointwise="gemm"):
        dense = _DENSE[cls.dim]
        if type(module) is not dense and not isinstance(module, dense):
            raise ValueError(f"{cls.__name__}.dense_spec: expected {dense.__name__}, got {type(module).__name__}")
        return cls.dense_spec_from_args(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.bias is not None, module.padding_mode,
            ranks=ranks, in_factors=in_factors, out_factors=out_factors, n_modes=n_modes, kernel_mode=kernel_mode,
            pointwise=pointwise)

    @classmethod
    def _where(cls, spec):
        return f"{cls.__name__}({spec['in_channels']}->{spec['out_channels']}, kernel={tuple(spec['kernel_size'])})"

    @staticmethod
    def _modes(spec):
        k = math.prod(spec["kernel_size"])
        if spec.get("kernel_mode") == "in":
            return [*spec["out_factors"], k * spec["in_channels"]]
        return [*spec["out_factors"], k, *spec["in_factors"]]

    @classmethod
    def tensorize(cls, weight, spec):
        o, i, k = spec["out_channels"], spec["in_channels"], math.prod(spec["kernel_size"])
        if weight.numel() != o * i * k or weight.shape[0] != o or weight.shape[1] != i:
            raise ValueError(f"{cls._where(spec)}: weight shape {tuple(weight.shape)} does not match")
        return weight.reshape(o, i, k).transpose(1, 2).reshape(cls._modes(spec))

    @classmethod
    def detensorize(cls, tensor, spec):
        o, i, k = spec["out_channels"], spec["in_channels"], math.prod(spec["kernel_size"])
        return tensor.reshape(o, k, i).transpose(1, 2).reshape(o, i, *spec["kernel_size"])

    @classmethod
    def _from_spec(cls, spec):
        return cls(spec["in_channels"], spec["out_channels"], spec["kernel_size"], spec["stride"], spec["padding"],
                   spec["dilation"], spec.get("groups", 1), spec.get("bias", True), spec.get("padding_mode", "zeros"),
                   ranks=spec["ranks"], in_factors=spec["in_factors"], out_factors=spec["out_factors"],
                   kernel_mode=spec.get("kernel_mode", "own"), pointwise=spec.get("pointwise", "conv"))

    # --------------------------------------------------------------------- forward
    def _padding_plan(self):
        n, ks, dil = self.dim, self.kernel_size, self.dilation
        if not isinstance(self.padding, str):
            lr = [(p, p) for p in self.padding]
        elif self.padding == "same":
            lr = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(ks, dil)]
        else:  # "valid"
            lr = [(0, 0)] * n
        self._lr = lr
        if self.padding_mode == "zeros" and all(a == b for a, b in lr):
            return None, tuple(a for a, _ in lr)
        pad = []
        for a, b in reversed(lr):  # F.pad wants the last dim first
            pad += [a, b]
        return tuple(pad), (0,) * n

    def _pad_input(self, x):
        if self._pad is None:
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self._pad, mode=mode)

    def _split(self):
        p = len(self.out_factors)
        return list(self.cores[:p]), self.cores[p], list(self.cores[p + 1:])

    def _out_spatial(self, spatial):
        return [(s + lo + hi - d * (k - 1) - 1) // st + 1 for s, (lo, hi), d, k, st in
                zip(spatial, self._lr, self.dilation, self.kernel_size, self.stride)]

    def _stage_flops(self, input_shape):
        """FLOPs of (merge cores, stage 1, small conv, stage 3) and of the dense path (rebuild, conv)."""
        b, spatial = math.prod(input_shape[:-self.dim - 1]), input_shape[-self.dim:]
        hw_in, hw_out = math.prod(spatial), math.prod(self._out_spatial(spatial))
        r, modes, p = self.ranks, self._modes(self._spec), len(self.out_factors)
        a, ra, rb, k = r[0], r[p], r[p + 1], math.prod(self.kernel_size)
        merge = chain_flops(modes[:p], r[:p + 1]) + chain_flops(modes[p + 1:], r[p + 1:])
        if self.kernel_mode == "in":  # conv I -> A*r_a with the last core, then 1x1 A*r_a -> O
            tn = {"merge": merge, "in": 0, "kernel": 2 * b * hw_out * self.in_channels * a * ra * k,
                  "out": 2 * b * hw_out * a * ra * self.out_channels}
        elif k == 1:  # kernel core merged into the input factor: one strided 1x1 conv I -> A*r_a
            tn = {"merge": merge + 2 * a * ra * rb * self.in_channels, "in": 2 * b * hw_out * self.in_channels * a * ra,
                  "kernel": 0, "out": 2 * b * hw_out * a * ra * self.out_channels}
        else:
            tn = {"merge": merge, "in": 2 * b * hw_in * self.in_channels * a * rb,
                  "kernel": 2 * b * hw_out * a * ra * rb * k, "out": 2 * b * hw_out * a * ra * self.out_channels}
        dense = {"rebuild": chain_flops(modes, r),
                 "conv": 2 * b * hw_out * self.out_channels * self.in_channels * k}
        return tn, dense

    def use_dense_path(self, input_shape) -> bool:
        """Cheaper path by FLOPs; while ``cached`` keeps the merged factors / rebuilt weight (eval,
        no_grad), merging and rebuilding are paid once and don't count."""
        tn, dense = self._stage_flops(input_shape)
        if self.caching():
            return dense["conv"] < tn["in"] + tn["kernel"] + tn["out"]
        return sum(dense.values()) < sum(tn.values())

    def _pointwise(self, w, x, bias=None):
        """1x1 convolution: w (M, C), x (B, C, *spatial) -> (B, M, *spatial). ``pointwise="gemm"``
        and a contiguous x: w @ x over the flattened maps (no layout conversion; which is faster
        depends on the sizes and the machine, so the speed planner measures both); otherwise the
        conv kernel."""
        if self.pointwise == "gemm" and x.is_contiguous():
            b, xs = x.shape[0], x.flatten(2)               # (B, C, L)
            ws = w.expand(b, *w.shape)  # bmm, not matmul: matmul copies x when w requires grad
            y = torch.bmm(ws, xs) if bias is None else \
                torch.baddbmm(bias.view(1, -1, 1).expand(b, -1, xs.shape[2]), ws, xs)
            return y.view(b, w.shape[0], *x.shape[2:])
        n = x.dim() - 2
        return _CONV_FN[n](x, w.contiguous().view(*w.shape, *([1] * n)), bias)

    def _factors(self):
        """The three small weights of the factorized path, merged from the cores:
        w_in (A*r_b, I), kernel (A*r_a, r_b, *k) and w_out (O, A*r_a), all row-major (w_in None
        for kernel_mode "in": kernel (A*r_a, I, *k); kernel None for a 1x1 kernel)."""
        outs, kcore, ins = self._split()
        a = self.cores[0].shape[0]
        v = chain(outs)                                   # (A, O, r_a)
        ra = kcore.shape[0]
        w_out = canonical(v.permute(1, 0, 2).reshape(self.out_channels, a * ra))
        if self.kernel_mode == "in":  # last core (r_a, K*I, A) -> conv weight (A*r_a, I, *k)
            kw = kcore.reshape(ra, -1, self.in_channels, a).permute(3, 0, 2, 1)
            return None, canonical(kw.reshape(a * ra, self.in_channels, *self.kernel_size)), w_out
        u = chain(ins)                                    # (r_b, I, A)
        rb = u.shape[0]
        w_in = u.permute(2, 0, 1).reshape(a * rb, self.in_channels)
        kw = kcore.permute(0, 2, 1).reshape(ra, rb, *self.kernel_size)
        if a > 1:
            kw = kw.repeat(a, *([1] * (self.dim + 1)))
        if math.prod(self.kernel_size) == 1:  # 1x1 kernel: a (r_a, r_b) matrix per ring index, merged into w_in
            kmat = kcore.reshape(ra, rb)
            w_in = torch.block_diag(*([kmat] * a)) @ w_in if a > 1 else kmat @ w_in   # (A*r_a, I)
            return canonical(w_in), None, w_out
        return canonical(w_in), canonical(kw), w_out

    def _factorized(self, x, store=None):
        unbatched = x.dim() == self.dim + 1
        if unbatched:
            x = x.unsqueeze(0)
        w_in, kw, w_out = self._memo(self._store() if store is None else store, "factors", self._factors)
        if self._unit:  # 1x1 kernel, unstrided, unpadded (one of w_in / kw is None): I -> A*r_a
            y = self._pointwise(kw.flatten(1) if w_in is None else w_in, x)
        elif w_in is None:  # kernel_mode "in": one conv I -> A*r_a with the layer's kernel
            y = _CONV_FN[self.dim](self._pad_input(x), kw, None, self.stride, self._conv_padding, self.dilation)
        elif kw is None:  # 1x1 kernel: strided 1x1 conv I -> A*r_a (kernel core merged in)
            w = w_in.view(*w_in.shape, *([1] * self.dim))
            y = _CONV_FN[self.dim](self._pad_input(x), w, None, self.stride, self._conv_padding, self.dilation)
        else:
            y = self._pointwise(w_in, x)                  # (B, A*r_b, ...)
            a = w_in.shape[0] // kw.shape[1]              # ring rank: one group per ring index
            y = _CONV_FN[self.dim](self._pad_input(y), kw, None, self.stride, self._conv_padding, self.dilation, a)
        y = self._pointwise(w_out, y, self.bias)
        return y.squeeze(0) if unbatched else y

    def forward(self, x):
        if x.shape[-self.dim - 1] != self.in_channels:
            raise ValueError(f"{self._where(self._spec)}: input {tuple(x.shape)} has {x.shape[-self.dim - 1]} "
                             f"channels, expected {self.in_channels}")
        store, shape = self._store(), x.shape
        if self._memo(store, shape, lambda: self.use_dense_path(tuple(shape))):   # the path for this input shape
            w = self._memo(store, "weight", lambda: canonical(self.weight))
            return _CONV_FN[self.dim](self._pad_input(x), w, self.bias, self.stride,
                                      self._conv_padding, self.dilation)
        return self._factorized(x, store)

    # -------------------------------------------------------------------- helpers
    def to_dense(self):
        w = self.weight.detach()
        s = self._spec
        m = _DENSE[self.dim](self.in_channels, self.out_channels, s["kernel_size"], s["stride"], s["padding"],
                             s["dilation"], 1, self.bias is not None, self.padding_mode, device=w.device, dtype=w.dtype)
        return self._filled(m)

    def dense_params(self) -> int:
        return self.out_channels * self.in_channels * math.prod(self.kernel_size) + \
            (self.out_channels if self.bias is not None else 0)

    def contract(self, x):
        """Forward by the factorized path (1x1 conv, small conv, 1x1 conv; no dense weight)."""
        return self._factorized(x)

    def _path_flops(self, input_shape):
        tn, dense = self._stage_flops(tuple(input_shape))
        return sum(tn.values()), sum(dense.values()), self.use_dense_path(tuple(input_shape))

    def flops(self, input_shape) -> int:
        tn, dense = self._stage_flops(tuple(input_shape))
        return min(sum(tn.values()), sum(dense.values()))

    def dense_flops(self, input_shape) -> int:
        return self._stage_flops(tuple(input_shape))[1]["conv"]

    def _shape_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, in_factors={self.in_factors}, out_factors={self.out_factors}"
                + (f", kernel_mode={self.kernel_mode!r}" if self.kernel_mode != "own" else "")
                + (f", pointwise={self.pointwise!r}" if self.pointwise != "conv" else ""))


class TTConv1d(_TNConv):
    format, dim = "tt", 1


class TTConv2d(_TNConv):
    format, dim = "tt", 2


class TTConv3d(_TNConv):
    format, dim = "tt", 3


class TRConv1d(_TNConv):
    format, dim = "tr", 1


class TRConv2d(_TNConv):
    format, dim = "tr", 2


class TRConv3d(_TNConv):
    format, dim = "tr", 3
