"""push_to_hub: save a TN-compressed model in its native layout (with the model card) and upload it."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from .cards import FIGURE
from .hub import is_repo_id, save_pretrained
from .serialization import CONFIG_NAME, WEIGHTS_NAME, read_json

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
        import httpx
    if isinstance(e, (httpx.ConnectError, httpx.TimeoutException, ConnectionError)):
        return ConnectionError(f"push_to_hub: cannot reach the Hub at {where} to push {repo_id!r}: {e}")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        code = e.response.status_code
        if code in (401, 403):
            return PermissionError(f"push_to_hub: the Hub at {where} refused {repo_id!r} (HTTP {code}): "
                                   "check the token (HF_TOKEN / `hf auth login` / token=) and its write access")
    return e


def checkpoint_files(folder: Path) -> list[str]:
    """The files of the checkpoint in ``folder`` (what save_pretrained writes), nothing else."""
    names = [n for n in CHECKPOINT_FILES if (folder / n).is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded weights: the shards the index names
        shards = sorted(set((read_json(index, index.name).get("weight_map") or {}).values()))
        bad = [s for s in shards if not isinstance(s, str) or "/" in s or s.startswith(".")
               or not (folder / s).is_file()]
        if bad:
            raise FileNotFoundError(f"push_to_hub: {index} names shards that are not files of {folder}: {bad[:5]}")
        names += shards
    return names


def _card_source(folder: Path) -> str | None:
    """The folder name the model card's load code uses (tn_hf_report.json ``card_source``)."""
    path = folder / "tn_hf_report.json"
    if not path.is_file():
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
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"push_to_hub: {folder} is not a checkpoint folder (no config.json)")
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
            data = (folder / name).read_bytes()
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
