"""Checkpoint I/O shared by every layout: the metadata schema, crash-safe writes, checked loads.

Metadata
    One object, ``TNMetadata`` = ``{"format_version", "tn_hf_version", "config", "specs"}``, is
    stored as ``config.json["tn_hf"]`` (timm and plain torch layouts) or inside
    ``config.json["quantization_config"]`` next to ``"quant_method": "tn_hf"`` (transformers).
    On load an unknown key is a warning and a newer ``format_version`` a clear error.

Writes (``write_checkpoint``)
    Files are rendered into a staging folder *inside* the target folder (same file system), each
    flushed and fsynced; then a journal ``.tn_hf-commit.json`` naming them is written atomically;
    then each file is moved into place with ``os.replace`` (weights first, ``config.json`` last)
    and the journal removed. Nothing else in the folder is touched, and the folder keeps its mode.
    A crash before the journal exists leaves the old checkpoint (the staging folder is removed by
    the next save or load); a crash after it is rolled forward by ``recover`` (every tn_hf loader
    and the next save call it) to the new checkpoint.

Loads (``read_header``, ``check_specs``, ``check_against_header``)
    Specs are checked as data (types, known classes) and against the module each one replaces
    (class, features, channels, kernel, layers...) before any layer is built; layers are built on
    the meta device and compared with the safetensors header (names, shapes, dtypes) before any
    memory is allocated for them.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from ._version import __version__
from .layers import registry, tn_class_for

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
JOURNAL = ".tn_hf-commit.json"
STAGING_PREFIX = ".tn_hf-staging-"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is (corrupt, mismatched, hostile or newer)."""


# ----------------------------------------------------------------------------- metadata
@dataclass
class TNMetadata:
    """What tn_hf stores in a checkpoint's config.json (see module docstring)."""

    specs: dict[str, dict]
    config: dict[str, Any] | None = None
    tn_hf_version: str = __version__
    format_version: int = FORMAT_VERSION
    _LEGACY = {"tn_config": "config", "version": "tn_hf_version"}  # pre-schema key names

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "tn_hf_version": self.tn_hf_version,
                "config": self.config, "specs": self.specs}

    @classmethod
    def from_model(cls, model: nn.Module) -> "TNMetadata":
        specs = getattr(model, "tn_hf_specs", None)
        if not specs:
            raise ValueError(f"{type(model).__name__} carries no TN spec (model.tn_hf_specs); "
                             "compress it with tn_hf.compress(model, config) first")
        return cls(specs=dict(specs), config=getattr(model, "tn_hf_config", None))

    @classmethod
    def from_dict(cls, d, where="config.json") -> "TNMetadata":
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: tn_hf metadata must be an object, got {type(d).__name__}")
        d = {cls._LEGACY.get(k, k): v for k, v in d.items() if k != "quant_method"}
        version = d.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CheckpointError(f"{where}: format_version={version!r} must be an int >= 1")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{where}: written by a newer tn_hf (checkpoint format {version}, "
                                  f"tn_hf {d.get('tn_hf_version')}); this tn_hf {__version__} reads format "
                                  f"<= {FORMAT_VERSION}: upgrade tn_hf (pip install -U tn_hf)")
        known = {"format_version", "tn_hf_version", "config", "specs"}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"{where}: ignoring unknown tn_hf metadata keys {unknown}", stacklevel=2)
        specs = d.get("specs")
        if not isinstance(specs, dict) or not specs:
            raise CheckpointError(f"{where}: tn_hf metadata needs 'specs', a non-empty object "
                                  "{module name: layer spec}")
        config = d.get("config")
        if config is not None and not isinstance(config, dict):
            raise CheckpointError(f"{where}: tn_hf metadata 'config' must be an object or null")
        return cls(specs=specs, config=config, tn_hf_version=str(d.get("tn_hf_version", "unknown")),
                   format_version=version)


# ----------------------------------------------------------------------------- spec checks
_INT_LIST_KEYS = ("ranks", "in_factors", "out_factors", "kernel_size", "stride", "padding", "dilation")
_INTERFACE = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
              "padding", "dilation", "groups", "padding_mode", "bias", "input_size", "hidden_size",
              "num_layers", "batch_first", "bidirectional")
