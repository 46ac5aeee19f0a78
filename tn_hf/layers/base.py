"""TNLayer: the base of every Tensor-Train / Tensor-Ring layer.

A leaf layer stores one dense weight as a chain of cores ``cores[k]`` of shape
``(r[k-1], n[k], r[k])``. TT: ``r[0] == r[d] == 1``; TR: ``r[0] == r[d]`` is the ring rank
and the full tensor is the trace over the ring. Both formats share every code path: a TT
is a ring of rank 1 (the ring index ``a`` below has size 1).

Subclasses define the tensorization (``dense_spec``, ``_modes``, ``tensorize``,
``detensorize``) and the forward pass; this module holds what they share: rank
normalisation, initialisation, decomposition of a dense weight, rebuilding, the spec
round trip, the registry and ``tn_targets``.

Composite layers (recurrent) hold one TN leaf per dense matrix and expose them through
``tn_targets``; their spec has ``spec["weights"][name]`` = the leaf spec of dense weight
``name`` (the name used by ``dense_weights``), see ``weight_specs``.
"""
from __future__ import annotations

import copy
import math
from typing import TypeVar, cast

import torch
from torch import nn

from .. import decompositions as D
from ..config import FORMATS
from ..decompositions import chain

registry: dict[str, type[TNLayer]] = {}
FORMAT_NAMES = {"tt": "Tensor-Train", "tr": "Tensor-Ring", "tucker": "Tucker", "bt": "Block-Term"}
_M = TypeVar("_M", bound=nn.Module)



def n_params(module: nn.Module) -> int:
    """Parameters of a module (each shared tensor once): the one count used everywhere."""
    return sum(p.numel() for p in module.parameters())


