"""TT/TR LSTM and GRU: drop-in for nn.LSTM / nn.GRU with the input-to-hidden matrices in TN form.

Per layer l and direction (suffix "" or "_reverse") the module holds
  ih_l{l}{sfx}: TTLinear/TRLinear (G*H x input), its bias is torch's bias_ih_l{l}{sfx}
  weight_hh_l{l}{sfx}, bias_hh_l{l}{sfx}: dense parameters (torch's names), or with
  compress_hidden=True a TN child hh_l{l}{sfx} (bias = bias_hh).
Gate order and equations are torch's (LSTM: i, f, g, o; GRU: r, z, n with b_hn inside r*(...)).
The input projection of all timesteps goes through the TN child in one call, then the
recurrence runs step by step. The TN children are ordinary linear targets for ADMM and rank
allocation (tn_targets); spec["weights"][torch weight name] is each child's spec.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .base import TNLayer, default_modes, tn_targets
from .linear import TRLinear, TTLinear


class _TNRNN(TNLayer):
    composite = True
    _args_doc = """Args:
    input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional: as in
        ``nn.LSTM`` / ``nn.GRU``.
    ranks: ranks of every TN matrix, as for the Linear layers (an int, or a list that fits each
        matrix's modes).
    compress_hidden: also store the hidden-to-hidden matrices in TN form (default: dense).
    in_factors: factorisation of input_size for the first layer's input-to-hidden matrices.
    out_factors: factorisation of gates * hidden_size (the rows of every TN matrix).
    n_modes: number of modes per side when no factors are given (default: 2 or 3 as the sizes allow,
        for TT too: not the two-core low-rank form of ``TTLinear``).
    proj_size: must be 0.
    weight_specs: {dense weight name: leaf spec}, the exact layout of each matrix (loading).
"""
    gates: int = 4
    mode: str = "LSTM"
    bias: bool  # type: ignore[assignment]  # nn.LSTM's flag: the biases are the TN children's parameters

    @classmethod
    def _leaf(cls):
        return TTLinear if cls.format == "tt" else TRLinear

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, *, ranks=None, compress_hidden=False, in_factors=None, out_factors=None,
                 n_modes=None, proj_size=0, weight_specs=None):
        super().__init__()
        spec = type(self).dense_spec_from_args(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                                               bidirectional, proj_size, compress_hidden=compress_hidden,
                                               ranks=ranks, in_factors=in_factors, out_factors=out_factors,
                                               n_modes=n_modes)
        if weight_specs is not None:
            spec["weights"] = {k: dict(v) for k, v in weight_specs.items()}
        self._spec = spec
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.bidirectional, self.compress_hidden, self.proj_size = bool(bidirectional), bool(compress_hidden), 0
        h, g = self.hidden_size, self.gates * self.hidden_size
        var = 1.0 / (3 * h)  # torch RNN init: U(-1/sqrt(H), 1/sqrt(H))
        bound = 1.0 / math.sqrt(h)
        leaf = self._leaf()
        for name, ls in spec["weights"].items():
            if ls.get("ranks") is None:
                raise ValueError(f"{self._where(spec)}: ranks are required for {name}")
            child = leaf(ls["in_features"], ls["out_features"], ls["bias"], ranks=ls["ranks"],
                         in_factors=ls["in_factors"], out_factors=ls["out_factors"], init_var=var)
            if child.bias is not None:
                nn.init.uniform_(child.bias, -bound, bound)
            self.add_module(name[len("weight_"):], child)
        for l_ in range(self.num_layers):
            for sfx in self._suffixes():
                if not compress_hidden:
                    self.register_parameter(f"weight_hh_l{l_}{sfx}",
                                            nn.Parameter(torch.empty(g, h).uniform_(-bound, bound)))
                    self.register_parameter(f"bias_hh_l{l_}{sfx}", nn.Parameter(torch.empty(g).uniform_(-bound, bound))
                                            if bias else None)

    def _suffixes(self):
        return ["", "_reverse"] if self.bidirectional else [""]

    # ---------------------------------------------------------------- tensorization
    @classmethod
    def dense_spec_from_args(cls, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                             bidirectional=False, proj_size=0, *, compress_hidden=False, ranks=None,
                             in_factors=None, out_factors=None, n_modes=None):
        where = f"{cls.__name__}({input_size}->{hidden_size}, num_layers={num_layers})"
        if proj_size:
            raise ValueError(f"{where}: proj_size={proj_size} is not supported (only proj_size=0)")
        leaf, g = cls._leaf(), cls.gates * hidden_size

        def modes(i, given):  # no factors: the balanced TT-matrix layout, also for TT (whose Linear default
            if given:         # is the two-core low-rank form: at 8x that leaves an LSTM's 12 -> 4x64 input
                return None   # matrix rank 1, every gate reading one projection of the input)
            return n_modes if n_modes is not None else default_modes(i, g)
        weights = {}
        for l_ in range(num_layers):
            for sfx in (["", "_reverse"] if bidirectional else [""]):
                i_l = input_size if l_ == 0 else hidden_size * (2 if bidirectional else 1)
                fi = in_factors if l_ == 0 else None
                weights[f"weight_ih_l{l_}{sfx}"] = leaf.dense_spec_from_sizes(
                    i_l, g, bias, ranks=ranks, in_factors=fi, out_factors=out_factors,
                    n_modes=modes(i_l, fi is not None or out_factors is not None))
                if compress_hidden:
                    weights[f"weight_hh_l{l_}{sfx}"] = leaf.dense_spec_from_sizes(
                        hidden_size, g, bias, ranks=ranks, out_factors=out_factors,
                        n_modes=modes(hidden_size, out_factors is not None))
        return {"class": cls.__name__, "format": cls.format, "input_size": int(input_size),
                "hidden_size": int(hidden_size), "num_layers": int(num_layers), "bias": bool(bias),
                "batch_first": bool(batch_first), "dropout": float(dropout), "bidirectional": bool(bidirectional),
                "compress_hidden": bool(compress_hidden), "ranks": ranks, "weights": weights}

    @classmethod
    def dense_spec(cls, module, *, ranks=None, in_factors=None, out_factors=None, n_modes=None,
                   compress_hidden=False):
        dense = nn.LSTM if cls.mode == "LSTM" else nn.GRU
        if not isinstance(module, dense):
            raise ValueError(f"{cls.__name__}.dense_spec: expected {dense.__name__}, got {type(module).__name__}")
        return cls.dense_spec_from_args(module.input_size, module.hidden_size, module.num_layers, module.bias,
                                        module.batch_first, module.dropout, module.bidirectional,
                                        getattr(module, "proj_size", 0), compress_hidden=compress_hidden,
                                        ranks=ranks, in_factors=in_factors, out_factors=out_factors,
                                        n_modes=n_modes)

    @classmethod
    def _where(cls, spec):
        return f"{cls.__name__}({spec['input_size']}->{spec['hidden_size']}, num_layers={spec['num_layers']})"

    @classmethod
    def weight_specs(cls, spec):
        return dict(spec["weights"])

    @classmethod
    def dense_weights(cls, module, spec=None):
        names = spec["weights"] if spec is not None else [n for n, _ in module.named_parameters()
                                                           if n.startswith("weight_ih_l")]
        return {n: getattr(module, n) for n in names}

    @classmethod
    def tensorize(cls, weight, spec):  # spec: a leaf spec from spec["weights"]
        return cls._leaf().tensorize(weight, spec)

    @classmethod
    def detensorize(cls, tensor, spec):
        return cls._leaf().detensorize(tensor, spec)

    def spec(self):
        s = copy.deepcopy(self._spec)
        s["weights"] = {n: getattr(self, n[len("weight_"):]).spec() for n in self._spec["weights"]}
        return s

    @classmethod
    def _from_spec(cls, spec):
        return cls(spec["input_size"], spec["hidden_size"], spec["num_layers"], spec["bias"], spec["batch_first"],
                   spec["dropout"], spec["bidirectional"], compress_hidden=spec["compress_hidden"],
                   ranks=spec.get("ranks"), weight_specs=spec["weights"])

    @classmethod
    def from_dense(cls, module, *, ranks=None, max_rank=None, rel_error=None, compression_ratio=None,
                   in_factors=None, out_factors=None, n_modes=None, weight_specs=None, **layout):
        """A layer decomposed from ``module``'s matrices; ``layout``: ``compress_hidden`` (see ``dense_spec``).
        ``weight_specs``: ``{matrix name: leaf spec with ranks}``, every matrix decomposed at exactly its
        layout and ranks (a plan that pins them, e.g. ``ADMMScheduler.plan``)."""
        spec = cls.dense_spec(module, ranks=ranks, in_factors=in_factors, out_factors=out_factors,
                              n_modes=n_modes, **layout)
        if weight_specs is not None:
            if set(weight_specs) != set(spec["weights"]):
                raise ValueError(f"{cls._where(spec)}: weight_specs name {sorted(weight_specs)}; this layer's TN "
                                 f"matrices are {sorted(spec['weights'])}")
            spec["weights"] = copy.deepcopy(weight_specs)
        leaf, cores, fixed = cls._leaf(), {}, weight_specs is not None
        for name, ls in spec["weights"].items():
            spec["weights"][name], cores[name] = leaf.decompose_weight(
                getattr(module, name), ls, ranks=ls["ranks"] if fixed else ranks,
                max_rank=None if fixed else max_rank, rel_error=None if fixed else rel_error,
                compression_ratio=None if fixed else compression_ratio, where=f"{cls._where(spec)}.{name}")
        ref = module.weight_ih_l0
        with torch.device(ref.device):
            layer = cls._from_spec(spec).to(dtype=ref.dtype)
        for name, cs in cores.items():
            child = getattr(layer, name[len("weight_"):])
            child.load_cores(cs, getattr(module, "bias_" + name[len("weight_"):]) if child.bias is not None else None)
        with torch.no_grad():
            for n, p in layer.named_parameters(recurse=False):
                p.copy_(getattr(module, n))
        return layer

    # --------------------------------------------------------------------- views
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            mods = self.__dict__["_modules"]
            for prefix in ("weight_", "bias_"):
                if name.startswith(prefix) and name[len(prefix):] in mods:
                    return getattr(mods[name[len(prefix):]], prefix[:-1])
            raise

    @property
    def weight(self):
        return self.ih_l0.weight

    def to_dense(self):
        ref = self.ih_l0.cores[0]
        m = (nn.LSTM if self.mode == "LSTM" else nn.GRU)(
            self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first, self.dropout,
            self.bidirectional, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(getattr(self, n))
        return m

    # ------------------------------------------------------------------- forward
    def _hh(self, name, h):
        if self.compress_hidden:
            return getattr(self, name)(h)
        return F.linear(h, getattr(self, "weight_" + name), getattr(self, "bias_" + name))

    def _cell(self, gx, gh, h, c):
        if self.mode == "LSTM":
            i, f, g, o = (gx + gh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        xr, xz, xn = gx.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, c

    @staticmethod
    def _reverse(x, lengths):
        if lengths is None:
            return x.flip(0)
        t = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        ln = lengths.to(x.device).unsqueeze(0)
        idx = torch.where(t < ln, ln - 1 - t, t)
        return x.gather(0, idx.unsqueeze(-1).expand_as(x))

    def _direction(self, x, l_, sfx, h, c, lengths):
        steps, b = x.shape[:2]
        if sfx:
            x = self._reverse(x, lengths)
        gx = getattr(self, f"ih_l{l_}{sfx}")(x.reshape(steps * b, -1)).reshape(steps, b, -1)
        outs = []
        for t in range(steps):
            h_new, c_new = self._cell(gx[t], self._hh(f"hh_l{l_}{sfx}", h), h, c)
            if lengths is not None:
                m = (t < lengths).to(x.device).unsqueeze(-1)
                h_new = torch.where(m, h_new, h)
                c_new = torch.where(m, c_new, c) if c is not None else None
            h, c = h_new, c_new
            outs.append(h)
        out = torch.stack(outs)
        return (self._reverse(out, lengths) if sfx else out), h, c

    def forward(self, input, hx=None):
        lstm = self.mode == "LSTM"
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            x, lengths = pad_packed_sequence(input)
            unbatched = False
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{self._where(self._spec)}: input must be 2-D or 3-D, got {tuple(input.shape)}")
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        nd = 2 if self.bidirectional else 1
        b = x.shape[1]
        if hx is None:
            z = x.new_zeros(self.num_layers * nd, b, self.hidden_size)
            h0, c0 = z, (z if lstm else None)
        else:
            h0, c0 = (hx if lstm else (hx, None))
            if unbatched:
                h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if c0 is not None else None)
        hs, cs = [], []
        for l_ in range(self.num_layers):
            outs = []
            for d, sfx in enumerate(self._suffixes()):
                k = l_ * nd + d
                out, h, c = self._direction(x, l_, sfx, h0[k], c0[k] if c0 is not None else None, lengths)
                outs.append(out)
                hs.append(h)
                cs.append(c)
            x = torch.cat(outs, -1) if nd > 1 else outs[0]
            if self.dropout and self.training and l_ < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        h_n = torch.stack(hs)
        c_n = torch.stack(cs) if lstm else None
        if lengths is not None:  # packed input
            idx = input.sorted_indices
            xs, ls = (x, lengths) if idx is None else (x.index_select(1, idx), lengths[idx.cpu()])
            p = pack_padded_sequence(xs, ls, enforce_sorted=True)
            out = PackedSequence(p.data, p.batch_sizes, input.sorted_indices, input.unsorted_indices)
        elif unbatched:
            out, h_n, c_n = x.squeeze(1), h_n.squeeze(1), (c_n.squeeze(1) if c_n is not None else None)
        else:
            out = x.transpose(0, 1) if self.batch_first else x
        return out, ((h_n, c_n) if lstm else h_n)

    # -------------------------------------------------------------------- helpers
    def dense_params(self) -> int:
        return sum(p.numel() for p in self.to_dense().parameters())

    def _tokens(self, input_shape):
        return int(input_shape[0]) * (int(input_shape[1]) if len(input_shape) == 3 else 1)

    def flops(self, input_shape) -> int:
        tok, g, h = self._tokens(input_shape), self.gates * self.hidden_size, self.hidden_size
        f = sum(leaf.flops((tok, leaf.in_features)) for _, leaf in tn_leaves(self))
        if not self.compress_hidden:
            f += 2 * tok * g * h * self.num_layers * (2 if self.bidirectional else 1)
        return f

    def _path_flops(self, input_shape):
        """Leaves summed (plus the dense hidden-to-hidden matmuls on both paths); path per leaf."""
        tok, g, h = self._tokens(input_shape), self.gates * self.hidden_size, self.hidden_size
        hh = 0 if self.compress_hidden else 2 * tok * g * h * self.num_layers * (2 if self.bidirectional else 1)
        costs = {name: leaf.cost((tok, leaf.in_features)) for name, leaf in tn_leaves(self)}
        return (hh + sum(c["contract"] for c in costs.values()), hh + sum(c["rebuild"] for c in costs.values()),
                {name: c["path"] for name, c in costs.items()})

    def dense_flops(self, input_shape) -> int:
        tok = self._tokens(input_shape)
        return sum(2 * tok * p.numel() for n, p in self.to_dense().named_parameters() if n.startswith("weight"))

    def extra_repr(self):
        ranks = {n: getattr(self, n[len("weight_"):]).ranks for n in self._spec["weights"]}
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, bidirectional="
                f"{self.bidirectional}, compress_hidden={self.compress_hidden}, ranks={ranks}, params={self.params()} "
                f"({self.dense_params() / max(1, self.params()):.1f}x smaller than dense)")


def tn_leaves(module):
    return list(tn_targets(module))


class TTLSTM(_TNRNN):
    format, mode, gates, dense_type = "tt", "LSTM", 4, nn.LSTM


class TRLSTM(_TNRNN):
    format, mode, gates, dense_type = "tr", "LSTM", 4, nn.LSTM


class TTGRU(_TNRNN):
    format, mode, gates, dense_type = "tt", "GRU", 3, nn.GRU


class TRGRU(_TNRNN):
    format, mode, gates, dense_type = "tr", "GRU", 3, nn.GRU
