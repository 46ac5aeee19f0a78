"""save_pretrained / from_pretrained for TN-compressed models (safetensors + JSON only).

Layouts written by ``save_pretrained(model, dir)``:

* transformers: ``model.save_pretrained`` (config.json with ``quantization_config`` =
  {"quant_method": "tn_hf", "tn_config": ..., "specs": {module: spec}}, model.safetensors).
  After ``import tn_hf``, ``AutoModelFor*.from_pretrained(dir)`` rebuilds it.
* timm: timm's hub layout (config.json with ``architecture``, ``num_classes``,
  ``pretrained_cfg``, ``model_args``) plus a ``"tn_hf"`` key {"config", "specs", "version"};
  model.safetensors. After ``import tn_hf``, ``timm.create_model("local-dir:DIR" or
  "hf-hub:org/name", pretrained=True)`` rebuilds it.
* plain torch: config.json {"tn_hf": ..., "model_class": "pkg.module:Class", "model_args": {...}}
  (constructor kwargs given as ``save_pretrained(..., model_args=...)``); model.safetensors.

Every save goes through ``atomic_dir``: files are written to a temp dir next to the target and
renamed into place, so a crash leaves the old checkpoint or the new one, never a mix.
Loading never needs the dense checkpoint and is strict: missing/unexpected keys raise.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_dir(final_dir):
    """Yield a fresh temp dir next to ``final_dir``; on success it replaces ``final_dir``.

    On an exception the temp dir is removed and ``final_dir`` (old checkpoint) is untouched."""
    final = Path(final_dir).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


# ----------------------------------------------------------------------------- helpers
def _kind(model) -> str:
    from .compress import _is_transformers
    if _is_transformers(model):
        return "transformers"
    if isinstance(getattr(model, "pretrained_cfg", None), dict) and model.pretrained_cfg.get("architecture"):
        return "timm"
    return "torch"


def tn_metadata(model) -> dict:
    from . import __version__
    specs = getattr(model, "tn_hf_specs", None)
    if not specs:
        raise ValueError(f"{type(model).__name__} carries no TN spec (model.tn_hf_specs); "
                         "compress it with tn_hf.compress(model, config) first")
    return {"config": getattr(model, "tn_hf_config", None), "specs": specs, "version": __version__}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_weights(model: nn.Module, path) -> None:
    from safetensors.torch import save_model
    save_model(model, str(path))  # de-duplicates shared tensors


def load_weights(model: nn.Module, path) -> None:
    """Strictly load ``path`` (safetensors) into ``model``; clear errors naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read weights file {path} (corrupt or truncated safetensors?): {e}") from e
    expected = model.state_dict()
    # tensors shared by two modules are saved once (save_model): fill the other names in
    shared: dict[int, list[str]] = {}
    for k, v in expected.items():
        key = (v.data_ptr(), tuple(v.shape)) if not v.is_meta and v.numel() else k
        shared.setdefault(key, []).append(k)
    for names in shared.values():
        have = [n for n in names if n in state]
        if have:
            for n in names:
                state.setdefault(n, state[have[0]])
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights file {path} does not match {type(model).__name__} built from config.json: "
                         f"missing keys {missing[:20]}, unexpected keys {unexpected[:20]}")
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
           for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"weights file {path} does not match the TN specs in config.json (shape mismatch): "
                         + "; ".join(bad[:10]))
    model.load_state_dict(state, strict=True)


def _card(model, out_dir: Path, report, library_name: str, card_kwargs: dict) -> None:
    try:
        cards = importlib.import_module(".cards", __package__)
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.cards":
            raise
        return
    cards.write_model_card(model, out_dir, report=report, library_name=library_name, **card_kwargs)