_MAX_DIM = 2 ** 31


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_spec_data(name: str, spec, where: str, depth: int = 0) -> None:
    """Types only: a dict with a known class, int ranks/factors in range, nested specs alike."""
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: spec of module {name!r} must be an object, got {type(spec).__name__}")
    cls = spec.get("class")
    if cls not in registry:
        raise CheckpointError(f"{where}: module {name!r}: unknown TN layer class {cls!r}; "
                              f"known: {sorted(registry)}")
    for key in _INT_LIST_KEYS:
        v = spec.get(key)
        if v is None or (key == "padding" and isinstance(v, str)):
            continue
        items = [v] if not isinstance(v, list) else v
        if not items or len(items) > 64 or not all(_is_int(x) and 0 <= x < _MAX_DIM for x in items):
            raise CheckpointError(f"{where}: module {name!r}: {key}={v!r} must be a non-empty list of "
                                  f"non-negative ints (or one int)")
        if key in ("ranks", "in_factors", "out_factors") and min(items) < 1:
            raise CheckpointError(f"{where}: module {name!r}: {key}={v!r} must be >= 1")
    subs = spec.get("weights")
    if subs is not None:
        if depth > 0 or not isinstance(subs, dict):
            raise CheckpointError(f"{where}: module {name!r}: 'weights' must be an object of leaf specs")
        for k, sub in subs.items():
            _check_spec_data(f"{name}.{k}", sub, where, depth + 1)


def _norm(v):
    if isinstance(v, torch.Tensor) or v is None:  # nn.Linear/Conv: bias is a tensor or None
        return v is not None
    if isinstance(v, (tuple, list)):
        return [_norm(x) for x in v]
    return v


def _interface(obj, keys) -> dict:
    get = obj.get if isinstance(obj, dict) else (lambda k: getattr(obj, k))
    return {k: _norm(get(k)) for k in keys}


def check_specs(model: nn.Module, specs, where: str = "checkpoint") -> None:
    """Every spec is well-formed data and fits the module it replaces (no allocation)."""
    if not isinstance(specs, dict) or not specs:
        raise CheckpointError(f"{where}: 'specs' must be a non-empty object {{module name: spec}}")
    modules = dict(model.named_modules())
    for name, spec in specs.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{where}: spec names must be non-empty module names, got {name!r}")
        if name not in modules:
            raise CheckpointError(f"{where}: spec names module {name!r}, which {type(model).__name__} does not "
                                  f"have; some module names: {[n for n in modules if n][:20]}")
        _check_spec_data(name, spec, where)
        module = modules[name]
        try:
            expected = tn_class_for(module, spec.get("format", "tt"))
        except ValueError as e:
            raise CheckpointError(f"{where}: module {name!r}: {e}") from None
        if spec["class"] != expected.__name__:
            raise CheckpointError(f"{where}: module {name!r} is a {type(module).__name__}; spec class "
                                  f"{spec['class']!r} would change its interface (valid: {expected.__name__})")
        keys = [k for k in _INTERFACE if k in spec and hasattr(module, k)]
        have, want = _interface(spec, keys), _interface(module, keys)
        diff = {k: (have[k], want[k]) for k in keys if have[k] != want[k]}
        if diff:
            raise CheckpointError(f"{where}: module {name!r}: spec changes the {type(module).__name__}'s "
                                  "interface: " + ", ".join(f"{k}={a!r} (module has {b!r})"
                                                            for k, (a, b) in diff.items()))


