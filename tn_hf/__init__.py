"""tn_hf: Tensor-Train / Tensor-Ring compression for Hugging Face and timm models.

Importing tn_hf is cheap: the public names below load on first use, and the transformers and
timm integrations install themselves when those libraries are imported (see
``tn_hf.integrations``), so that the ecosystems' own ``from_pretrained`` rebuild TN layers.
"""
from importlib import import_module

from ._version import __version__
from .config import TNConfig
from .integrations import install_hooks

# public name -> module that defines it (imported on first use)
_EXPORTS = {
    "plan": ".targeting",
    "tune": ".targeting",
    "Plan": ".plans",
    "compress": ".convert",
    "decompress": ".convert",
    "CompressionReport": ".report",
    "ADMMScheduler": ".admm",
    "ADMMTTCallback": ".integrations.trainer",
    "save_pretrained": ".hub",
    "from_pretrained": ".hub",
    "push_to_hub": ".push",
}

__all__ = ["TNConfig", "__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tn_hf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


install_hooks()
