"""transformers plugin: quantization method ``"tn_hf"``.

A compressed transformers model carries ``config.quantization_config`` = ``TNQuantizationConfig``
(the TNConfig and ``{module name: TN layer spec}``), so ``model.save_pretrained(dir)`` writes the
specs into config.json. After ``import tn_hf``, ``AutoModel*.from_pretrained(dir)`` builds the
model on the meta device, ``TNQuantizer`` swaps the named modules for empty TN layers from the
specs, and transformers loads the safetensors into them. Loading is strict: a missing or
unexpected key raises (transformers itself only warns).

Without ``import tn_hf`` transformers does not know the method, warns and loads random
weights: always ``import tn_hf`` first.
"""
from __future__ import annotations

from typing import Any

QUANT_METHOD = "tn_hf"
_installed: dict[str, Any] = {}


def _classes():
    if "config" in _installed:
        return _installed["config"], _installed["quantizer"]
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class TNQuantizationConfig(QuantizationConfigMixin):
        """``quantization_config`` of a TN-compressed model: TNConfig dict + per-module specs."""

        def __init__(self, tn_config: dict | None = None, specs: dict | None = None,
                     tn_hf_version: str | None = None, **kwargs):
            from .. import __version__
            self.quant_method = QUANT_METHOD
            self.tn_config = dict(tn_config or {})
            self.specs = dict(specs or {})
            self.tn_hf_version = tn_hf_version or __version__
            kwargs.pop("quant_method", None)
            if kwargs:
                raise ValueError(f"quantization_config (tn_hf): unknown keys {sorted(kwargs)}; "
                                 "valid keys are ['quant_method', 'specs', 'tn_config', 'tn_hf_version']")

        def to_dict(self) -> dict[str, Any]:
            return {"quant_method": QUANT_METHOD, "tn_config": self.tn_config, "specs": self.specs,
                    "tn_hf_version": self.tn_hf_version}

    class TNQuantizer(HfQuantizer):
        """Swaps modules for empty TN layers before weight loading; enforces a strict load."""

        requires_calibration = False

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            if not self.pre_quantized:
                raise ValueError("tn_hf: quantization_config=TNQuantizationConfig is for loading "
                                 "checkpoints saved by tn_hf; to compress a model use tn_hf.compress()")

        def _process_model_before_weight_loading(self, model, **kwargs):
            from ..compress import apply_specs
            apply_specs(model, self.quantization_config.specs)
            model.tn_hf_config = dict(self.quantization_config.tn_config)
            _make_load_strict(model)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            model.__dict__.pop("_adjust_missing_and_unexpected_keys", None)
            _restore_non_persistent_buffers(model)
            return model

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return True

        @property
        def is_qat_trainable(self):
            return True

        @property
        def is_compileable(self):
            return True

        def _dequantize(self, model, dtype=None):
            from ..compress import decompress
            return decompress(model)

    TNQuantizationConfig.__module__ = TNQuantizer.__module__ = __name__
    _installed["config"], _installed["quantizer"] = TNQuantizationConfig, TNQuantizer
    return TNQuantizationConfig, TNQuantizer


def _make_load_strict(model) -> None:
    """Wrap this instance's key adjustment so that leftover missing/unexpected keys raise."""
    original = model._adjust_missing_and_unexpected_keys

    def strict_adjust(loading_info):
        original(loading_info)
        missing = sorted(loading_info.missing_keys)
        unexpected = sorted(loading_info.unexpected_keys)
        if missing or unexpected:
            raise RuntimeError(
                f"tn_hf: strict load of {type(model).__name__} failed: missing keys {missing[:20]}, "
                f"unexpected keys {unexpected[:20]} (the checkpoint does not match the TN specs in "
                "config.json's quantization_config)")
    model._adjust_missing_and_unexpected_keys = strict_adjust


def _restore_non_persistent_buffers(model) -> None:
    """Non-persistent buffers of TN layers were created on meta and only allocated by
    transformers: recompute them from a fresh layer built from the spec."""
    from ..layers import layer_from_spec
    for name, spec in (getattr(model, "tn_hf_specs", None) or {}).items():
        layer = model.get_submodule(name)
        persistent = set(layer.state_dict().keys())
        bufs = [(n, b) for n, b in layer.named_buffers() if n not in persistent]
        if not bufs:
            continue
        fresh = dict(layer_from_spec(spec).named_buffers())
        for n, b in bufs:
            mod_name, _, leaf = n.rpartition(".")
            owner = layer.get_submodule(mod_name) if mod_name else layer
            owner._buffers[leaf] = fresh[n].to(device=b.device)


def attach_quantization_config(model) -> None:
    """Record the model's TN specs as ``model.config.quantization_config`` (for save_pretrained)."""
    cfg_cls, _ = _classes()
    qc = cfg_cls(tn_config=getattr(model, "tn_hf_config", {}), specs=getattr(model, "tn_hf_specs", {}))
    model.config.quantization_config = qc


def detach_quantization_config(model) -> None:
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if "is_quantized" in model.__dict__:
        model.is_quantized = False


def install() -> None:
    """Register the ``tn_hf`` quantization method with transformers (idempotent)."""
    from transformers.quantizers import auto, register_quantization_config, register_quantizer
    cfg_cls, q_cls = _classes()
    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not cfg_cls:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(cfg_cls)
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not q_cls:
        auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(q_cls)


def uninstall() -> None:
    from transformers.quantizers import auto
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
    auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
