"""push_to_hub: save a TN-compressed model in its native layout (with the model card) and upload it."""
from __future__ import annotations

import tempfile
from pathlib import Path


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


def push_to_hub(model, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None, metrics: dict | None = None, dataset: str | None = None,
                base_model: str | None = None, create_pr: bool = False, revision: str | None = None,
                endpoint: str | None = None):
    """Upload ``model`` (a TN-compressed model, or a folder written by ``tn_hf.save_pretrained``) to
    ``repo_id``: create the repo if needed (``exist_ok``), then one commit with config.json,
    model.safetensors, README.md (model card with ``metrics`` / ``dataset`` / ``base_model``) and
    compression.png. Returns huggingface_hub's ``CommitInfo`` (a str: the commit URL)."""
    from huggingface_hub import HfApi

    if not isinstance(repo_id, str) or not repo_id.strip("/"):
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
            from .hub import save_pretrained
            folder = Path(tmp) / "checkpoint"
            save_pretrained(model, folder, metrics=metrics, dataset=dataset, base_model=base_model, repo_id=repo_id)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message,
                                     create_pr=create_pr, revision=revision)
        except Exception as e:  # noqa: BLE001 - re-raised, clearer where we know the cause
            err = _hub_error(e, repo_id, endpoint)
            if err is e:
                raise
            raise err from e
