"""TT/TR/Tucker/BT layers: drop-in nn.Modules with cores as parameters (see base.TNLayer, tucker, bt)."""
from torch import nn

from .base import TNLayer, layer_from_spec, registry, tn_targets
from .bt import BTGRU, BTLSTM, BTConv1d, BTConv2d, BTConv3d, BTLinear
from .conv import TRConv1d, TRConv2d, TRConv3d, TTConv1d, TTConv2d, TTConv3d
from .hf_conv1d import CONV1D, BTHFConv1D, TRHFConv1D, TTHFConv1D, TuckerHFConv1D
from .linear import TRLinear, TTLinear
from .recurrent import TRGRU, TRLSTM, TTGRU, TTLSTM
from .tucker import TuckerConv1d, TuckerConv2d, TuckerConv3d, TuckerGRU, TuckerLinear, TuckerLSTM

# The one table: dense type -> (TNConfig.layer_types name, {format: TN class}). A type of an optional
# library is keyed by its qualified name (transformers' Conv1D), so that nothing imports it here.
# Planning targets exact types only (subclasses such as NonDynamicallyQuantizableLinear can behave
# in ways a TN layer can't follow); tn_class_for also answers for subclasses.
_BY_TYPE: dict[type[nn.Module] | str, tuple[str, dict[str, type[TNLayer]]]] = {
    nn.Linear: ("linear", {"tt": TTLinear, "tr": TRLinear, "tucker": TuckerLinear, "bt": BTLinear}),
    CONV1D: ("linear", {"tt": TTHFConv1D, "tr": TRHFConv1D, "tucker": TuckerHFConv1D, "bt": BTHFConv1D}),
    nn.Conv1d: ("conv", {"tt": TTConv1d, "tr": TRConv1d, "tucker": TuckerConv1d, "bt": BTConv1d}),
    nn.Conv2d: ("conv", {"tt": TTConv2d, "tr": TRConv2d, "tucker": TuckerConv2d, "bt": BTConv2d}),
    nn.Conv3d: ("conv", {"tt": TTConv3d, "tr": TRConv3d, "tucker": TuckerConv3d, "bt": BTConv3d}),
    nn.LSTM: ("lstm", {"tt": TTLSTM, "tr": TRLSTM, "tucker": TuckerLSTM, "bt": BTLSTM}),
    nn.GRU: ("gru", {"tt": TTGRU, "tr": TRGRU, "tucker": TuckerGRU, "bt": BTGRU}),
}
SUPPORTED_TYPES = tuple(t.__name__ if isinstance(t, type) else t.rsplit(".", 1)[1] for t in _BY_TYPE)


def _entry(t: type) -> tuple[str, dict[str, type[TNLayer]]] | None:
    """The table's entry for exactly the type ``t`` (by the type, or by its qualified name)."""
    return _BY_TYPE.get(t) or _BY_TYPE.get(f"{t.__module__}.{t.__qualname__}")


def layer_type(module: nn.Module) -> str | None:
    """"linear" / "conv" / "lstm" / "gru" for a supported dense module, else None."""
    entry = _entry(type(module))
    return entry[0] if entry else None


def is_unsupported_subclass(module: nn.Module) -> bool:
    """A subclass of a supported type with a forward of its own (e.g. timm's weight-standardized
    StdConv2d): never a target, since a TN layer would drop what its forward adds."""
    return layer_type(module) is None and any(_entry(t) for t in type(module).__mro__[1:])


def tn_class_for(module: nn.Module, format: str = "tt") -> type[TNLayer]:
    """The TN class that replaces `module` in `format` ("tt", "tr", "tucker" or "bt"); ValueError if unsupported."""
    by_fmt = next((e[1] for e in map(_entry, type(module).__mro__) if e), None)
    if by_fmt is not None:
        if format not in by_fmt:
            raise ValueError(f"format {format!r} is not supported for {type(module).__name__}; valid: {list(by_fmt)}")
        if getattr(module, "groups", 1) != 1:
            raise ValueError(f"{type(module).__name__} with groups={module.groups} cannot be compressed; "
                             f"TN convolutions need groups=1")
        if getattr(module, "proj_size", 0):
            raise ValueError(f"{type(module).__name__} with proj_size={module.proj_size} is not supported")
        return by_fmt[format]
    raise ValueError(f"no TN layer for {type(module).__name__}; supported types: {list(SUPPORTED_TYPES)}")


__all__ = ["TNLayer", "registry", "layer_from_spec", "tn_class_for", "tn_targets", "SUPPORTED_TYPES",
           "layer_type", "is_unsupported_subclass", "TTLinear", "TRLinear", "TTConv1d", "TTConv2d", "TTConv3d",
           "TRConv1d", "TRConv2d", "TRConv3d",
           "TTLSTM", "TRLSTM", "TTGRU", "TRGRU", "TuckerLinear", "TuckerConv1d", "TuckerConv2d", "TuckerConv3d",
           "TuckerLSTM", "TuckerGRU", "BTLinear", "BTConv1d", "BTConv2d", "BTConv3d", "BTLSTM", "BTGRU",
           "TTHFConv1D", "TRHFConv1D", "TuckerHFConv1D", "BTHFConv1D"]