# ----------------------------------------------------------------------------- save
def save_pretrained(model: nn.Module, save_directory, *, model_args: dict | None = None,
                    report=None, **card_kwargs) -> Path:
    """Write a TN-compressed model so it reloads with its ecosystem's loader (see module doc)."""
    meta = tn_metadata(model)
    if report is None:
        report = getattr(model, "tn_hf_report", None)
    kind = _kind(model)
    out = Path(save_directory)
    with atomic_dir(out) as tmp:
        if kind == "transformers":
            from .integrations.transformers import attach_quantization_config
            attach_quantization_config(model)
            model.save_pretrained(tmp)
            library = "transformers"
        elif kind == "timm":
            from timm.models._hub import save_config_for_hf
            save_config_for_hf(model, str(tmp / CONFIG_NAME), model_args=model_args)
            cfg = json.loads((tmp / CONFIG_NAME).read_text())
            cfg["tn_hf"] = meta
            _write_json(tmp / CONFIG_NAME, cfg)
            write_weights(model, tmp / WEIGHTS_NAME)
            library = "timm"
        else:
            cls = type(model)
            if model_args is None:
                model_args = getattr(model, "tn_hf_model_args", None)
            try:
                json.dumps(model_args)
            except TypeError as e:
                raise ValueError(f"save_pretrained: model_args must be JSON-serialisable: {e}") from e
            _write_json(tmp / CONFIG_NAME, {"tn_hf": meta, "model_class": f"{cls.__module__}:{cls.__qualname__}",
                                            "model_args": model_args or {}})
            write_weights(model, tmp / WEIGHTS_NAME)
            library = "pytorch"
        _card(model, tmp, report, library, card_kwargs)
    return out


# ----------------------------------------------------------------------------- load
def _local_dir(path_or_repo, revision=None) -> Path:
    p = Path(path_or_repo)
    if p.is_dir():
        return p
    if p.exists() or str(path_or_repo).startswith((".", "/")):
        raise FileNotFoundError(f"from_pretrained: {path_or_repo} is not a checkpoint directory")
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(repo_id=str(path_or_repo), revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "README.md"]))


def read_config(directory) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def from_pretrained(path_or_repo, *, revision: str | None = None, **kwargs) -> nn.Module:
    """Load a checkpoint written by ``save_pretrained`` (dir or hub repo id), strictly."""
    local = _local_dir(path_or_repo, revision)
    cfg = read_config(local)
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") == "tn_hf":
        import transformers
        archs = cfg.get("architectures") or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            raise ValueError(f"{local / CONFIG_NAME}: cannot find the transformers class {archs} "
                             "(config.json 'architectures')")
        return cls.from_pretrained(str(local), **kwargs)
    if "tn_hf" not in cfg:
        raise ValueError(f"{local / CONFIG_NAME} has no TN spec ('tn_hf' key or quantization_config with "
                         "quant_method 'tn_hf'): not a tn_hf checkpoint")
    if "architecture" in cfg:
        import timm
        return timm.create_model(f"local-dir:{local}", pretrained=True, **kwargs)
    return _load_torch(local, cfg, kwargs)


def _load_torch(local: Path, cfg: dict, kwargs: dict) -> nn.Module:
    target = cfg.get("model_class")
    if not target or ":" not in target:
        raise ValueError(f"{local / CONFIG_NAME}: cannot rebuild the model: no 'model_class' "
                         "('package.module:Class'); save with tn_hf.save_pretrained(model, dir, model_args=...)")
    mod_name, _, qual = target.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{local / CONFIG_NAME}: cannot import model_class {target!r}: {e}") from e
    args = dict(cfg.get("model_args") or {}, **kwargs)
    try:
        model = obj(**args)
    except TypeError as e:
        raise ValueError(f"{local / CONFIG_NAME}: cannot build {target}(**{args}): {e}; "
                         "save with model_args= the constructor kwargs") from e
    apply_model_tn(model, cfg["tn_hf"], local / CONFIG_NAME)
    load_weights(model, local / WEIGHTS_NAME)
    model.eval()
    return model


def apply_model_tn(model: nn.Module, meta: dict, where) -> None:
    """Swap the modules named in a saved "tn_hf" block for empty TN layers."""
    from .compress import apply_specs
    specs = meta.get("specs") if isinstance(meta, dict) else None
    if not isinstance(specs, dict) or not specs:
        raise ValueError(f"{where}: 'tn_hf' block has no 'specs' dict {{module name: spec}}")
    try:
        apply_specs(model, specs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    model.tn_hf_config = meta.get("config")
