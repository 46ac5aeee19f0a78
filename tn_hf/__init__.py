"""tn_hf: Tensor-Train / Tensor-Ring compression for Hugging Face and timm models.

Importing tn_hf registers the transformers quantization-config plugin and the timm
loader hook, so that the ecosystems' own ``from_pretrained`` rebuild TN layers.
"""
from importlib import import_module

from .config import TNConfig
# Eager: the submodule `tn_hf.compress` shares its name with the function; binding the function
# here, after the submodule is imported, keeps `tn_hf.compress(model, cfg)` the function.
from .compress import CompressionReport, compress, decompress

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily, so `import tn_hf` stays light)
_EXPORTS = {
    "ADMMScheduler": ".admm",
    "ADMMTTCallback": ".integrations.trainer",
    "save_pretrained": ".hub",
    "from_pretrained": ".hub",
    "push_to_hub": ".push",
}

__all__ = ["TNConfig", "compress", "decompress", "CompressionReport", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tn_hf' has no attribute {name!r}")


def _install_hooks():
    # Ecosystem hooks must be active as soon as `import tn_hf` returns.
    for mod in (".integrations.transformers", ".integrations.timm"):
        try:
            import_module(mod, __name__).install()
        except ModuleNotFoundError as e:  # module not written yet / optional ecosystem missing
            if e.name and (e.name.startswith("tn_hf") or e.name in ("transformers", "timm")):
                continue
            raise


_install_hooks()
