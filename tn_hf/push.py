"""push_to_hub: save a TN-compressed model in its native layout (with the model card) and upload it."""
from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
import warnings
from pathlib import Path

from .cards import FIGURE
from .hub import is_repo_id, save_pretrained
from .serialization import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, is_regular_file, read_json

logger = logging.getLogger(__name__)
CHECKPOINT_FILES = (CONFIG_NAME, "generation_config.json", WEIGHTS_NAME, "model.safetensors.index.json",
                    "README.md", FIGURE, "tn_hf_report.json")


def _hub_error(e: Exception, repo_id: str, endpoint: str | None) -> Exception:
    """Turn huggingface_hub / network errors into one clear error naming the repo and the fix."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    where = endpoint or constants.ENDPOINT
    try:  # huggingface_hub 2.x ships httpx2; older ones use httpx
        import httpx2 as httpx
    except ModuleNotFoundError:
        import httpx  # type: ignore[no-redef]  # the other module of the same name and API
    if isinstance(e, (httpx.ConnectError, httpx.TimeoutException, ConnectionError)):
        return ConnectionError(f"push_to_hub: cannot reach the Hub at {where} to push {repo_id!r}: {e}")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        code = e.response.status_code
        if code in (401, 403):
            return PermissionError(f"push_to_hub: the Hub at {where} refused {repo_id!r} (HTTP {code}): "
                                   "check the token (HF_TOKEN / `hf auth login` / token=) and its write access")
    return e


_SHARD = re.compile(r"[A-Za-z0-9_][\w.-]{0,200}\.safetensors\Z", re.ASCII)


def checkpoint_files(folder: Path) -> list[str]:
    """The files of the checkpoint in ``folder`` (what save_pretrained writes), nothing else: regular
    files inside the folder (a link is left out with a warning: it may point anywhere) and, for
    sharded weights, the ``*.safetensors`` files of the folder that the index names."""
    links = [n for n in CHECKPOINT_FILES if os.path.lexists(folder / n) and not is_regular_file(folder / n)]
    if links:
        warnings.warn(f"push_to_hub: not uploading {links} of {folder}: links or not regular files (push uploads "
                      "only the checkpoint's own regular files)", stacklevel=3)
    names = [n for n in CHECKPOINT_FILES if is_regular_file(folder / n)]
    index = "model.safetensors.index.json"
    if index in names:  # sharded weights: the shards the index names
        weight_map = read_json(folder / index, index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"push_to_hub: {folder / index}: 'weight_map' must be an object "
                                  "{tensor name: shard file}")
        shards = list(weight_map.values())
        bad = [s for s in shards if not (isinstance(s, str) and _SHARD.match(s) and is_regular_file(folder / s))]
        if bad:
            raise FileNotFoundError(f"push_to_hub: {folder / index} names shards that are not *.safetensors regular "
                                    f"files of {folder}: {bad[:5]}")
        names += sorted(set(shards) - set(names))
    return names


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path``, refusing a link even if one replaced the file after it was listed."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"push_to_hub: {path} is not a regular file")
        return f.read()


def _card_source(folder: Path) -> str | None:
    """The folder name the model card's load code uses (tn_hf_report.json ``card_source``)."""
    path = folder / "tn_hf_report.json"
    if not is_regular_file(path):
        return None
    source = read_json(path, path.name).get("card_source")
    return source if isinstance(source, str) and source else None


def push_to_hub(model, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None, metrics: dict | None = None, dataset: str | None = None,
                base_model: str | None = None, create_pr: bool = False, revision: str | None = None,
                endpoint: str | None = None, progress: bool = True):
    """Upload ``model`` (a TN-compressed model, or a folder written by ``tn_hf.save_pretrained``) to
    ``repo_id``: create the repo if needed (``exist_ok``), then one commit with the checkpoint's files
    only (config.json, weights, README.md, compression.png, tn_hf_report.json; any other file in the
    folder stays local). The model card names ``repo_id``. The file list is logged (and printed when
    ``progress``) before uploading. Returns huggingface_hub's ``CommitInfo`` (a str: the commit URL)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if not isinstance(repo_id, str) or not is_repo_id(repo_id):
        raise ValueError(f"push_to_hub: repo_id must be 'org/name' or 'name', got {repo_id!r}")
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or "Upload TN-compressed model (tn_hf)"
    with tempfile.TemporaryDirectory(prefix="tn_hf_push_") as tmp:
        if isinstance(model, (str, Path)):
            folder = Path(model)
            if not is_regular_file(folder / CONFIG_NAME):
                raise FileNotFoundError(f"push_to_hub: {folder} is not a checkpoint folder (no config.json file)")
            if metrics or dataset or base_model:
                raise ValueError("push_to_hub: metrics/dataset/base_model re-render the card and need the "
                                 "model, not a folder; pass the model or save the folder with them")
        else:
            folder = Path(tmp) / "checkpoint"
            save_pretrained(model, folder, metrics=metrics, dataset=dataset, base_model=base_model, repo_id=repo_id)
        names = checkpoint_files(folder)
        logger.info("push_to_hub: uploading %s to %s", names, repo_id)
        if progress:
            print(f"tn_hf: uploading {len(names)} files to {repo_id}: {', '.join(names)}")
        source = _card_source(folder)
        ops = []
        for name in names:
            data = _read_regular(folder / name)
            if name == "README.md" and source:  # a card written before the push names the local folder
                text = data.decode("utf-8").replace(f'"local-dir:{source}"', f'"hf-hub:{repo_id}"')
                data = text.replace(f'"{source}"', f'"{repo_id}"').encode("utf-8")
            ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=data))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.create_commit(repo_id=repo_id, operations=ops, commit_message=message,
                                     create_pr=create_pr, revision=revision)
        except Exception as e:  # noqa: BLE001 - re-raised, clearer where we know the cause
            err = _hub_error(e, repo_id, endpoint)
            if err is e:
                raise
            raise err from e
