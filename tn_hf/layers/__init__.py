"""TT/TR layers: drop-in nn.Modules with cores as parameters (see base.TNLayer)."""
from torch import nn

from .base import TNLayer, layer_from_spec, registry, tn_targets
from .conv import TRConv1d, TRConv2d, TRConv3d, TTConv1d, TTConv2d, TTConv3d
from .linear import TRLinear, TTLinear
from .recurrent import TRGRU, TRLSTM, TTGRU, TTLSTM

# dense type -> {format: TN class}; order matters only for subclasses
_BY_TYPE = [
    (nn.Linear, {"tt": TTLinear, "tr": TRLinear}),
    (nn.Conv1d, {"tt": TTConv1d, "tr": TRConv1d}),
    (nn.Conv2d, {"tt": TTConv2d, "tr": TRConv2d}),
    (nn.Conv3d, {"tt": TTConv3d, "tr": TRConv3d}),
    (nn.LSTM, {"tt": TTLSTM, "tr": TRLSTM}),
    (nn.GRU, {"tt": TTGRU, "tr": TRGRU}),
]
SUPPORTED_TYPES = tuple(t.__name__ for t, _ in _BY_TYPE)


def tn_class_for(module: nn.Module, format: str = "tt") -> type[TNLayer]:
    """The TN class that replaces `module` in `format` ("tt" or "tr"); ValueError if unsupported."""
    for t, by_fmt in _BY_TYPE:
        if isinstance(module, t):
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
           "TTLinear", "TRLinear", "TTConv1d", "TTConv2d", "TTConv3d", "TRConv1d", "TRConv2d", "TRConv3d",
           "TTLSTM", "TRLSTM", "TTGRU", "TRGRU"]
