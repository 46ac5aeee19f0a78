"""timm hook: ``timm.create_model("local-dir:DIR" | "hf-hub:org/name", pretrained=True)`` on a
checkpoint written by ``tn_hf.save_pretrained``.

timm has no extension point between building a model and loading its weights, so this is the
one place tn_hf patches a library: ``install()`` wraps ``timm.models._builder.load_pretrained``
(what ``create_model`` calls) and its public re-export ``timm.models.load_pretrained``, for the
timm versions in ``SUPPORTED`` whose signature matches. When the checkpoint's config.json has a
``"tn_hf"`` key, the wrapper swaps the named modules for empty TN layers from the specs, checks
them against the safetensors header and loads it strictly. Any other checkpoint goes to timm's
own function (kept as ``wrapper.__wrapped__``; ``uninstall()`` restores it), outside any handler of
tn_hf's: its errors (an unreachable Hub, missing weights) reach the caller unchanged and unchained.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from pathlib import Path

from .. import serialization as S
from ..convert import apply_specs

SUPPORTED = ((1, 0), (2, 0))  # [min, max) timm versions whose load_pretrained this wraps
_PARAMS = ("model", "pretrained_cfg", "num_classes", "in_chans", "filter_fn", "strict")


def _tn_checkpoint(pretrained_cfg: dict, cache_dir=None) -> tuple[S.TNMetadata, Path, Path] | None:
    """(metadata, config path, weights path) if ``pretrained_cfg`` points at a tn_hf checkpoint."""
    source = pretrained_cfg.get("source")
    if source == "local-dir" and pretrained_cfg.get("file"):
        root = Path(pretrained_cfg["file"])
        S.recover(root)
        cfg_path, weights = root / S.CONFIG_NAME, root / S.WEIGHTS_NAME
    elif source == "hf-hub" and pretrained_cfg.get("hf_hub_id"):
        from timm.models._hub import download_from_hf
        try:
            cfg_path = Path(download_from_hf(pretrained_cfg["hf_hub_id"], S.CONFIG_NAME, cache_dir=cache_dir))
        except Exception:  # noqa: BLE001 - Hub unreachable, no config.json: timm's own loader reports it as is
            return None
        weights = None
    else:
        return None
    if not cfg_path.is_file():
        return None
    cfg = S.read_json(cfg_path)
    if "tn_hf" not in cfg:
        return None
    meta = S.TNMetadata.from_dict(cfg["tn_hf"], str(cfg_path))
    if weights is None:
        weights = Path(download_from_hf(pretrained_cfg["hf_hub_id"], S.WEIGHTS_NAME, cache_dir=cache_dir))
    return meta, cfg_path, weights


def load_tn_checkpoint(model, meta: S.TNMetadata, cfg_path, weights, num_classes=None) -> None:
    """Empty TN layers from the specs (meta device), header check, then a strict load. When the
    model was built for another ``num_classes`` than the checkpoint's, its classifier keeps its fresh
    initialisation (as timm does for its own checkpoints)."""
    header = S.read_header(weights)
    saved = S.read_json(cfg_path)
    head = ()
    if num_classes is not None and saved.get("num_classes") not in (None, num_classes):
        cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or \
            (saved.get("pretrained_cfg") or {}).get("classifier")
        head = tuple([cls] if isinstance(cls, str) else cls or ())
        if not head:
            raise S.CheckpointError(f"{cfg_path}: num_classes={num_classes} differs from the checkpoint's "
                                    f"{saved['num_classes']} and the model names no classifier to re-initialise")
    specs = {n: s for n, s in meta.specs.items() if n not in head}
    if specs:
        apply_specs(model, specs, where=str(cfg_path))
    model.tn_hf_specs = specs
    model.tn_hf_config = meta.config
    S.load_weights(model, weights, header, skip=head)


def _make_wrapper(original):
    @functools.wraps(original)
    def load_pretrained(model, pretrained_cfg=None, *args, cache_dir=None, **kwargs):
        __tracebackhide__ = True  # noqa: F841 - pytest and IPython leave this frame out of timm's errors
        cfg = pretrained_cfg or getattr(model, "pretrained_cfg", None) or {}
        found = _tn_checkpoint(cfg, cache_dir)
        if found is None:
            return original(model, pretrained_cfg, *args, cache_dir=cache_dir, **kwargs)
        num_classes = args[0] if args else kwargs.get("num_classes")
        load_tn_checkpoint(model, *found, num_classes=num_classes)

    load_pretrained.__wrapped__ = original
    setattr(load_pretrained, "_tn_hf", True)  # the mark install() and uninstall() look for
    return load_pretrained


def _supported(timm_version: str, fn) -> bool:
    try:
        v = tuple(int(x) for x in timm_version.split(".")[:2])
    except ValueError:
        return False
    params = list(inspect.signature(fn).parameters)
    return SUPPORTED[0] <= v < SUPPORTED[1] and params[:len(_PARAMS)] == list(_PARAMS) and "cache_dir" in params


def install() -> bool:
    """Wrap timm's load_pretrained (idempotent); False (with a warning) on an unsupported timm."""
    import timm
    import timm.models as public
    from timm.models import _builder
    current = _builder.load_pretrained
    if getattr(current, "_tn_hf", False):
        return True
    if not _supported(timm.__version__, current):
        warnings.warn(f"tn_hf: timm {timm.__version__} is not supported by the tn_hf loader hook (needs "
                      f"{SUPPORTED[0]} <= version < {SUPPORTED[1]}); timm.create_model won't load tn_hf "
                      "checkpoints, use tn_hf.from_pretrained", stacklevel=2)
        return False
    wrapper = _make_wrapper(current)
    _builder.load_pretrained = wrapper
    if getattr(public, "load_pretrained", None) is current:
        public.load_pretrained = wrapper
    return True


def uninstall() -> None:
    import timm.models as public
    from timm.models import _builder
    current = _builder.load_pretrained
    if getattr(current, "_tn_hf", False):
        original = current.__wrapped__  # type: ignore[attr-defined]  # our wrapper's (_make_wrapper)
        _builder.load_pretrained = original
        if public.load_pretrained is current:
            public.load_pretrained = original
