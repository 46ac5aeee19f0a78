"""save_pretrained / from_pretrained for TN-compressed models (safetensors + JSON only).

Layouts written by ``save_pretrained(model, dir)`` (each with the same ``TNMetadata``, see
``tn_hf.serialization``):

* transformers: ``model.save_pretrained`` (config.json with ``quantization_config`` =
  {"quant_method": "tn_hf", **metadata}, model.safetensors). After ``import tn_hf``,
  ``AutoModelFor*.from_pretrained(dir)`` rebuilds it.
* timm: timm's hub layout (config.json with ``architecture``, ``num_classes``,
  ``pretrained_cfg``, ``model_args``) plus ``"tn_hf": metadata``; model.safetensors. After
  ``import tn_hf``, ``timm.create_model("local-dir:DIR" or "hf-hub:org/name", pretrained=True)``.
* plain torch: config.json {"tn_hf": metadata, "model_class": "pkg.module:Class", "model_args": {...}}
  and model.safetensors. ``model_class`` is informative: loading needs the class from the caller
  (``from_pretrained(dir, model_class=Net)``) or the explicit opt-in ``trust_remote_code=True``.
  For a huggingface_hub ``PyTorchModelHubMixin`` model the constructor kwargs the mixin recorded
  are also at the top level, so that after ``import tn_hf`` ``Net.from_pretrained(dir)`` rebuilds
  it (``tn_hf.integrations.hub_mixin``).

Saving writes only the checkpoint's own files, crash-safely (``serialization.write_checkpoint``):
other files in the folder are never touched. Loading is strict and checks the specs and the
safetensors header before allocating anything.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import re
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import serialization as S
from .cards import write_model_card
from .convert import apply_specs, is_transformers

CHECKPOINT_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json"]


def _kind(model) -> str:
    if is_transformers(model):
        return "transformers"
    if isinstance(getattr(model, "pretrained_cfg", None), dict) and model.pretrained_cfg.get("architecture"):
        return "timm"
    return "torch"


# ----------------------------------------------------------------------------- save
def save_pretrained(model: nn.Module, save_directory, *, model_args: dict | None = None,
                    report=None, **card_kwargs) -> Path:
    """Write a TN-compressed model so that it reloads with its ecosystem's loader (module doc).

    Only the checkpoint's files (config.json, weights, README.md, compression.png,
    tn_hf_report.json) are written into ``save_directory``; nothing else in it is changed."""
    meta = S.TNMetadata.from_model(model)
    if report is None:
        report = getattr(model, "tn_hf_report", None)
    kind = _kind(model)
    if kind == "torch":
        cls = type(model)
        mixin_args = _mixin_init_args(model)
        if model_args is None:  # PyTorchModelHubMixin records the constructor's arguments
            model_args = getattr(model, "tn_hf_model_args", None) or mixin_args
        try:
            json.dumps(model_args)
        except TypeError as e:
            raise ValueError(f"save_pretrained: model_args must be JSON-serialisable: {e}") from e
        if cls.__module__ == "__main__" and not hasattr(cls, "_hub_mixin_config"):  # mixin: cls.from_pretrained
            warnings.warn(f"save_pretrained: {cls.__qualname__} is defined in __main__; loading needs the "
                          f"class: tn_hf.from_pretrained(dir, model_class={cls.__qualname__})", stacklevel=2)

    def render(tmp: Path) -> None:
        if kind == "transformers":
            from transformers import PreTrainedModel

            from .integrations.transformers import attach_quantization_config
            assert isinstance(model, PreTrainedModel)  # _kind checked it
            attach_quantization_config(model)
            model.save_pretrained(tmp)
            library = "transformers"
        elif kind == "timm":
            from timm.models._hub import save_config_for_hf
            save_config_for_hf(model, str(tmp / S.CONFIG_NAME), model_args=model_args)
            cfg = json.loads((tmp / S.CONFIG_NAME).read_text())
            cfg["tn_hf"] = meta.to_dict()
            S.write_json(tmp / S.CONFIG_NAME, cfg)
            S.write_weights(model, tmp / S.WEIGHTS_NAME)
            library = "timm"
        else:
            # a PyTorchModelHubMixin class's from_pretrained reads its constructor kwargs at the top level
            S.write_json(tmp / S.CONFIG_NAME, {**mixin_args, "tn_hf": meta.to_dict(), "model_args": model_args or {},
                                               "model_class": f"{cls.__module__}:{cls.__qualname__}"})
            S.write_weights(model, tmp / S.WEIGHTS_NAME)
            library = "pytorch"
        write_model_card(model, tmp, report=report, library_name=library, local_path=str(out), **card_kwargs)

    out = Path(save_directory)
    S.write_checkpoint(out, render)
    return out


def _mixin_init_args(model) -> dict:
    """The constructor kwargs huggingface_hub's ``PyTorchModelHubMixin`` recorded on ``model`` ({} for
    other models); they go to the top level of config.json, where the mixin's from_pretrained reads them.
    tn_hf's own keys are left out (a model the mixin loaded may have recorded the whole config.json)."""
    args = getattr(model, "_hub_mixin_config", None)
    if dataclasses.is_dataclass(args) and not isinstance(args, type):
        args = dataclasses.asdict(args)
    if not isinstance(args, dict):
        return {}
    clash = sorted(set(_TORCH_KEYS) & set(getattr(type(model), "_hub_mixin_init_parameters", None) or ()))
    if clash:
        raise ValueError(f"save_pretrained: {type(model).__name__}.__init__ takes {clash}, keys tn_hf writes to "
                         f"config.json; the mixin would pass tn_hf's values to it: rename the argument (tn_hf "
                         f"uses {list(_TORCH_KEYS)})")
    return {k: v for k, v in args.items() if k not in _TORCH_KEYS}


