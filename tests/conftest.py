"""Shared pytest fixtures."""
import pytest
from hub_server import HubServer


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own TN_HF_CACHE: the suite writes nothing to ~/.cache, and no test sees
    another's timings."""
    monkeypatch.setenv("TN_HF_CACHE", str(tmp_path_factory.mktemp("tn_hf_cache")))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hub-protocol server (tests/hub_server.py); huggingface_hub, transformers and timm
    talk to it instead of huggingface.co. Yields the HubServer (``.url``, ``.repos``, ``.auth``)."""
    from huggingface_hub import constants, hf_api

    server = HubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "test")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads these at import time
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)  # module-level create_repo/upload_folder
    try:
        yield server
    finally:
        server.stop()