# ----------------------------------------------------------------------------- safetensors header
def read_header(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header, without reading tensor data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read weights file {path} (corrupt or truncated safetensors?): {e}") from e


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def _expected_entries(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """{one state-dict name: every name sharing that tensor} (tied tensors are saved once)."""
    groups: dict[Any, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if skip and k.startswith(skip):
            continue
        key = (id(v), tuple(v.shape)) if v.numel() else k
        groups.setdefault(key, []).append(k)
    return {names[0]: names for names in groups.values()}


_CORE = re.compile(r"(^|\.)cores\.\d+$")


def check_against_header(model: nn.Module, header: dict, path, *, skip: tuple[str, ...] = ()) -> None:
    """Names, shapes and dtypes of ``model``'s state dict (may be on meta) against the file's header
    (state-dict names starting with a prefix in ``skip`` are left out)."""
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if not (skip and k.startswith(skip))}
    groups = _expected_entries(model, skip)
    missing = [names[0] for names in groups.values() if not any(n in header for n in names)]
    unexpected = sorted(set(header) - set(state))
    if missing or unexpected:
        raise CheckpointError(f"weights file {path} does not match {type(model).__name__} built from config.json: "
                              f"missing keys {sorted(missing)[:20]}, unexpected keys {unexpected[:20]}")
    bad = []
    for k, (dtype, shape) in header.items():
        v = state[k]
        if tuple(v.shape) != shape:
            bad.append(f"{k}: file {shape} vs model {tuple(v.shape)}")
        elif v.is_floating_point() and dtype not in _FLOAT_DTYPES:
            bad.append(f"{k}: file dtype {dtype}, model needs a float dtype")
    if bad:
        raise CheckpointError(f"weights file {path} does not match the TN specs in config.json "
                              "(shape mismatch): " + "; ".join(bad[:10]))


def check_cores_against_header(model: nn.Module, header: dict, path) -> None:
    """The TN cores the specs build against the cores in the file, as a multiset of shapes and dtypes
    (for loaders that rename keys themselves, like transformers' checkpoint conversions)."""
    want = sorted(tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if _CORE.search(k))
    have = sorted(shape for k, (_, shape) in header.items() if _CORE.search(k))
    bad_dtype = sorted(k for k, (dtype, _) in header.items() if _CORE.search(k) and dtype not in _FLOAT_DTYPES)
    if want != have or bad_dtype:
        extra = sorted(set(have) - set(want))[:5]
        lack = sorted(set(want) - set(have))[:5]
        raise CheckpointError(f"weights file {path} does not match the TN specs in config.json (shape mismatch): "
                              f"{len(have)} cores in the file, {len(want)} from the specs; shapes only in the "
                              f"file {extra}, only in the specs {lack}" + (f"; non-float cores {bad_dtype[:5]}"
                                                                          if bad_dtype else ""))


def warn_non_finite(state: dict[str, torch.Tensor], path) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        warnings.warn(f"weights file {path}: tensors with NaN/Inf values: {bad[:10]}", stacklevel=3)


# ----------------------------------------------------------------------------- crash-safe writes
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / file system can fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _commit_order(names) -> list[str]:
    """Weights and extras first, config.json last (a loader reads config.json first)."""
    return sorted(names, key=lambda n: (n == CONFIG_NAME, n))


def _finish(folder: Path, journal: dict) -> None:
    staging = folder / journal["staging"]
    for name in _commit_order(journal["files"]):
        src = staging / name
        if src.exists():
            os.replace(src, folder / name)
    _fsync_dir(folder)
    with contextlib.suppress(FileNotFoundError):
        os.remove(folder / JOURNAL)
    shutil.rmtree(staging, ignore_errors=True)
    _fsync_dir(folder)


def recover(folder) -> None:
    """Finish a save that was interrupted after its commit point; remove stale staging folders."""
    folder = Path(folder)
    jpath = folder / JOURNAL
    if jpath.is_file():
        try:
            journal = json.loads(jpath.read_text(encoding="utf-8"))
            ok = (isinstance(journal, dict) and isinstance(journal.get("staging"), str)
                  and journal["staging"].startswith(STAGING_PREFIX) and "/" not in journal["staging"]
                  and isinstance(journal.get("files"), list)
                  and all(isinstance(n, str) and n and "/" not in n and not n.startswith(".")
                          for n in journal["files"]))
        except (OSError, json.JSONDecodeError):
            ok = False
        if not ok:
            raise CheckpointError(f"{jpath} is not a tn_hf save journal; remove it by hand if you know "
                                  "where it came from")
        try:
            _finish(folder, journal)
        except PermissionError as e:
            raise CheckpointError(f"{folder}: a save was interrupted and can't be completed here "
                                  f"(read-only?): {e}") from e
    if folder.is_dir():  # what a save killed before its commit point left behind
        for p in folder.iterdir():
            if p.name.startswith(STAGING_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(JOURNAL + ".") and p.is_file():
                p.unlink(missing_ok=True)


_CHECKPOINT_KEYS = ("tn_hf", "quantization_config", "architecture", "architectures", "model_type")


def _spare_user_files(folder: Path, staging: Path) -> None:
    """A README.md that is not a tn_hf model card stays (the new card is dropped, with a warning);
    a config.json that is not a model checkpoint's is never replaced (an error, nothing written)."""
    readme, config = folder / "README.md", folder / CONFIG_NAME
    if (staging / "README.md").exists() and readme.is_file() and "tn_hf" not in readme.read_text(errors="replace"):
        os.remove(staging / "README.md")
        warnings.warn(f"save_pretrained: kept your {readme} (not a tn_hf model card); the model card was not "
                      "written", stacklevel=4)
    if (staging / CONFIG_NAME).exists() and config.is_file():
        try:
            old = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            old = None
        if not (isinstance(old, dict) and any(k in old for k in _CHECKPOINT_KEYS)):
            raise FileExistsError(f"save_pretrained: {config} exists and is not a model checkpoint's config; "
                                  "it is not replaced: save into another folder")


def write_checkpoint(folder, render: Callable[[Path], None]) -> list[str]:
    """Run ``render(staging_dir)`` and move the files it wrote into ``folder`` (see module docstring).

    Only the files ``render`` writes are replaced; everything else in ``folder`` stays. Returns
    their names."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"save_pretrained: {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    recover(folder)
    staging = folder / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        render(staging)
        _spare_user_files(folder, staging)
        names = sorted(p.name for p in staging.iterdir())
        nested = [n for n in names if not (staging / n).is_file()]
        if nested:
            raise RuntimeError(f"save_pretrained: unexpected folders in the checkpoint: {nested}")
        mode = _file_mode()
        for n in names:  # the mode a plain open() gives (some writers create 0600 files)
            os.chmod(staging / n, mode)
            _fsync_file(staging / n)
        journal = {"staging": staging.name, "files": names}
        tmp = folder / f"{JOURNAL}.{staging.name}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(journal, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / JOURNAL)  # the commit point
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(NameError, FileNotFoundError):
            os.remove(tmp)
        raise
    _finish(folder, journal)
    return names


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path, what: str = CONFIG_NAME) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    if path.stat().st_size > 64 * 2 ** 20:
        raise CheckpointError(f"{path} is {path.stat().st_size} bytes; a config.json is at most 64 MiB")
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(out, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return out


# ----------------------------------------------------------------------------- weights
def write_weights(model: nn.Module, path) -> None:
    save_model(model, str(path))  # de-duplicates shared tensors


def load_weights(model: nn.Module, path, header: dict | None = None, *, skip: tuple[str, ...] = ()) -> None:
    """Strictly load ``path`` into ``model`` after checking it against the header; modules still on
    the meta device (empty TN layers) are allocated only after the check. Tensors of the modules
    named in ``skip`` (a re-initialised head) are neither checked nor loaded."""
    path = Path(path)
    header = read_header(path) if header is None else header
    inside = tuple(f"{m}." for m in skip)
    header = {k: v for k, v in header.items() if not k.startswith(inside)}
    check_against_header(model, header, path, skip=inside)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - any read failure is a corrupt file here
        raise CheckpointError(f"cannot read weights file {path} (corrupt or truncated safetensors?): {e}") from e
    state = {k: v for k, v in state.items() if k in header}
    warn_non_finite(state, path)
    for first, names in _expected_entries(model).items():
        src = next((n for n in names if n in state), None)
        for n in names if src else ():
            state.setdefault(n, state[src])
    materialize(model)
    result = model.load_state_dict(state, strict=not skip)
    if skip and (result.unexpected_keys or [k for k in result.missing_keys if not k.startswith(inside)]):
        raise CheckpointError(f"weights file {path}: unexpected {result.unexpected_keys[:10]}, "
                              f"missing {result.missing_keys[:10]}")


def materialize(model: nn.Module, device=None) -> None:
    """Allocate (without filling) every meta parameter/buffer, on ``device`` or the model's device."""
    if device is None:
        real = next((p for p in model.parameters() if not p.is_meta), None)
        device = real.device if real is not None else torch.device("cpu")
    for mod in model.modules():
        if any(t.is_meta for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]):
            mod.to_empty(device=device, recurse=False)


__all__ = ["TNMetadata", "CheckpointError", "check_specs", "read_header", "check_against_header",
           "write_checkpoint", "recover", "load_weights", "write_weights", "materialize", "read_json",
           "write_json", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION"]
