"""Checkpoint I/O shared by every layout: the metadata schema, crash-safe writes, checked loads.

Metadata
    One object, ``TNMetadata`` = ``{"format_version", "tn_hf_version", "config", "specs"}``, is
    stored as ``config.json["tn_hf"]`` (timm and plain torch layouts) or inside
    ``config.json["quantization_config"]`` next to ``"quant_method": "tn_hf"`` (transformers).
    On load an unknown key is a warning and a newer ``format_version`` a clear error.

Writes (``write_checkpoint``)
    Files are rendered into a staging folder of this writer's own *inside* the target folder (same
    file system), each flushed and fsynced; then, holding the folder's lock, a journal
    ``.tn_hf-commit.json`` naming them is written atomically; then each file is moved into place
    with ``os.replace`` (weights first, ``config.json`` last) and the journal removed. Nothing else
    in the folder is touched, and the folder keeps its mode. A crash before the journal exists
    leaves the old checkpoint (the staging folder is removed by the next save or load); a crash
    after it is rolled forward by ``recover`` (every tn_hf loader and the next save call it) to
    the new checkpoint.

Concurrency and links
    The lock is an advisory ``flock`` on the folder itself (no lock file). A writer creates its
    staging folder with a marker file inside (``.tn_hf-writer``) and holds a lock on it from
    creating it to its commit: ``recover`` removes only staging folders that are real folders with
    that marker and whose lock it can take (their writer is gone), so a load never breaks a live save,
    and a save that returns has moved all its files. ``recover`` follows no link: a journal,
    staging folder or staged file that is a link (or not what a writer creates) is a
    ``CheckpointError``, and nothing is moved, so a cloned repo cannot make a load move files
    from outside its folder.

Loads (``read_header``, ``check_specs``, ``check_against_header``)
    Specs are checked as data (types, known classes) and against the module each one replaces
    (class, features, channels, kernel, layers...) before any layer is built; layers are built on
    the meta device and compared with the safetensors header (names, shapes, dtypes) before any
    memory is allocated for them.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no advisory locks, writers still stage apart
    fcntl = None  # type: ignore[assignment]

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
STAGING_MARKER = ".tn_hf-writer"  # the file a writer creates first in its staging folder
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


def interface_diff(spec: dict, module: nn.Module) -> dict[str, tuple]:
    """{key: (spec's value, module's value)} for the interface keys (shapes, stride, padding, ...) on
    which a TN layer spec and the dense module it replaces differ (empty when the spec fits)."""
    keys = [k for k in _INTERFACE if k in spec and hasattr(module, k)]
    have, want = _interface(spec, keys), _interface(module, keys)
    return {k: (have[k], want[k]) for k in keys if have[k] != want[k]}


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
        diff = interface_diff(spec, module)
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
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if _CORE.search(k)}
    want = sorted(tuple(v.shape) for v in state.values())
    have = sorted(shape for k, (_, shape) in header.items() if _CORE.search(k))
    bad_dtype = sorted(k for k, (dtype, _) in header.items() if _CORE.search(k) and dtype not in _FLOAT_DTYPES)
    if want != have or bad_dtype:
        extra = sorted(set(have) - set(want))[:5]
        lack = sorted(set(want) - set(have))[:5]
        keys_extra = sorted(k for k in header if _CORE.search(k) and k not in state)[:10]
        keys_lack = sorted(k for k in state if k not in header)[:10]
        raise CheckpointError(f"weights file {path} does not match the TN specs in config.json (shape mismatch): "
                              f"{len(have)} cores in the file, {len(want)} from the specs; shapes only in the "
                              f"file {extra}, only in the specs {lack}; core keys only in the file (unexpected) "
                              f"{keys_extra}, only in the specs (missing) {keys_lack}"
                              + (f"; non-float cores {bad_dtype[:5]}" if bad_dtype else ""))


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


def is_regular_file(path: Path) -> bool:
    """A regular file, not a link (``Path.is_file`` follows links)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _flock(fd: int, wait: bool) -> bool:
    """Lock ``fd`` exclusively; False when ``wait`` is off and another open file holds the lock. A file
    system without locks (some network ones) proceeds unlocked, as a platform without ``fcntl`` does."""
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as e:  # pragma: no cover - ENOLCK / EOPNOTSUPP
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            raise
    return True


