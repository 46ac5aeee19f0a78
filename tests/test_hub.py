"""push_to_hub + model cards against the local Hub-protocol server (tests/hub_server.py)."""
import json

import pytest
import torch
import yaml

import tn_hf
from tn_hf.cards import write_model_card

CFG = dict(ranks=4, min_params=1000)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _card_meta(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def timm_model():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()
    targets = ["layer3.0.conv2", "layer4.0.conv1", "layer4.0.conv2"]
    report = tn_hf.compress(model, tn_hf.TNConfig(format="tt", target_modules=targets, **CFG), progress=False)
    return model, report


@pytest.fixture(scope="module")
def tf_model():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.VivitConfig(tubelet_size=[2, 8, 8], image_size=32, num_frames=4, hidden_size=64, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=128, num_labels=3)
    model = T.VivitForVideoClassification(cfg).eval()
    tn_hf.compress(model, tn_hf.TNConfig(format="tr", **CFG), progress=False)
    return model, T.VivitForVideoClassification, {"pixel_values": torch.randn(1, 4, 3, 32, 32)}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ----------------------------------------------------------------------------- server itself
def test_server_plain_huggingface_hub_roundtrip(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text('{"x": 1}')
    (src / "w.bin").write_bytes(bytes(range(256)) * 100)
    api = HfApi()
    api.create_repo("org/plain")
    api.create_repo("org/plain", exist_ok=True)
    info = api.upload_folder(repo_id="org/plain", folder_path=src)
    assert info.oid == api.model_info("org/plain").sha
    assert json.loads(open(hf_hub_download("org/plain", "a.json")).read()) == {"x": 1}
    snap = snapshot_download("org/plain")
    assert (tmp_path / "src" / "w.bin").read_bytes() == open(f"{snap}/w.bin", "rb").read()
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/plain", "missing.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/none")


# ----------------------------------------------------------------------------- cards
def test_card_metadata_table_and_figure(timm_model, tmp_path):
    model, report = timm_model
    card = write_model_card(model, tmp_path, report=report, library_name="timm", base_model="timm/test_resnet",
                            metrics={"accuracy": 0.875}, dataset="mnist", repo_id="org/tn-resnet")
    text = (tmp_path / "README.md").read_text()
    meta = _card_meta(text)
    assert meta["library_name"] == "timm"
    assert meta["base_model"] == "timm/test_resnet" and meta["base_model_relation"] == "quantized"
    assert set(meta["tags"]) >= {"tn_hf", "tensor-train", "model-compression"}
    assert meta["tn_hf"]["accuracy"] == 0.875
    assert meta["tn_hf"]["compression_ratio"] == pytest.approx(report.totals["model_ratio"], rel=1e-3)
    results = meta["model-index"][0]["results"][0]
    assert results["dataset"]["name"] == "mnist"
    assert {"type": "accuracy", "value": 0.875} in results["metrics"]
    assert card.data.to_dict()["library_name"] == "timm"
    for row in report.rows:  # one table line per compressed layer, with its sizes
        assert f"| `{row['name']}` | {row['type']} |" in text
        assert f"{row['dense_params']:,} | {row['tn_params']:,}" in text
    assert 'timm.create_model("hf-hub:org/tn-resnet", pretrained=True)' in text
    assert text.index("import tn_hf") < text.index("timm.create_model")
    assert "![Per-layer compression](compression.png)" in text
    assert (tmp_path / "compression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_card_without_report_uses_specs(timm_model, tmp_path):
    model, report = timm_model
    write_model_card(model, tmp_path, library_name="timm")
    text = (tmp_path / "README.md").read_text()
    meta = _card_meta(text)
    assert "base_model" not in meta and "metrics" not in meta  # no run results: no model-index metrics
    assert meta["tn_hf"]["compression_ratio"] > 1 and meta["pipeline_tag"] == "image-classification"
    for row in report.rows:
        assert f"{row['dense_params']:,} | {row['tn_params']:,}" in text
    with pytest.raises(ValueError, match="library_name"):
        write_model_card(model, tmp_path, library_name="keras")


# ----------------------------------------------------------------------------- push + load
def test_push_timm_and_load_back(hub, timm_model, tmp_path):
    import timm
    model, _ = timm_model
    info = tn_hf.push_to_hub(model, "org/tn-resnet", metrics={"accuracy": 0.5}, dataset="mnist",
                             base_model="timm/test_resnet")
    files = hub.files("org/tn-resnet")
    assert info.oid == hub.repos["org/tn-resnet"].refs["main"]
    assert {"config.json", "model.safetensors", "README.md", "compression.png"} <= set(files)
    meta = _card_meta(files["README.md"].decode())
    assert meta["base_model"] == "timm/test_resnet" and meta["tn_hf"]["accuracy"] == 0.5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        _close(timm.create_model("hf-hub:org/tn-resnet", pretrained=True).eval()(x), y)
        _close(tn_hf.from_pretrained("org/tn-resnet").eval()(x), y)
    # a second push to the existing repo makes a new commit with the new card
    first = info.oid
    info2 = tn_hf.push_to_hub(model, "org/tn-resnet", metrics={"accuracy": 0.75}, commit_message="v2")
    assert info2.oid != first and hub.repos["org/tn-resnet"].refs["main"] == info2.oid
    assert _card_meta(hub.files("org/tn-resnet")["README.md"].decode())["tn_hf"]["accuracy"] == 0.75


def test_push_transformers_both_ways(hub, tf_model):
    model, cls, inputs = tf_model
    y = _logits(model, inputs)
    tn_hf.push_to_hub(model, "org/tn-vivit", private=True)
    assert hub.repos["org/tn-vivit"].private
    meta = _card_meta(hub.files("org/tn-vivit")["README.md"].decode())
    assert meta["library_name"] == "transformers" and "tensor-ring" in meta["tags"]
    _close(_logits(cls.from_pretrained("org/tn-vivit"), inputs), y)
    _close(_logits(tn_hf.from_pretrained("org/tn-vivit"), inputs), y)
    # transformers' own push_to_hub goes through the quantization-config plugin
    model.push_to_hub("org/tn-vivit-native")
    cfg = json.loads(hub.files("org/tn-vivit-native")["config.json"])
    assert cfg["quantization_config"]["quant_method"] == "tn_hf"
    _close(_logits(cls.from_pretrained("org/tn-vivit-native"), inputs), y)


# ----------------------------------------------------------------------------- failures
def test_push_folder_as_pull_request(hub, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    tn_hf.push_to_hub(folder, "org/pr")
    main_sha = hub.repos["org/pr"].refs["main"]
    (folder / "config.json").write_text('{"a": 2}')
    info = tn_hf.push_to_hub(folder, "org/pr", create_pr=True, commit_message="try a=2")
    assert info.pr_url.endswith("/discussions/1")
    assert hub.repos["org/pr"].refs["main"] == main_sha
    assert hub.files("org/pr", "refs/pr/1")["config.json"] == b'{"a": 2}'
    with pytest.raises(ValueError, match="need the model"):
        tn_hf.push_to_hub(folder, "org/pr", metrics={"accuracy": 1.0})


def test_push_failures_are_clear(hub, tmp_path, monkeypatch):
    import tempfile
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    hub.auth = "401"
    with pytest.raises(PermissionError, match="HTTP 401.*token"):
        tn_hf.push_to_hub(folder, "org/denied")
    hub.auth = "403"
    with pytest.raises(PermissionError, match="HTTP 403"):
        tn_hf.push_to_hub(folder, "org/denied")
    hub.auth = "ok"
    assert "org/denied" not in hub.repos
    with pytest.raises(FileNotFoundError, match="no config.json"):
        tn_hf.push_to_hub(tmp_path, "org/x")
    url = hub.url
    hub.stop()
    with pytest.raises(ConnectionError, match="cannot reach"):
        tn_hf.push_to_hub(folder, "org/down", endpoint=url)
    assert list(scratch.iterdir()) == []  # no temp checkpoint left behind


def test_load_unknown_repo_leaves_nothing(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'org/does-not-exist' is neither a local folder.*nor a Hub repo"):
        tn_hf.from_pretrained("org/does-not-exist")
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".md")]
    assert written == []
