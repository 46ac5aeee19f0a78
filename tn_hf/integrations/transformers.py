"""transformers plugin: quantization method ``"tn_hf"`` (imported once transformers is imported).

A compressed transformers model carries ``config.quantization_config`` = ``TNQuantizationConfig``
(the checkpoint metadata, ``tn_hf.serialization.TNMetadata``), so ``model.save_pretrained(dir)``
writes the specs into config.json. After ``import tn_hf``, ``AutoModel*.from_pretrained(dir)``
builds the model on the meta device and ``TNQuantizer`` checks the specs against the modules and
the safetensors headers transformers passes in (names, shapes, dtypes: a missing or unexpected
key raises, where transformers alone only warns), then swaps the named modules for empty TN
layers that transformers fills.

Compress while loading, the way other quantization methods work:
``AutoModel*.from_pretrained(dense_id, quantization_config=TNConfig(...))`` loads the dense weights
and decomposes the targets (direct decomposition) before returning the model.

Without ``import tn_hf`` transformers does not know the method, warns and loads random
weights: always ``import tn_hf`` first.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import serialization as S
from ..convert import MODEL_HOOKS, apply_specs, compress, decompress
from ..layers.base import TNLayer

QUANT_METHOD = "tn_hf"


@register_quantization_config(QUANT_METHOD)
class TNQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of a TN-compressed model: ``TNMetadata`` plus ``quant_method``.

    Args:
        specs: {module name: TN layer spec}.
        config: the ``TNConfig`` dict used to compress.
        tn_hf_version: the tn_hf version that wrote it.
        format_version: the checkpoint metadata format (newer than this tn_hf reads: an error).
    """

    def __init__(self, specs: dict | None = None, config: dict | None = None, tn_hf_version: str | None = None,
                 format_version: int = S.FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # a registered name, not a built-in enum member
        d = dict(kwargs, specs=specs, format_version=format_version)
        for k, v in (("config", config), ("tn_hf_version", tn_hf_version)):
            if v is not None:
                d[k] = v
        self.metadata = S.TNMetadata.from_dict(d, "config.json quantization_config")

    @property
    def specs(self) -> dict:
        return self.metadata.specs

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, **self.metadata.to_dict()}


@register_quantizer(QUANT_METHOD)
class TNQuantizer(HfQuantizer):
    """Loads tn_hf checkpoints (checks them, swaps modules for empty TN layers before weight loading)
    and compresses dense checkpoints while loading (``quantization_config=TNConfig(...)``)."""

    requires_calibration = False
    quantization_config: TNQuantizationConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:  # a dense checkpoint: it loads as usual, then is compressed
            return model
        where = "config.json quantization_config"
        apply_specs(model, self.quantization_config.specs, where=where)
        model.tn_hf_config = self.quantization_config.metadata.config
        if checkpoint_files:
            header: dict = {}
            for f in checkpoint_files:
                if str(f).endswith(".safetensors"):
                    header.update(S.read_header(f))
            if header:
                S.check_cores_against_header(model, header, checkpoint_files[0])
                prefixes = tuple(f"{name}." for name in self.quantization_config.specs)
                state = model.state_dict(keep_vars=True)
                unexpected = sorted(k for k in header if k.startswith(prefixes) and k not in state)
                if unexpected:  # transformers would only warn and drop them
                    raise S.CheckpointError(f"weights file {checkpoint_files[0]}: unexpected keys in the TN layers "
                                            f"{unexpected[:10]}; the layers the specs build have no such tensors")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            compress(model, self.quantization_config, progress=False)
            return model
        unloaded = _unloaded_tn_parameters(model)
        if unloaded:  # transformers only warns; these layers would keep uninitialised memory
            raise S.CheckpointError(f"the checkpoint's weights name none of these TN parameters of "
                                    f"{type(model).__name__} (missing keys): {unloaded[:10]}; its TN cores are "
                                    "named otherwise (renamed, or another model's): every TN core loads by name")
        bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
        if bad:
            warnings.warn(f"tn_hf: parameters with NaN/Inf values after loading: {bad[:10]}", stacklevel=2)
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
        return decompress(model)


def _unloaded_tn_parameters(model) -> list[str]:
    """The parameters of TN layers that transformers did not fill from the checkpoint (it flags each
    tensor it loads with ``_is_hf_initialized``; it has no initialiser for TN layers)."""
    tn = {id(p) for m in model.modules() if isinstance(m, TNLayer) for p in m.parameters()}
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if id(p) in tn and not getattr(p, "_is_hf_initialized", False)]


def attach_quantization_config(model) -> None:
    """Record the model's TN specs as ``model.config.quantization_config`` (for save_pretrained)."""
    if not hasattr(model, "config"):
        return
    meta = S.TNMetadata.from_model(model)
    model.config.quantization_config = TNQuantizationConfig(**meta.to_dict())


def detach_quantization_config(model) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if "is_quantized" in model.__dict__:
        model.is_quantized = False


def _is_tf_model(model) -> bool:
    from transformers import PreTrainedModel
    return isinstance(model, PreTrainedModel)


def install() -> None:
    """Keep ``config.quantization_config`` in step with compress / decompress (idempotent)."""
    hooks = [(MODEL_HOOKS["specs_changed"], _on_specs_changed), (MODEL_HOOKS["decompressed"], _on_decompressed)]
    for lst, fn in hooks:
        if fn not in lst:
            lst.append(fn)


def _on_specs_changed(model) -> None:
    if _is_tf_model(model):
        attach_quantization_config(model)


def _on_decompressed(model) -> None:
    if _is_tf_model(model):
        detach_quantization_config(model)
