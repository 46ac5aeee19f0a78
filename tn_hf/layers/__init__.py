"""TT/TR/Tucker layers: drop-in nn.Modules with cores as parameters (see base.TNLayer, tucker)."""
from torch import nn

from .base import TNLayer, layer_from_spec, registry, tn_targets
from .conv import TRConv1d, TRConv2d, TRConv3d, TTConv1d, TTConv2d, TTConv3d
from .linear import TRLinear, TTLinear
from .recurrent import TRGRU, TRLSTM, TTGRU, TTLSTM
from .tucker import TuckerConv1d, TuckerConv2d, TuckerConv3d, TuckerGRU, TuckerLinear, TuckerLSTM

# The one table: dense type -> (TNConfig.layer_types name, {format: TN class}). Planning targets
# exact types only (subclasses such as NonDynamicallyQuantizableLinear can behave in ways a TN
# layer can't follow); tn_class_for also answers for subclasses.
_BY_TYPE: dict[type[nn.Module], tuple[str, dict[str, type[TNLayer]]]] = {
    nn.Linear: ("linear", {"tt": TTLinear, "tr": TRLinear, "tucker": TuckerLinear}),
    nn.Conv1d: ("conv", {"tt": TTConv1d, "tr": TRConv1d, "tucker": TuckerConv1d}),
    nn.Conv2d: ("conv", {"tt": TTConv2d, "tr": TRConv2d, "tucker": TuckerConv2d}),
    nn.Conv3d: ("conv", {"tt": TTConv3d, "tr": TRConv3d, "tucker": TuckerConv3d}),
    nn.LSTM: ("lstm", {"tt": TTLSTM, "tr": TRLSTM, "tucker": TuckerLSTM}),
    nn.GRU: ("gru", {"tt": TTGRU, "tr": TRGRU, "tucker": TuckerGRU}),
}
SUPPORTED_TYPES = tuple(t.__name__ for t in _BY_TYPE)


def layer_type(module: nn.Module) -> str | None:
    """"linear" / "conv" / "lstm" / "gru" for a supported dense module, else None."""
    entry = _BY_TYPE.get(type(module))
    return entry[0] if entry else None


def is_unsupported_subclass(module: nn.Module) -> bool:
    """A subclass of a supported type with a forward of its own (e.g. timm's weight-standardized
    StdConv2d): never a target, since a TN layer would drop what its forward adds."""
    return layer_type(module) is None and isinstance(module, tuple(_BY_TYPE))


def tn_class_for(module: nn.Module, format: str = "tt") -> type[TNLayer]:
    """The TN class that replaces `module` in `format` ("tt", "tr" or "tucker"); ValueError if unsupported."""
    by_fmt = next((_BY_TYPE[t][1] for t in type(module).__mro__ if t in _BY_TYPE), None)
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
           "layer_type", "is_unsupported_subclass", "TTLinear", "TRLinear", "TTConv1d", "TTConv2d", "TTConv3d", "TRConv1d", "TRConv2d", "TRConv3d",
           "TTLSTM", "TRLSTM", "TTGRU", "TRGRU", "TuckerLinear", "TuckerConv1d", "TuckerConv2d", "TuckerConv3d",
           "TuckerLSTM", "TuckerGRU"]