def canonical(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides on every dim (size-1 dims included).

    ``Tensor.contiguous()`` keeps odd strides on size-1 dims (a permuted (r, 1, r) kernel core
    reshaped to (r, r, 1, 1) reports contiguous with strides (r, 1, r, r)); some conv backends
    read those strides and fail in backward. Every weight handed to a conv kernel goes
    through here."""
    return t.contiguous().view(-1).view(t.shape)


def chain_flops(modes, ranks) -> int:
    """Multiply-add FLOPs (x2) of ``chain`` for cores with these modes and ranks."""
    if not modes:
        return 0
    f, n = 0, ranks[0] * modes[0]
    for k in range(1, len(modes)):
        f += 2 * n * ranks[k] * modes[k] * ranks[k + 1]
        n *= modes[k]
    return f


def cores_to_full(cores) -> torch.Tensor:
    """TT/TR cores -> full tensor of shape (n1, ..., nd) (trace over the ring for TR)."""
    m = chain(cores)
    full = torch.diagonal(m, dim1=0, dim2=2).sum(-1) if m.shape[0] > 1 else m[0, :, 0]
    return full.reshape([c.shape[1] for c in cores])


def normalize_ranks(ranks, modes, fmt: str, where: str = "layer") -> list[int]:
    """Full rank list (length d+1) from an int or a list (tn_hf.decompositions.tt_ranks/tr_ranks;
    Tucker: d ranks, tucker_ranks; BT: [N, r_1..r_d], bt_ranks): an int is clipped to what the
    shape allows, a list that does not fit is a ValueError)."""
    if fmt not in FORMATS:
        raise ValueError(f"{where}: format {fmt!r} is not supported; valid: {FORMATS}")
    if fmt in ("tucker", "bt"):
        try:
            return (D.tucker_ranks if fmt == "tucker" else D.bt_ranks)(list(modes), ranks)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None
    if ranks is None:
        raise ValueError(f"{where}: ranks are required (int or list of {len(modes) + 1} ints) for modes {tuple(modes)}")
    d = len(modes)
    try:
        if fmt == "tt" or isinstance(ranks, int):
            return [int(r) for r in (D.tt_ranks if fmt == "tt" else D.tr_ranks)(list(modes), ranks)]
        # TR lists: tr_svd picks the ring's cyclic start, so only the ring structure is checked here
        r = [int(v) for v in ranks]
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    if len(r) != d + 1 or min(r) < 1 or r[0] != r[-1]:
        raise ValueError(f"{where}: TR ranks {r} for modes {tuple(modes)} must be {d + 1} ints >= 1 with "
                         f"ring rank r[0] == r[d]")
    return r


def _decomp(fmt):
    return D.tt_svd if fmt == "tt" else D.tr_svd


def decompose(tensor: torch.Tensor, fmt: str, *, ranks=None, max_rank=None, rel_error=None,
              compression_ratio=None, where="layer") -> list[torch.Tensor]:
    """TT-SVD / TR-SVD of ``tensor`` (delegates to tn_hf.decompositions)."""
    from ..decompositions import ranks_for_ratio
    modes = tuple(tensor.shape)
    svd = _decomp(fmt)
    if compression_ratio is not None:
        if not compression_ratio > 0:
            raise ValueError(f"{where}: compression_ratio must be > 0, got {compression_ratio}")
        ranks = ranks_for_ratio(modes, compression_ratio, fmt)
    if ranks is not None:
        ranks = normalize_ranks(ranks, modes, fmt, where)
    if ranks is None and max_rank is None and rel_error is None:
        raise ValueError(f"{where}: give one of ranks, max_rank, rel_error, compression_ratio")
    cores = svd(tensor, ranks=ranks, max_rank=max_rank, rel_error=rel_error)
    if fmt == "tt" and ranks is None:  # error-driven sweeps can leave a rank above what a neighbour
        got = [cores[0].shape[0]] + [c.shape[-1] for c in cores]  # allows (size-1 modes: 1x1 kernels)
        tight = list(got)
        for k in range(len(modes) - 1, 0, -1):
            tight[k] = min(tight[k], tight[k + 1] * modes[k])
        if tight != got:  # same unfoldings, so the same error at the tight ranks
            cores = svd(tensor, ranks=tight)
    return cores


def _missing(cls, name: str) -> NotImplementedError:
    return NotImplementedError(f"{cls.__name__} must implement {name} (part of the TNLayer contract)")


class TNLayer(nn.Module):
    """Base of every TN layer; see the module docstring for the formats.

    Class attributes a subclass sets: ``format`` ("tt", "tr", "tucker"), ``dense_type`` (the
    dense module it replaces), ``composite`` (True when it holds TN leaves instead of cores).

    The contract, what every concrete subclass implements (the defaults here raise
    ``NotImplementedError`` naming the class and the method):

    - ``dense_spec(module, **kw)`` (classmethod): spec dict of a dense module, ranks unset.
    - ``_modes(spec)`` (static/classmethod, leaves): modes of the tensorized weight.
    - ``tensorize(weight, spec)`` / ``detensorize(tensor, spec)`` (classmethods): dense weight
      <-> tensor of shape ``_modes(spec)``; exact inverses.
    - ``_from_spec(spec)`` (classmethod): an empty layer with the parameter shapes of ``spec``.
    - ``forward(x)``: same signature and result as the dense module's.
    - ``contract(x)`` (leaves): forward without rebuilding the dense weight (bias included).
    - ``to_dense()``: the equivalent dense module (rebuilt weight).
    - ``dense_params()``: parameter count of the dense module.
    - ``flops(input_shape)`` / ``dense_flops(input_shape)``: forward FLOPs of this layer / of
      the dense module for an input of that shape.
    - ``_path_flops(input_shape)``: ``(contract FLOPs, rebuild FLOPs, rebuild chosen)``, used by
      the public ``cost``.

    Shared here: ``from_dense``, ``from_spec``, ``spec``, ``weight``, ``cached``, ``cost``.
    """

    format: str = "tt"
    dense_type: type = nn.Module
    composite: bool = False
    _args_doc: str = ""  # the constructor's "Args:" section, shared by a family of layers
    cores: nn.ParameterList
    bias: nn.Parameter | None
    _spec: dict

    # ----------------------------------------------------------------- the contract
    @classmethod
    def dense_spec(cls, module, *, ranks=None, in_factors=None, out_factors=None, n_modes=None) -> dict:
        raise _missing(cls, "dense_spec")

    @classmethod
    def _modes(cls, spec) -> list[int]:
        raise _missing(cls, "_modes")

    @classmethod
    def tensorize(cls, weight, spec) -> torch.Tensor:
        raise _missing(cls, "tensorize")

    @classmethod
    def detensorize(cls, tensor, spec) -> torch.Tensor:
        raise _missing(cls, "detensorize")

    @classmethod
    def _from_spec(cls, spec):
        raise _missing(cls, "_from_spec")

    def forward(self, *args, **kw):
        raise _missing(type(self), "forward")

    def contract(self, x) -> torch.Tensor:
        raise _missing(type(self), "contract")

    def to_dense(self) -> nn.Module:
        raise _missing(type(self), "to_dense")

    def dense_params(self) -> int:
        raise _missing(type(self), "dense_params")

    def flops(self, input_shape) -> int:
        raise _missing(type(self), "flops")

    def dense_flops(self, input_shape) -> int:
        raise _missing(type(self), "dense_flops")

    def _path_flops(self, input_shape) -> tuple[int, int, bool]:
        raise _missing(type(self), "_path_flops")

    def _shape_repr(self) -> str:
        raise _missing(type(self), "_shape_repr")

    def cost(self, input_shape) -> dict:
        """FLOPs of each forward path for an input of ``input_shape``.

        Returns ``{"contract": FLOPs without rebuilding the weight, "rebuild": FLOPs of rebuilding
        the dense weight and running the dense op, "path": "contract" or "rebuild" (the one
        ``forward`` takes now: in eval / no_grad a cached rebuilt weight makes "rebuild" cheaper),
        "dense": FLOPs of the dense module}``. Composite layers sum their leaves and report
        ``"path"`` per leaf."""
        shape = tuple(int(s) for s in input_shape)
        contract, rebuild, use_rebuild = self._path_flops(shape)
        return {"contract": int(contract), "rebuild": int(rebuild),
                "path": use_rebuild if isinstance(use_rebuild, dict) else ("rebuild" if use_rebuild else "contract"),
                "dense": int(self.dense_flops(shape))}

    def __init_subclass__(cls, **kw):
        """Public subclasses join the registry; their docstring gets the family's ``Args:`` section
        (``_args_doc``), after their own summary or a generated one."""
        super().__init_subclass__(**kw)
        if cls.__name__.startswith("_"):
            return
        registry[cls.__name__] = cls
        if getattr(cls, "_args_doc", None):
            summary = cls.__dict__.get("__doc__") or (
                f"Drop-in ``nn.{cls.dense_type.__name__}`` whose weight{'s are' if cls.composite else ' is'} stored in "
                f"{FORMAT_NAMES[cls.format]} form.")
            cls.__doc__ = f"{summary.rstrip()}\n\n{cls._args_doc}"

    # ----------------------------------------------------------- leaf-layer machinery
    def _init_cores(self, spec: dict, target_var: float):
        """Create ``self.cores`` with N(0, s^2) entries so that Var(full tensor) == target_var.

        Each entry of the full tensor is a sum over prod(internal ranks) products of d core
        entries (TR: the ring rank counts as an internal rank), hence
        Var = prod(ranks summed over) * s^(2d).
        """
        modes = self._modes(spec)
        ranks = spec["ranks"]
        d = len(modes)
        summed = math.prod(ranks[1:d]) * (ranks[0] if self.format == "tr" else 1)
        s = (target_var / summed) ** (1.0 / (2 * d))
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.randn(ranks[k], modes[k], ranks[k + 1]) * s) for k in range(d)])

    # ------------------------------------------------------------ inference cache
    def cached(self, name, fn):
        """``fn()`` computed once and reused while no core changed, whenever no gradient is recorded.

        In eval / ``torch.no_grad`` / ``torch.inference_mode`` the merged core products (and a
        rebuilt weight) do not depend on the input, so they are computed on the first call and
        kept until a core changes. A change is seen through each core's ``data_ptr`` and
        ``_version`` counter, which in-place updates bump (optimizer steps, ``load_state_dict``,
        ``copy_``), and ``.to()`` moves; ``train()`` / ``eval()`` drop the cache too. The cache is
        also keyed by the call's autocast state (on/off and its dtype, for the cores' device type) and
        by inference mode, so a forward under ``torch.autocast`` and a plain one each get their own
        merged weights. While autograd records (training) or under ``torch.compile`` nothing is cached."""
        return self._memo(self._store(), name, fn)

    def _store(self) -> dict | None:
        """The cache dict valid for the cores as they are now, or None while not caching (``cached``).
        A forward takes it once and reads several entries from it (path, merged factors). This runs
        on every forward, so it reads the cores straight from the list's dict (indexing an
        ``nn.ParameterList`` costs microseconds, which a batch-1 forward of a small layer notices)."""
        cores = cast("tuple[nn.Parameter, ...]", tuple(self.cores._parameters.values()))  # never None entries
        if not self._caching(cores):
            return None
        device = cores[0].device.type  # where the call computes (its input is on the cores' device)
        amp = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) \
            if torch.amp.is_autocast_available(device) else (False, None)  # (meta: no autocast)
        key = (torch.is_inference_mode_enabled(), *amp) + tuple((c.data_ptr(), c._version, c.dtype, c.device)
                                                                 for c in cores)
        cache = self.__dict__.get("_tn_cache")
        if cache is None or cache[0] != key:
            cache = self.__dict__["_tn_cache"] = (key, {})
        return cache[1]

    @staticmethod
    def _memo(store: dict | None, name, fn):
        if store is None:
            return fn()
        if name not in store:
            store[name] = fn()
        return store[name]

    def caching(self) -> bool:
        """Whether ``cached`` keeps results now (no autograd recording, not compiling)."""
        return self._caching(self.cores)

    @staticmethod
    def _caching(cores) -> bool:
        if torch.compiler.is_compiling():
            return False
        return not (torch.is_grad_enabled() and any(c.requires_grad for c in cores))

    def train(self, mode: bool = True):
        self.__dict__.pop("_tn_cache", None)
        return super().train(mode)

    @property
    def ranks(self) -> list[int]:
        return [self.cores[0].shape[0]] + [c.shape[-1] for c in self.cores]

    def full_tensor(self) -> torch.Tensor:
        return cores_to_full(list(self.cores))

    @property
    def weight(self) -> torch.Tensor:
        """Dense weight rebuilt from the cores (read-only view; gradients flow to the cores)."""
        return self.detensorize(self.full_tensor(), self._spec)

    def spec(self) -> dict:
        s = copy.deepcopy(self._spec)
        s["ranks"] = self.ranks
        return s

    @classmethod
    def weight_specs(cls, spec) -> dict:
        """{dense weight name: leaf spec} - the tensorization of each name in dense_weights."""
        return {"weight": spec}

    @classmethod
    def dense_weights(cls, module, spec: dict | None = None) -> dict:
        """{name: dense weight} of ``module`` that a layer of this class stores in TN form; ``spec`` (the
        target's) matters for recurrent layers, whose spec says which matrices are compressed."""
        return {"weight": module.weight}

    @classmethod
    def from_spec(cls, spec: dict):
        """Empty layer (random init) with the exact parameter shapes of ``spec``."""
        if cls is TNLayer or spec.get("class", cls.__name__) != cls.__name__:
            return layer_from_spec(spec)
        return cls._from_spec(spec)

    @classmethod
    def decompose_weight(cls, weight, spec, *, ranks=None, max_rank=None, rel_error=None, compression_ratio=None,
                         where=None):
        """(spec with ranks, cores) from TT-SVD / TR-SVD of ``tensorize(weight, spec)``."""
        cores = decompose(cls.tensorize(weight.detach(), spec), cls.format, ranks=ranks, max_rank=max_rank,
                          rel_error=rel_error, compression_ratio=compression_ratio, where=where or cls._where(spec))
        return dict(spec, ranks=[cores[0].shape[0]] + [c.shape[-1] for c in cores]), cores

    @classmethod
    def from_dense(cls, module, *, ranks=None, max_rank=None, rel_error=None, compression_ratio=None,
                   in_factors=None, out_factors=None, n_modes=None, **layout):
        """A layer decomposed from ``module``'s weight; ``layout``: class-specific tensorization
        options passed to ``dense_spec`` (e.g. ``kernel_mode`` of the convolutions)."""
        spec = cls.dense_spec(module, ranks=ranks, in_factors=in_factors, out_factors=out_factors, n_modes=n_modes,
                              **layout)
        w = module.weight
        spec, cores = cls.decompose_weight(w, spec, ranks=ranks, max_rank=max_rank, rel_error=rel_error,
                                           compression_ratio=compression_ratio)
        with torch.device(w.device):  # built where the weight is (no host copy of the initial values)
            layer = cls.from_spec(spec)
        return layer.to(dtype=w.dtype).load_cores(cores, getattr(module, "bias", None))

    @torch.no_grad()
    def load_cores(self, cores, bias=None):
        """Copy ``cores`` (and ``bias`` when given) into this leaf's parameters; returns the layer."""
        for p, c in zip(self.cores, cores):
            p.copy_(c)
        if bias is not None:
            if self.bias is None:
                raise ValueError(f"{type(self).__name__}.load_cores: a bias was given but the layer has none "
                                 f"(its spec has bias=False)")
            self.bias.copy_(bias)
        return self

    @classmethod
    def _where(cls, spec) -> str:
        return cls.__name__

    @classmethod
    def _norm_ranks(cls, spec: dict) -> dict:
        """``spec`` with its ranks checked when a spec is built (Tucker); TT/TR check them in ``_spec_ranks``."""
        return spec

    @classmethod
    def _spec_ranks(cls, spec: dict, ranks) -> list[int]:
        """The full rank list a new layer of ``spec`` gets from the ``ranks`` argument."""
        return normalize_ranks(ranks, cls._modes(spec), cls.format, cls._where(spec))

    # --------------------------------------------------------------- accounting
    def _filled(self, dense: _M) -> _M:
        """``dense`` (a fresh plain module of the right shape) with this layer's rebuilt weight and bias."""
        with torch.no_grad():
            dense.get_parameter("weight").copy_(self.weight)
            if self.bias is not None:
                dense.get_parameter("bias").copy_(self.bias)
        return dense

    def params(self) -> int:
        return n_params(self)

    def extra_repr(self) -> str:
        dense = self.dense_params()
        return (f"{self._shape_repr()}, modes={tuple(self._modes(self._spec))}, ranks={self.ranks}, "
                f"params={self.params()} ({dense / max(1, self.params()):.1f}x smaller than dense)")


def layer_from_spec(spec: dict) -> TNLayer:
    name = spec.get("class") if isinstance(spec, dict) else None
    if name not in registry:
        raise ValueError(f"unknown TN layer class {name!r}; known: {sorted(registry)}")
    return registry[name]._from_spec(spec)


def tn_targets(module: nn.Module, prefix: str = ""):
    """Yield (relative name, TN leaf layer) for a TN layer (itself) or a composite one (its children)."""
    if isinstance(module, TNLayer) and not module.composite:
        yield prefix, module
        return
    for name, child in module.named_children():
        yield from tn_targets(child, f"{prefix}.{name}" if prefix else name)


def default_factors(n: int, d: int) -> tuple[int, ...]:
    from ..decompositions import factorize
    return tuple(int(f) for f in factorize(int(n), int(d)))


def check_factors(factors, n: int, what: str, where: str) -> tuple[int, ...]:
    f = tuple(int(x) for x in factors)
    if not f or min(f) < 1 or math.prod(f) != n:
        raise ValueError(f"{where}: {what} {f} must be positive ints whose product is {n} (got product "
                         f"{math.prod(f) if f else 0}); e.g. {default_factors(n, max(1, len(f)))}")
    return f


def default_modes(in_features: int, out_features: int, default_d: int = 3) -> int:
    """Modes per side of the balanced TT-matrix layout: 2 or 3 as the smaller side allows."""
    return max(2, min(default_d, int(math.log2(max(2, min(in_features, out_features)))) // 2))


def pair_factors(in_features, out_features, in_factors, out_factors, n_modes, where, default_d=3):
    """Factor lists (same length) for both sides; factorize() fills what is not given."""
    d = len(in_factors) if in_factors is not None else len(out_factors) if out_factors is not None else n_modes
    if d is None:
        d = default_modes(in_features, out_features, default_d)
    if n_modes is not None and n_modes != d:
        raise ValueError(f"{where}: n_modes={n_modes} disagrees with the given factors (length {d})")
    fi = check_factors(in_factors, in_features, "in_factors", where) if in_factors is not None \
        else default_factors(in_features, d)
    fo = check_factors(out_factors, out_features, "out_factors", where) if out_factors is not None \
        else default_factors(out_features, d)
    return fi, fo


def keep_rng(model: nn.Module):
    """A context in which the caller's random streams are saved and restored: the CPU generator and
    the generators of the accelerator devices ``model``'s parameters live on (``compress`` and
    ``tune`` build layers, whose default initialisation draws numbers, before loading weights)."""
    devices = sorted({p.device for p in model.parameters() if p.device.type not in ("cpu", "meta")}, key=str)
    kinds = {d.type for d in devices}
    if len(kinds) != 1:  # CPU only (or, rarely, two accelerator kinds: the CPU generator is what code shares)
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[d.index or 0 for d in devices], device_type=kinds.pop())
