"""The `tn-hf` command: compress / inspect / push / demo, and one-line errors with exit status 2."""
import json
import sys
import types

import pytest
import torch

import tn_hf
from tn_hf.cli import main
from tn_hf.layers.base import TNLayer
from tn_hf.report import CompressionReport
from tn_hf.serialization import read_header

TARGETS = ["layer3.0.conv2", "layer4.0.conv2"]


def _err_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory):
    """`tn-hf compress test_resnet --format tr --ratio 4 --targets ... --no-speed-plan --out DIR` (run once;
    sized, not timed, so that the checkpoint's layers do not depend on the machine)."""
    out = tmp_path_factory.mktemp("cli") / "tn-resnet"
    torch.manual_seed(0)
    assert main(["compress", "test_resnet", "--random-init", "--format", "tr", "--ratio", "4", "--targets",
                 *TARGETS, "--no-speed-plan", "--out", str(out)]) == 0
    return out


def test_compress_writes_loadable_checkpoint_with_card(compressed_dir, capsys):
    import timm
    out = compressed_dir
    assert {"config.json", "model.safetensors", "README.md", "compression.png"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert set(cfg["tn_hf"]["specs"]) == set(TARGETS)
    assert cfg["tn_hf"]["config"]["format"] == "tr" and cfg["tn_hf"]["config"]["compression_ratio"] == 4.0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    from tn_hf.layers.base import TNLayer
    assert {n for n, m in model.named_modules() if isinstance(m, TNLayer)} == set(TARGETS)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    assert "tensor-ring" in (out / "README.md").read_text()


def test_inspect_folder_matches_model(compressed_dir, capsys):
    capsys.readouterr()
    assert main(["inspect", str(compressed_dir)]) == 0
    text = capsys.readouterr().out
    model = tn_hf.from_pretrained(compressed_dir)
    header = read_header(compressed_dir / "model.safetensors")
    assert len(header) == len(model.state_dict())
    fmt = CompressionReport.fmt
    for name in TARGETS:
        layer = model.get_submodule(name)
        line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
        assert fmt(sum(p.numel() for p in layer.parameters())) in line.split()
        assert fmt(layer.dense_params()) in line.split()
        assert "-".join(map(str, layer.ranks)) in line
    total = sum(v.numel() for v in model.state_dict().values())
    total_line = next(ln for ln in text.splitlines() if ln.startswith("TOTAL (model)"))
    assert fmt(total) in total_line.split() and "asked 4x" in total_line


def test_push_then_inspect_repo(compressed_dir, hub, capsys):
    assert main(["push", str(compressed_dir), "org/cli-resnet", "--private"]) == 0
    assert hub.repos["org/cli-resnet"].private
    assert hub.files("org/cli-resnet")["model.safetensors"] == (compressed_dir / "model.safetensors").read_bytes()
    card = hub.files("org/cli-resnet")["README.md"].decode()
    assert 'timm.create_model("hf-hub:org/cli-resnet", pretrained=True)' in card and "local-dir:" not in card
    capsys.readouterr()
    assert main(["inspect", "org/cli-resnet"]) == 0
    out = capsys.readouterr()
    assert all(name in out.out for name in TARGETS), out
    weights = (compressed_dir / "model.safetensors").stat().st_size
    assert hub.bytes_served["org/cli-resnet/model.safetensors"] < weights / 4  # the header only
    from tn_hf.cli import inspect_checkpoint
    local = str(inspect_checkpoint(str(compressed_dir)))
    assert local in out.out  # the same table as from the folder
    assert main(["inspect", "org/missing-repo"]) == 2
    assert "no Hub repo" in _err_line(capsys)
    hub.auth = "401"
    assert main(["push", str(compressed_dir), "org/cli-denied"]) == 1
    assert "HTTP 401" in _err_line(capsys)


def test_compress_from_hub_id_records_base_model(hub, tmp_path, capsys):
    import timm
    from huggingface_hub import HfApi
    from timm.models._hub import save_for_hf
    torch.manual_seed(0)
    dense = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    save_for_hf(dense, str(tmp_path / "dense"), safe_serialization=True)
    HfApi().create_repo("org/dense-resnet")
    HfApi().upload_folder(repo_id="org/dense-resnet", folder_path=tmp_path / "dense")
    out = tmp_path / "tn"
    assert main(["compress", "org/dense-resnet", "--ratio", "3", "--targets", "layer4.0.conv2", "--no-speed-plan",
                 "--out", str(out)]) == 0
    assert "layer4.0.conv2" in capsys.readouterr().out  # the report is printed
    card = (out / "README.md").read_text()
    assert "base_model: org/dense-resnet" in card and "base_model_relation: quantized" in card
    loaded = tn_hf.from_pretrained(out).eval()
    assert type(loaded.get_submodule("layer4.0.conv2")).__name__ == "TTConv2d"
    torch.testing.assert_close(loaded.fc.weight, dense.fc.weight)  # the Hub weights, not a fresh init
    with torch.no_grad():
        assert loaded(torch.randn(1, 3, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize("argv, message", [
    (["compress", "no_such_model_xyz", "--ratio", "3", "--out", "o"], "unknown model"),
    (["compress", "test_resnet", "--ratio", "3"], "--out is required (or --dry-run"),
    (["compress", "test_resnet", "--ratio", "1", "--out", "o"], "--ratio must be > 1"),
    (["compress", "test_resnet", "--ratio", "abc", "--out", "o"], "--ratio must be a number"),
    (["compress", "test_resnet", "--format", "cp", "--ratio", "3", "--out", "o"], "invalid choice"),
    (["compress", "test_resnet", "--allocation", "fast", "--ratio", "3", "--out", "o"], "invalid choice"),
    (["inspect", "/no/such/folder"], "is not a checkpoint folder"),
    (["push", "/no/such/folder", "org/x"], "is not a folder"),
    (["frobnicate"], "invalid choice"),
])
def test_user_errors_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse-level errors
        code = e.code
    assert code == 2
    assert message in _err_line(capsys)
    assert not (tmp_path / "o").exists()


def test_inspect_dense_folder_is_user_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"architecture": "test_resnet"}')
    (tmp_path / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a tn_hf checkpoint" in _err_line(capsys)


def test_demo_forwards_options(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("tn_hf.demo")

    def run_demo(*, quick=False, ratio=8.0, format="tt", out_dir="outputs/demo"):
        calls.append(dict(quick=quick, ratio=ratio, format=format, out_dir=out_dir))
        return {"accuracy": 0.9}

    fake.run_demo = run_demo
    monkeypatch.setitem(sys.modules, "tn_hf.demo", fake)
    out = tmp_path / "d"
    assert main(["demo", "--quick", "--ratio", "5", "--format", "tr", "--out", str(out)]) == 0
    assert calls == [dict(quick=True, ratio=5.0, format="tr", out_dir=str(out))]
    assert json.loads((out / "demo_results.json").read_text()) == {"accuracy": 0.9}


def test_help_on_every_command(capsys):
    for cmd in (["compress"], ["inspect"], ["push"], ["demo"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0 and f"usage: tn-hf {cmd[0]}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "required" in _err_line(capsys)


def test_inspect_transformers_checkpoint(tmp_path, capsys):
    """transformers may rename tensors on save: TN sizes still come out per layer, from the specs."""
    T = pytest.importorskip("transformers")
    from tn_hf.cli import inspect_checkpoint
    torch.manual_seed(0)
    cfg = T.VivitConfig(tubelet_size=[2, 8, 8], image_size=32, num_frames=4, hidden_size=64, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=128, num_labels=3)
    model = T.VivitForVideoClassification(cfg)
    tn_hf.compress(model, tn_hf.TNConfig(ranks=4, min_params=1000, target_modules=r".*mlp\..*"), progress=False)
    tn_hf.save_pretrained(model, tmp_path / "ckpt")
    info = inspect_checkpoint(str(tmp_path / "ckpt"))
    assert {r["name"] for r in info.rows} == set(model.tn_hf_specs) and info.rows
    for r in info.rows:
        layer = model.get_submodule(r["name"])
        assert r["tn_params"] == sum(p.numel() for p in layer.parameters())
        assert r["dense_params"] == layer.dense_params() and r["ranks"] == layer.ranks
    assert info.totals["model_params_tn"] == sum(v.numel() for v in model.state_dict().values())


def test_timm_name_loads_pretrained_or_says_how_not_to(hub, tmp_path, capsys):
    """Offline (the local Hub has no timm weights): a clear error with the way out, nothing written."""
    out = tmp_path / "o"
    assert main(["compress", "test_resnet", "--ratio", "3", "--out", str(out)]) == 2
    err = _err_line(capsys)
    assert "cannot load pretrained weights for timm model 'test_resnet'" in err and "--random-init" in err
    assert not out.exists()
    assert main(["compress", "test_resnet", "--random-init", "--ratio", "3", "--targets", "layer4.0.conv2",
                 "--out", str(out)]) == 0
    assert "Random weights" in (out / "README.md").read_text()


def test_compress_forwards_the_allocation(monkeypatch, capsys):
    import tn_hf.config as config
    seen = []

    class Spy(config.TNConfig):
        def __post_init__(self):
            seen.append(self.allocation)
            raise ValueError("stopped after the config")
    monkeypatch.setattr(config, "TNConfig", Spy)
    assert main(["compress", "test_resnet", "--ratio", "3", "--allocation", "time", "--dry-run"]) == 2
    assert seen == ["time"] and "stopped after the config" in _err_line(capsys)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    import timm

    from tn_hf.convert import compress, preview
    capsys.readouterr()
    assert main(["compress", "test_resnet", "--random-init", "--ratio", "3", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run" in text and "TOTAL (model)" in text
    assert list(tmp_path.iterdir()) == []
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    planned = preview(model, tn_hf.TNConfig(compression_ratio=3))
    assert not any(isinstance(m, TNLayer) for m in model.modules())  # nothing swapped
    done = compress(model, tn_hf.TNConfig(compression_ratio=3), progress=False)

    def strip(r):
        return {k: r[k] for k in ("name", "dense_params", "tn_params", "ranks", "flops_dense", "flops_tn")}

    assert [strip(r) for r in planned.rows] == [strip(r) for r in done.rows]
    for r in planned.rows:
        assert r["name"] in text


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tn-hf {tn_hf.__version__}"


def test_help_is_fast():
    import subprocess
    import time
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "tn_hf.cli", "--help"], capture_output=True, text=True, check=True)
    assert "compress" in out.stdout
    assert time.perf_counter() - t0 < 5  # no torch / transformers / timm import for --help
    code = "import sys; from tn_hf.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_inspect_totals_equal_compress_totals(compressed_dir):
    """`tn-hf inspect` (header only) and compress count the same things."""
    import timm

    from tn_hf.cli import inspect_checkpoint
    model = timm.create_model(f"local-dir:{compressed_dir}", pretrained=True)
    live = CompressionReport.from_model(model).totals
    read = inspect_checkpoint(str(compressed_dir)).totals
    for k in ("model_params_dense", "model_params_tn", "target_params_dense", "target_params_tn"):
        assert live[k] == read[k], k


def test_dry_run_of_a_timm_name_downloads_no_weights(monkeypatch, capsys):
    """A dry run plans on the architecture: timm's pretrained loader is never called, and the output
    says the plan was made on random weights."""
    from timm.models import _builder

    def no_download(*args, **kwargs):
        raise AssertionError("a dry run tried to load pretrained weights")
    monkeypatch.setattr(_builder, "load_pretrained", no_download)
    capsys.readouterr()
    assert main(["compress", "test_resnet", "--ratio", "3", "--no-speed-plan", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "architecture only, random weights" in text and "TOTAL (model)" in text
    assert "planned on the architecture with random weights (no weights downloaded)" in text


def test_dry_run_of_a_hub_id_fetches_its_config_only(hub, tmp_path, capsys):
    import timm
    from huggingface_hub import HfApi
    from timm.models._hub import save_for_hf
    dense = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    save_for_hf(dense, str(tmp_path / "dense"), safe_serialization=True)
    HfApi().create_repo("org/dense-plan")
    HfApi().upload_folder(repo_id="org/dense-plan", folder_path=tmp_path / "dense")
    capsys.readouterr()
    assert main(["compress", "org/dense-plan", "--ratio", "3", "--targets", "layer4.0.conv2", "fc",
                 "--no-speed-plan", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "no weights downloaded" in text and "layer4.0.conv2" in text
    assert "org/dense-plan/config.json" in hub.bytes_served
    assert not [k for k in hub.bytes_served if k.endswith(".safetensors")], hub.bytes_served


def test_inspect_shows_the_errors_and_flops_of_the_card(compressed_dir, tmp_path, capsys):
    """The measured columns come from the report saved with the checkpoint (what the model card
    shows); a report whose layers do not match the checkpoint's is not used."""
    import shutil

    from tn_hf.cli import inspect_checkpoint
    saved = json.loads((compressed_dir / "tn_hf_report.json").read_text())
    rows = {r["name"]: r for r in saved["rows"]}
    capsys.readouterr()
    assert main(["inspect", str(compressed_dir)]) == 0
    text = capsys.readouterr().out
    fmt = CompressionReport.fmt
    card = (compressed_dir / "README.md").read_text()
    for name in TARGETS:
        r = rows[name]
        assert r["rel_error"] > 0 and r["flops_dense"] > r["flops_tn"] > 0
        cells = next(ln for ln in text.splitlines() if ln.startswith(name + " ")).split()
        expected = [fmt(r[c], c) for c in ("rel_error", "flops_dense", "flops_tn")]
        assert all(e in cells for e in expected), (expected, cells)
        assert f"`{name}` | {r['type']} | {r['tn_type']} |" in card and all(f"| {e} |" in card for e in expected)
    other = tmp_path / "other"
    shutil.copytree(compressed_dir, other)
    saved["rows"][0]["tn_params"] += 1
    (other / "tn_hf_report.json").write_text(json.dumps(saved))
    assert all(r["rel_error"] is None and r["flops_dense"] is None for r in inspect_checkpoint(str(other)).rows)