def _open_dir(path: Path, follow: bool) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | (0 if follow else os.O_NOFOLLOW))


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold the checkpoint folder's lock (commits and recovery run one at a time)."""
    fd = _open_dir(folder, follow=True)
    try:
        _flock(fd, wait=True)
        yield
    finally:
        os.close(fd)


_STAGING = re.compile(re.escape(STAGING_PREFIX) + r"[0-9a-f]{1,32}\Z")
_FILE = re.compile(r"[A-Za-z0-9_][\w.-]{0,254}\Z")


def _journal_error(jpath: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{jpath} is not a tn_hf save journal ({why}); nothing was moved: remove it by hand "
                           "if you know where it came from")


def _read_journal(folder: Path) -> dict | None:
    """The journal of a committed save, checked: names of this writer's form, a real staging folder, regular
    staged files (links are followed nowhere); None if there is none."""
    jpath = folder / JOURNAL
    if not os.path.lexists(jpath):
        return None
    if not is_regular_file(jpath):
        raise _journal_error(jpath, "not a regular file")
    try:
        journal = json.loads(jpath.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise _journal_error(jpath, f"unreadable: {type(e).__name__}") from None
    if not (isinstance(journal, dict) and isinstance(journal.get("staging"), str)
            and _STAGING.match(journal["staging"]) and isinstance(journal.get("files"), list)
            and all(isinstance(n, str) and _FILE.match(n) for n in journal["files"])):
        raise _journal_error(jpath, "unexpected content")
    staging = folder / journal["staging"]
    if os.path.lexists(staging):
        if not stat.S_ISDIR(os.lstat(staging).st_mode):
            raise _journal_error(jpath, f"{staging.name} is a link or not a folder")
        if not is_regular_file(staging / STAGING_MARKER):
            raise _journal_error(jpath, f"{staging.name} was not created by tn_hf's writer (no {STAGING_MARKER})")
        odd = [n for n in journal["files"] if os.path.lexists(staging / n) and not is_regular_file(staging / n)]
        if odd:
            raise _journal_error(jpath, f"staged {odd[:5]} are links or not regular files")
    return journal


def _finish(folder: Path, journal: dict, own: bool = False) -> None:
    """Move the journal's staged files into place (a recovered journal skips files already moved;
    the writer's own must all be there), then drop the journal and the staging folder."""
    staging = folder / journal["staging"]
    for name in _commit_order(journal["files"]):
        src = staging / name
        if own or os.path.lexists(src):
            os.replace(src, folder / name)
    _fsync_dir(folder)
    with contextlib.suppress(FileNotFoundError):
        os.remove(folder / JOURNAL)
    shutil.rmtree(staging, ignore_errors=True)
    _fsync_dir(folder)


def _leftovers(folder: Path) -> bool:
    """Whether ``folder`` holds anything of an unfinished save (a journal, staging or temp journal)."""
    try:
        with os.scandir(folder) as it:
            return any(e.name.startswith((JOURNAL, STAGING_PREFIX)) for e in it)
    except OSError:
        return False


def _recover_locked(folder: Path) -> None:
    """``recover``'s work; the caller holds the folder's lock."""
    journal = _read_journal(folder)
    if journal is not None:
        try:
            _finish(folder, journal)
        except PermissionError as e:
            raise CheckpointError(f"{folder}: a save was interrupted and can't be completed here "
                                  f"(read-only?): {e}") from e
    with os.scandir(folder) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False)) for e in it]
    for name, is_dir, is_file in entries:  # what a writer killed before its commit point left behind
        if name.startswith(STAGING_PREFIX) and is_dir and not is_regular_file(folder / name / STAGING_MARKER):
            with contextlib.suppress(OSError):  # not a writer's (kept), unless empty: killed before its marker
                os.rmdir(folder / name)
        elif name.startswith(STAGING_PREFIX) and is_dir:
            with contextlib.suppress(OSError):
                fd = _open_dir(folder / name, follow=False)
                try:
                    if _flock(fd, wait=False):  # its writer is gone (a live one holds this lock)
                        shutil.rmtree(folder / name, ignore_errors=True)
                finally:
                    os.close(fd)
        elif name.startswith(JOURNAL + ".") and is_file:
            with contextlib.suppress(OSError):
                os.unlink(folder / name)