_TORCH_KEYS = ("tn_hf", "model_args", "model_class")


# ----------------------------------------------------------------------------- resolve
_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}\Z", re.ASCII)


def is_repo_id(text: str) -> bool:
    """'name' or 'org/name' as the Hub accepts them (no '..', '--', leading '.', '/', '~')."""
    return bool(_REPO_ID.match(text)) and ".." not in text and "--" not in text and not text.endswith((".", "-"))


def resolve(path_or_repo, revision: str | None = None) -> Path:
    """A local checkpoint folder, or a Hub repo id fetched (checkpoint files only) into the cache.

    A path that does not exist is only read as a repo id when it is a valid one; errors name both
    readings."""
    text = str(path_or_repo)
    p = Path(text).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise NotADirectoryError(f"from_pretrained: {text} is a file, not a checkpoint folder")
    local = f"no local folder {str(p.absolute())!r}"
    if not is_repo_id(text):
        raise FileNotFoundError(f"from_pretrained: {text!r} is neither a local folder ({local}) nor a valid "
                                "Hub repo id ('name' or 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    try:
        return Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"from_pretrained: {text!r} is neither a local folder ({local}) nor a Hub "
                                f"repo that exists: {type(e).__name__}") from e
    except (HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(f"from_pretrained: {text!r}: {local}, and the Hub repo of that name could "
                                f"not be fetched: {e}") from e


def read_checkpoint_config(folder: Path) -> dict:
    S.recover(folder)  # finish a save that was interrupted after its commit point
    return S.read_json(folder / S.CONFIG_NAME)


# ----------------------------------------------------------------------------- load
def from_pretrained(path_or_repo, *, model_class: type | None = None, trust_remote_code: bool = False,
                    revision: str | None = None, **kwargs) -> nn.Module:
    """Load a checkpoint written by ``save_pretrained`` (folder or Hub repo id), strictly.

    Args:
        path_or_repo: a local folder or a Hub repo id.
        model_class: the ``nn.Module`` class to build (plain-torch checkpoints need it, or
            ``trust_remote_code``); for transformers checkpoints a ``PreTrainedModel`` class.
        trust_remote_code: import the class a plain-torch checkpoint names in config.json.
        revision: Hub revision.
        kwargs: passed to the model's constructor / loader.
    """
    local = resolve(path_or_repo, revision)
    cfg = read_checkpoint_config(local)
    where = local / S.CONFIG_NAME
    qc = cfg.get("quantization_config") or {}
    if isinstance(qc, dict) and qc.get("quant_method") == "tn_hf":
        return _load_transformers(local, cfg, model_class, kwargs)
    if "tn_hf" not in cfg:
        raise S.CheckpointError(f"{where} has no TN metadata ('tn_hf' key or quantization_config with "
                                "quant_method 'tn_hf'): not a tn_hf checkpoint")
    if "architecture" in cfg:
        import timm
        _dry_run_timm(local, cfg, kwargs)
        return timm.create_model(f"local-dir:{local}", pretrained=True, **kwargs)
    return _load_torch(local, cfg, model_class, trust_remote_code, kwargs)


def _dry_run_timm(local: Path, cfg: dict, kwargs: dict) -> None:
    """Build the timm model on the meta device from config.json and check it, specs applied, against
    the safetensors header: a hostile config (huge num_classes, ranks) fails before timm allocates."""
    import timm
    if not isinstance(cfg.get("architecture"), str) or not timm.is_model(cfg["architecture"]):
        raise S.CheckpointError(f"{local / S.CONFIG_NAME}: architecture {cfg.get('architecture')!r} is not a "
                                "timm model name")
    args = dict(cfg.get("model_args") or {}, **kwargs)
    if "num_classes" in kwargs and kwargs["num_classes"] != cfg.get("num_classes"):
        return  # a new head: timm re-initialises it, nothing to compare
    try:
        with torch.device("meta"):
            probe = timm.create_model(cfg["architecture"], pretrained=False, **args)
    except Exception:  # noqa: BLE001 - arguments only timm's own loader understands: it checks them itself
        return
    _check_on_meta(probe, S.TNMetadata.from_dict(cfg["tn_hf"], str(local / S.CONFIG_NAME)), local)


def _check_on_meta(probe: nn.Module, meta: S.TNMetadata, local: Path, header: dict | None = None) -> None:
    """``probe`` (a model built on the meta device) with the specs applied against the weights' header:
    every check of a load, at no memory and no init cost."""
    apply_specs(probe, meta.specs, where=str(local / S.CONFIG_NAME))
    S.check_against_header(probe, header or S.read_header(local / S.WEIGHTS_NAME), local / S.WEIGHTS_NAME)


def transformers_class(cfg: dict):
    """The transformers model class config.json's ``architectures`` names (None if it names none);
    only ``PreTrainedModel`` subclasses that transformers itself exports are returned."""
    import transformers
    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def _load_transformers(local: Path, cfg: dict, model_class, kwargs) -> nn.Module:
    import transformers
    if model_class is None:
        model_class = transformers_class(cfg)
        if model_class is None:
            raise S.CheckpointError(f"{local / S.CONFIG_NAME}: transformers has no model class "
                                    f"{cfg.get('architectures')} (config.json 'architectures'); pass model_class=")
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise TypeError(f"from_pretrained: {model_class!r} is not a transformers PreTrainedModel class")
    pretrained: Any = model_class  # a PreTrainedModel subclass (checked above)
    return pretrained.from_pretrained(str(local), **kwargs)


def _import_class(target, where) -> object:
    """'pkg.module:Class[.Inner]' -> the class: one import, then attributes of classes only (the
    caller checks that what it names is an nn.Module subclass)."""
    if not isinstance(target, str) or target.count(":") != 1:
        raise S.CheckpointError(f"{where}: model_class {target!r} must be 'package.module:Class'")
    mod_name, qual = target.split(":")
    try:
        obj = importlib.import_module(mod_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
            if isinstance(obj, types.ModuleType):
                raise AttributeError(f"{part!r} is a module, not a class")
    except (ImportError, AttributeError, ValueError) as e:
        raise S.CheckpointError(f"{where}: cannot import model_class {target!r}: {e}") from e
    return obj


def _load_torch(local: Path, cfg: dict, model_class, trust_remote_code: bool, kwargs: dict) -> nn.Module:
    where = local / S.CONFIG_NAME
    named = cfg.get("model_class")
    if model_class is None:
        if not named:
            raise S.CheckpointError(f"{where}: cannot rebuild the model: no 'model_class'; pass it: "
                                    f"tn_hf.from_pretrained({str(local)!r}, model_class=YourModel)")
        if not trust_remote_code:
            short = str(named).rpartition(":")[2] or "YourModel"
            raise PermissionError(
                f"{where} names the model class {named!r}; tn_hf does not import or call code a checkpoint "
                f"names unless you opt in: pass the class, tn_hf.from_pretrained({str(local)!r}, "
                f"model_class={short}), or pass trust_remote_code=True to import {named!r}")
        model_class = _import_class(named, where)
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise TypeError(f"from_pretrained: model_class must be an nn.Module subclass, got {model_class!r}")
    model_args = cfg.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise S.CheckpointError(f"{where}: 'model_args' must be an object of constructor kwargs")
    args = dict(model_args, **kwargs)
    meta = S.TNMetadata.from_dict(cfg["tn_hf"], str(where))
    header = S.read_header(local / S.WEIGHTS_NAME)
    with torch.device("meta"):
        _check_on_meta(_build(model_class, args, where), meta, local, header)
    return load_into(_build(model_class, args, where), meta, local / S.WEIGHTS_NAME, header, where)


def load_into(model: nn.Module, meta: S.TNMetadata, weights, header: dict | None = None,
              where="config.json") -> nn.Module:
    """Swap ``model``'s modules for empty TN layers from ``meta.specs`` (checked against the modules they
    replace) and load ``weights`` strictly (checked against the header before the layers are allocated);
    returns the model in eval mode."""
    apply_specs(model, meta.specs, where=str(where))
    setattr(model, "tn_hf_config", meta.config)
    S.load_weights(model, weights, header)
    model.eval()
    return model


def _build(model_class, args: dict, where) -> nn.Module:
    try:
        return model_class(**args)
    except TypeError as e:
        raise S.CheckpointError(f"{where}: cannot build {model_class.__qualname__}(**{args}): {e}; save with "
                                "model_args= the constructor kwargs") from e
