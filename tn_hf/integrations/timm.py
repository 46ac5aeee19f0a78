"""timm hook: ``timm.create_model("local-dir:DIR" | "hf-hub:org/name", pretrained=True)`` on a
checkpoint written by ``tn_hf.save_pretrained``.

timm builds the dense model and then calls ``timm.models._builder.load_pretrained``; ``install()``
wraps that function. When the checkpoint's config.json (local dir or hub repo) has a ``"tn_hf"``
key, the wrapper swaps the named modules for empty TN layers from the specs and loads
model.safetensors strictly (missing/unexpected keys or wrong shapes raise). Any other
checkpoint goes to timm's original function (kept as ``wrapper.__wrapped__`` for uninstall).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path


def _tn_checkpoint(pretrained_cfg: dict, cache_dir=None):
    """(config dict, weights path) if this pretrained_cfg points at a tn_hf checkpoint, else None."""
    source = pretrained_cfg.get("source")
    if source == "local-dir" and pretrained_cfg.get("file"):
        root = Path(pretrained_cfg["file"])
        cfg_path, weights = root / "config.json", root / "model.safetensors"
    elif source == "hf-hub" and pretrained_cfg.get("hf_hub_id"):
        from timm.models._hub import download_from_hf
        cfg_path = Path(download_from_hf(pretrained_cfg["hf_hub_id"], "config.json", cache_dir=cache_dir))
        weights = None
    else:
        return None
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if "tn_hf" not in cfg:
        return None
    if weights is None:
        weights = Path(download_from_hf(pretrained_cfg["hf_hub_id"], "model.safetensors", cache_dir=cache_dir))
    return cfg, cfg_path, weights


def _make_wrapper(original):
    @functools.wraps(original)
    def load_pretrained(model, pretrained_cfg=None, num_classes=1000, in_chans=3, filter_fn=None,
                        strict=True, cache_dir=None, **kwargs):
        cfg = pretrained_cfg or getattr(model, "pretrained_cfg", None) or {}
        found = _tn_checkpoint(cfg, cache_dir)
        if found is None:
            return original(model, pretrained_cfg=pretrained_cfg, num_classes=num_classes, in_chans=in_chans,
                            filter_fn=filter_fn, strict=strict, cache_dir=cache_dir, **kwargs)
        from ..hub import apply_model_tn, load_weights
        config, cfg_path, weights = found
        apply_model_tn(model, config["tn_hf"], cfg_path)
        load_weights(model, weights)

    load_pretrained.__wrapped__ = original
    load_pretrained._tn_hf = True
    return load_pretrained


def install() -> None:
    """Wrap timm's load_pretrained (idempotent)."""
    from timm.models import _builder
    if getattr(_builder.load_pretrained, "_tn_hf", False):
        return
    _builder.load_pretrained = _make_wrapper(_builder.load_pretrained)


def uninstall() -> None:
    from timm.models import _builder
    if getattr(_builder.load_pretrained, "_tn_hf", False):
        _builder.load_pretrained = _builder.load_pretrained.__wrapped__