def recover(folder) -> None:
    """Finish a save that was interrupted after its commit point; remove staging folders their writers
    left (never a live writer's). A folder without leftovers is not touched (nor locked)."""
    folder = Path(folder)
    if not folder.is_dir() or not _leftovers(folder):
        return
    with _folder_lock(folder):
        _recover_locked(folder)


_CHECKPOINT_KEYS = ("tn_hf", "quantization_config", "architecture", "architectures", "model_type")


# the line tn_hf's model cards carry (cards.py writes it): only a README.md with it is replaced on save
CARD_MARKER = "<!-- tn_hf model card: written by tn_hf.save_pretrained, replaced when the model is saved again -->"


def is_generated_card(path: Path) -> bool:
    """Whether ``path`` is a model card tn_hf wrote (a regular file with ``CARD_MARKER`` on a line of its own)."""
    if not is_regular_file(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return any(line.rstrip("\r\n") == CARD_MARKER for line in f)


def _spare_user_files(folder: Path, staging: Path) -> None:
    """A README.md that tn_hf did not write stays (the new card is dropped, with a warning); a
    config.json that is not a model checkpoint's is never replaced (an error, nothing written)."""
    readme, config = folder / "README.md", folder / CONFIG_NAME
    if (staging / "README.md").exists() and os.path.lexists(readme) and not is_generated_card(readme):
        os.remove(staging / "README.md")
        warnings.warn(f"save_pretrained: kept your {readme} (not a model card tn_hf wrote); the model card was not "
                      "written", stacklevel=4)
    if (staging / CONFIG_NAME).exists() and config.is_file():
        try:
            old = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, RecursionError):
            old = None
        if not (isinstance(old, dict) and any(k in old for k in _CHECKPOINT_KEYS)):
            raise FileExistsError(f"save_pretrained: {config} exists and is not a model checkpoint's config; "
                                  "it is not replaced: save into another folder")


def _staged(staging: Path) -> list[str]:
    """The names of the files ``render`` wrote into ``staging`` (the writer's marker left out)."""
    return sorted(p.name for p in staging.iterdir() if p.name != STAGING_MARKER)


def write_checkpoint(folder, render: Callable[[Path], None]) -> list[str]:
    """Run ``render(staging_dir)`` and move the files it wrote into ``folder`` (see module docstring).

    Only the files ``render`` writes are replaced; everything else in ``folder`` stays. Returns
    their names."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"save_pretrained: {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        with _folder_lock(folder):  # a new staging folder is locked before anyone can see it unlocked
            _recover_locked(folder)
            staging = folder / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
            staging.mkdir()
            os.close(os.open(staging / STAGING_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            live = _open_dir(staging, follow=False)
            stack.callback(os.close, live)
            _flock(live, wait=True)
        tmp, committed = folder / f"{JOURNAL}.{staging.name}", False
        try:
            render(staging)
            names = _staged(staging)
            nested = [n for n in names if not (staging / n).is_file()]
            if nested:
                raise RuntimeError(f"save_pretrained: unexpected folders in the checkpoint: {nested}")
            mode = _file_mode()
            for n in names:  # the mode a plain open() gives (some writers create 0600 files)
                os.chmod(staging / n, mode)
                _fsync_file(staging / n)
            with _folder_lock(folder):
                _recover_locked(folder)  # a save that crashed after its commit point goes first
                _spare_user_files(folder, staging)
                names = _staged(staging)
                journal = {"staging": staging.name, "files": names}
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(journal, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, folder / JOURNAL)  # the commit point
                committed = True
                _fsync_dir(folder)
                _finish(folder, journal, own=True)
        except BaseException:
            if not committed:  # the old checkpoint stays; after the commit point recover rolls forward
                shutil.rmtree(staging, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
            raise
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
    except (ValueError, RecursionError) as e:  # also too deeply nested, or an int of too many digits
        raise CheckpointError(f"{path} is not valid JSON (or nested too deeply / a number too large): "
                              f"{type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    if _depth(out) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{path} nests objects/arrays deeper than {MAX_JSON_DEPTH} levels")
    return out


MAX_JSON_DEPTH = 64


def _depth(obj) -> int:
    """How deeply ``obj``'s dicts and lists nest (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


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
    for _, names in _expected_entries(model).items():
        src = next((n for n in names if n in state), None)
        if src is not None:
            for n in names:
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
           "write_json", "is_regular_file", "is_generated_card", "CARD_MARKER", "CONFIG_NAME", "WEIGHTS_NAME",
           "FORMAT_VERSION"]
