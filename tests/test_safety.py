"""Safe by default: loading runs no code, saving deletes nothing, pushing uploads only the checkpoint,
hostile checkpoints fail before memory is spent, half precision compresses."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import tn_hf
from tn_hf.layers.base import TNLayer
from tn_hf.serialization import CheckpointError, read_header


class Net(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.mid = nn.Linear(width, width)
        self.rnn = nn.LSTM(width, width, batch_first=True)
        self.out = nn.Linear(width, 4)

    def forward(self, x):
        h = torch.relu(self.mid(torch.relu(self.inp(x))))
        return self.out(self.rnn(h)[0][:, -1])


def _saved(path, **kw):
    torch.manual_seed(0)
    model = Net().eval()
    tn_hf.compress(model, tn_hf.TNConfig(ranks=4, min_params=500, target_modules=["mid", "rnn"]), progress=False)
    tn_hf.save_pretrained(model, path, model_args={"width": 32}, **kw)
    return model


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


# ----------------------------------------------------------------------------- 1. no code from checkpoints
def test_checkpoint_naming_a_callable_runs_nothing(tmp_path):
    _saved(tmp_path)
    marker = tmp_path / "pwned"
    _edit_config(tmp_path, lambda c: c.update(model_class="subprocess:run",
                                              model_args={"args": ["touch", str(marker)]}))
    with pytest.raises(PermissionError, match=r"'subprocess:run'.*model_class=run.*trust_remote_code=True"):
        tn_hf.from_pretrained(tmp_path)
    assert not marker.exists()
    # even with the opt-in, only an nn.Module subclass is called
    with pytest.raises(TypeError, match="nn.Module subclass"):
        tn_hf.from_pretrained(tmp_path, trust_remote_code=True)
    assert not marker.exists()
    # no attribute walk through modules (os.path.os.system ...)
    _edit_config(tmp_path, lambda c: c.update(model_class="os:path.os.system"))
    with pytest.raises(ValueError, match="is a module, not a class"):
        tn_hf.from_pretrained(tmp_path, trust_remote_code=True)


def test_model_class_or_opt_in_loads(tmp_path):
    model = _saved(tmp_path)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(tn_hf.from_pretrained(tmp_path, model_class=Net)(x), y)
        torch.testing.assert_close(tn_hf.from_pretrained(tmp_path, trust_remote_code=True)(x), y)


def test_missing_relative_path_is_not_a_hub_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"neither a local folder.*nor a valid Hub repo id"):
        tn_hf.from_pretrained("./outputs/model")
    with pytest.raises(FileNotFoundError, match=r"neither a local folder.*nor a valid Hub repo id"):
        tn_hf.from_pretrained("runs/a/b")


def test_main_module_class_warns_on_save(tmp_path):
    torch.manual_seed(0)
    model = Net()
    tn_hf.compress(model, tn_hf.TNConfig(ranks=4, target_modules=["mid"]), progress=False)
    type(model).__module__ = "__main__"
    try:
        with pytest.warns(UserWarning, match="defined in __main__.*model_class=Net"):
            tn_hf.save_pretrained(model, tmp_path)
    finally:
        type(model).__module__ = __name__


# ----------------------------------------------------------------------------- 2. saving deletes nothing
def test_save_keeps_other_files_and_folder_mode(tmp_path):
    folder = tmp_path / "project"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "train.py").write_text("print('mine')")
    (folder / "notes.txt").write_text("keep me")
    os.chmod(folder, 0o755)
    _saved(folder)
    _saved(folder)  # a second save over the first one
    assert (folder / "src" / "train.py").read_text() == "print('mine')"
    assert (folder / "notes.txt").read_text() == "keep me"
    assert oct(folder.stat().st_mode & 0o777) == oct(0o755)
    ours = {"config.json", "model.safetensors", "README.md", "compression.png", "tn_hf_report.json"}
    assert {p.name for p in folder.iterdir()} == ours | {"src", "notes.txt"}
    assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_save_into_cwd_keeps_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "setup.py").write_text("# user project")
    _saved(".")
    assert os.getcwd() == str(tmp_path) and (tmp_path / "setup.py").exists()
    assert tn_hf.from_pretrained(".", model_class=Net) is not None


def test_save_spares_the_users_readme_and_config(tmp_path):
    (tmp_path / "README.md").write_text("# my project")
    with pytest.warns(UserWarning, match="kept your .*README.md"):
        _saved(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my project"
    assert tn_hf.from_pretrained(tmp_path, model_class=Net) is not None
    other = tmp_path / "app"
    other.mkdir()
    (other / "config.json").write_text('{"port": 8080}')
    with pytest.raises(FileExistsError, match="not a model checkpoint's config"):
        _saved(other)
    assert (other / "config.json").read_text() == '{"port": 8080}' and sorted(p.name for p in other.iterdir()) == [
        "config.json"]


def test_cli_compress_out_keeps_other_files(tmp_path):
    from tn_hf.cli import main
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["compress", "test_resnet", "--random-init", "--ratio", "3", "--targets", "layer4.0.conv2",
                 "--out", str(out)]) == 0
    assert (out / "keep.txt").read_text() == "x" and (out / "model.safetensors").is_file()


def test_failed_save_cleans_up_and_stale_staging_removed(tmp_path, monkeypatch):
    import tn_hf.serialization as ser
    model = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    stale = tmp_path / ".tn_hf-staging-deadbeef"  # left by a killed save
    stale.mkdir()
    (stale / ".tn_hf-writer").touch()
    (stale / "model.safetensors").write_bytes(b"partial")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ser, "write_weights", boom)
    with pytest.raises(OSError, match="disk full"):
        tn_hf.save_pretrained(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # stale one removed too


_SAVER = textwrap.dedent("""
    import sys, torch, tn_hf
    from torch import nn
    sys.path.insert(0, sys.argv[2])
    from test_safety import Net
    torch.manual_seed(0)
    model = Net(width=256)
    tn_hf.compress(model, tn_hf.TNConfig(ranks=64, target_modules=["mid", "rnn"]), progress=False)
    i = 0
    while True:
        i += 1
        with torch.no_grad():
            model.out.bias.fill_(float(i))
        tn_hf.save_pretrained(model, sys.argv[1], model_args={"width": 256})
        print(i, flush=True)
""")


def test_sigkill_mid_save_leaves_a_loadable_checkpoint(tmp_path):
    """Kill a process that saves in a loop at many moments: every time, the folder loads, as a whole
    checkpoint of one of the saves (its weights agree with its own config)."""
    ckpt = tmp_path / "ckpt"
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    here = os.path.dirname(__file__)
    seen = set()
    for k in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(ckpt), here], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "1"  # one complete save exists
        t0 = time.perf_counter()
        assert proc.stdout.readline().strip() == "2"
        save = time.perf_counter() - t0  # how long one save takes on this machine now
        time.sleep(save * (0.15 + 0.45 * k))  # killed at moments spread over the next saves
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        model = tn_hf.from_pretrained(ckpt, model_class=Net)
        b = model.out.bias.detach()
        assert torch.all(b == b[0]) and b[0] >= 1
        seen.add(float(b[0]))
        leftovers = [p.name for p in ckpt.iterdir() if p.name.startswith(".tn_hf")]
        assert leftovers == []  # the load finished or removed the interrupted save
    assert len(seen) >= 2


# ----------------------------------------------------------------------------- 3. push uploads only the checkpoint
def test_push_uploads_only_checkpoint_files_and_names_repo(hub, tmp_path, capsys):
    from tn_hf.cli import main
    folder = tmp_path / "ckpt"
    _saved(folder)
    (folder / ".env").write_text("HF_TOKEN=secret")
    (folder / "private").mkdir()
    (folder / "private" / "id_rsa").write_text("KEY")
    assert main(["push", str(folder), "org/safe-push"]) == 0
    out = capsys.readouterr().out
    files = hub.files("org/safe-push")
    assert set(files) <= {"config.json", "model.safetensors", "README.md", "compression.png", "tn_hf_report.json",
                          ".gitattributes"}
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert "model.safetensors" in out and ".env" not in out  # listed before uploading
    card = files["README.md"].decode()
    assert 'tn_hf.from_pretrained("org/safe-push", model_class=Net)' in card
    assert str(folder) not in card  # the card written locally named the folder; the Hub copy names the repo
    local = (folder / "README.md").read_text()
    assert f'tn_hf.from_pretrained("{folder}", model_class=Net)' in local and "ORG/NAME" not in local


# ----------------------------------------------------------------------------- 6. half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_compresses_at_ratio_and_ranks(dtype):
    for cfg in (tn_hf.TNConfig(compression_ratio=4, target_modules=["mid", "rnn"]),
                tn_hf.TNConfig(ranks=4, target_modules=["mid", "rnn"])):
        torch.manual_seed(0)
        model = Net().to(dtype)
        ref = Net()
        ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        r_half = tn_hf.compress(model, cfg, progress=False)
        r_ref = tn_hf.compress(ref, cfg, progress=False)
        assert all(p.dtype == dtype for p in model.parameters())
        assert [r["ranks"] for r in r_half.rows] == [r["ranks"] for r in r_ref.rows]
        for a, b in zip(r_half.rows, r_ref.rows):
            assert a["rel_error"] == pytest.approx(b["rel_error"], abs=0.02)


# ----------------------------------------------------------------------------- 7. hostile checkpoints
def _peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("edit, match", [
    (lambda s: s["mid"].update(ranks=[1, 100000, 1]), "r.1.=100000 exceeds the largest possible rank"),
    (lambda s: s["mid"].update(ranks=[1, 2, 1]), "shape mismatch"),
    (lambda s: s["mid"].update(ranks=[1, 4.5, 1]), "ranks=.*non-negative ints"),
    (lambda s: s["mid"].update(in_features=4096), "interface: in_features=4096 .module has 32"),
    (lambda s: s["mid"].update({"class": "TTConv2d"}), "would change its interface"),
    (lambda s: s["rnn"].update(num_layers=10 ** 6), "num_layers=1000000 .module has 1"),
    (lambda s: s.update({"": s["mid"]}), "non-empty module names"),
    (lambda s: s.update(mid=[1, 2, 3]), "must be an object"),
])
def test_hostile_specs_fail_before_allocation(tmp_path, edit, match):
    _saved(tmp_path)
    _edit_config(tmp_path, lambda c: edit(c["tn_hf"]["specs"]))
    rss = _peak_rss_mb()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        tn_hf.from_pretrained(tmp_path, model_class=Net)
    assert time.perf_counter() - t0 < 10
    assert _peak_rss_mb() - rss < 200


def _timm_saved(path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_resnet", pretrained=False)
    tn_hf.compress(model, tn_hf.TNConfig(ranks=4, min_params=1000), progress=False)
    tn_hf.save_pretrained(model, path)
    return timm


def test_hostile_timm_checkpoint_fails_before_allocation(tmp_path):
    timm = _timm_saved(tmp_path)
    name = next(iter(json.loads((tmp_path / "config.json").read_text())["tn_hf"]["specs"]))

    def huge(c):
        spec = c["tn_hf"]["specs"][name]
        spec["ranks"] = [1] + [50000] * (len(spec["ranks"]) - 2) + [1]
    _edit_config(tmp_path, huge)
    rss = _peak_rss_mb()
    with pytest.raises(ValueError, match=f"{name}.*exceeds the largest possible rank"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert _peak_rss_mb() - rss < 200


def test_hostile_timm_model_args_fail_before_allocation(tmp_path):
    _timm_saved(tmp_path)
    _edit_config(tmp_path, lambda c: c["model_args"].update(num_classes=10 ** 9))
    rss = _peak_rss_mb()
    with pytest.raises(ValueError, match=r"fc.weight: file \(1000, 96\) vs model \(1000000000, 96\)"):
        tn_hf.from_pretrained(tmp_path)
    assert _peak_rss_mb() - rss < 200
    _edit_config(tmp_path, lambda c: c.update(architecture="os.system"))
    with pytest.raises(ValueError, match="'os.system' is not a timm model name"):
        tn_hf.from_pretrained(tmp_path)


def test_newer_format_and_unknown_keys(tmp_path):
    _saved(tmp_path)
    _edit_config(tmp_path, lambda c: c["tn_hf"].update(format_version=99))
    with pytest.raises(CheckpointError, match="newer tn_hf .checkpoint format 99.*upgrade"):
        tn_hf.from_pretrained(tmp_path, model_class=Net)
    _edit_config(tmp_path, lambda c: c["tn_hf"].update(format_version=1, shiny_new_field=True))
    with pytest.warns(UserWarning, match="unknown tn_hf metadata keys .'shiny_new_field'"):
        tn_hf.from_pretrained(tmp_path, model_class=Net)


def test_non_finite_weights_warn_with_name(tmp_path):
    from safetensors.torch import load_file, save_file
    _saved(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    sd["mid.cores.0"][0, 0, 0] = float("nan")
    save_file(sd, str(f))
    with pytest.warns(UserWarning, match=r"NaN/Inf.*mid\.cores\.0"):
        tn_hf.from_pretrained(tmp_path, model_class=Net)


def test_header_read_without_data(tmp_path):
    _saved(tmp_path)
    header = read_header(tmp_path / "model.safetensors")
    assert header["mid.cores.0"][1] == (1, 4, 4) or header["mid.cores.0"][0] == "F32"
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_header(tmp_path / "model.safetensors")


def test_loaded_layers_are_tn(tmp_path):
    _saved(tmp_path)
    m = tn_hf.from_pretrained(tmp_path, model_class=Net)
    assert isinstance(m.mid, TNLayer) and isinstance(m.rnn, TNLayer) and not isinstance(m.inp, TNLayer)


# ----------------------------------------------------------------------------- 8. clear errors
@pytest.mark.parametrize("cfg, match", [
    (dict(ranks={"mid": [1, 2, 3, 1]}), r"module 'mid' \(Linear\).*need a list of length 3"),
    (dict(ranks={"mid": [1, 500, 1]}), r"module 'mid' \(Linear\).*exceeds the largest possible rank.*valid ranks"),
    (dict(ranks=4, target_modules=["nope"]), r"'nope' matches no module.*candidate module names.*'mid'"),
    (dict(format="tr", ranks={"mid": [2, 3, 4]}), r"module 'mid' \(Linear\).*ring rank"),
])
def test_bad_config_errors_name_module_and_choices(cfg, match):
    with pytest.raises(ValueError, match=match):
        tn_hf.compress(Net(), tn_hf.TNConfig(**cfg), progress=False)


def test_bad_format_names_choices():
    with pytest.raises(ValueError, match=r"format='cp'.*valid choices"):
        tn_hf.TNConfig(format="cp", ranks=4)


# ----------------------------------------------------------------------------- 9. links, partial states, races
def _plant_journal(folder, staging, files):
    (folder / ".tn_hf-commit.json").write_text(json.dumps({"staging": staging, "files": files}))


def test_load_moves_nothing_from_outside_the_folder(tmp_path):
    """A cloned folder with a staging link (or a staged link) and a journal: no loader moves anything,
    the outside file stays where it is, and the error names the journal."""
    timm = pytest.importorskip("timm")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("KEY")
    torch_ckpt, timm_ckpt = tmp_path / "torch", tmp_path / "timm"
    _saved(torch_ckpt)
    _timm_saved(timm_ckpt)
    loads = {torch_ckpt: lambda: tn_hf.from_pretrained(torch_ckpt, model_class=Net),
             timm_ckpt: lambda: timm.create_model(f"local-dir:{timm_ckpt}", pretrained=True)}
    for folder, load in loads.items():
        before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        (folder / ".tn_hf-staging-0123456789ab").symlink_to(outside, target_is_directory=True)
        _plant_journal(folder, ".tn_hf-staging-0123456789ab", ["secret"])
        with pytest.raises(CheckpointError, match=r"\.tn_hf-commit\.json is not a tn_hf save journal.*link"):
            load()
        os.remove(folder / ".tn_hf-staging-0123456789ab")
        staged = folder / ".tn_hf-staging-00000000000f"  # a real staging folder holding a link
        staged.mkdir()
        (staged / ".tn_hf-writer").touch()
        (staged / "model.safetensors").symlink_to(outside / "secret")
        _plant_journal(folder, staged.name, ["model.safetensors"])
        with pytest.raises(CheckpointError, match=r"staged \['model.safetensors'\] are links"):
            load()
        assert (outside / "secret").read_text() == "KEY" and sorted(p.name for p in outside.iterdir()) == ["secret"]
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before | {
            ".tn_hf-commit.json": (folder / ".tn_hf-commit.json").read_bytes()}


def test_push_uploads_regular_files_of_the_folder_only(hub, tmp_path):
    folder = tmp_path / "ckpt"
    _saved(folder)
    key = tmp_path / "id_rsa"
    key.write_text("PRIVATE KEY")
    os.remove(folder / "README.md")
    (folder / "README.md").symlink_to(key)
    with pytest.warns(UserWarning, match=r"not uploading \['README.md'\].*links"):
        tn_hf.push_to_hub(folder, "org/links", progress=False)
    files = hub.files("org/links")
    assert "README.md" not in files and not any(b"PRIVATE KEY" in v for v in files.values())
    assert {"config.json", "model.safetensors"} <= set(files)
    os.remove(folder / "README.md")
    (folder / "id_rsa").write_text("PRIVATE KEY")  # an index may name only *.safetensors files of the folder
    for shard in ("id_rsa", "../id_rsa", str(key), "link.safetensors"):
        if shard == "link.safetensors":
            (folder / shard).symlink_to(key)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"mid.cores.0": shard}}))
        with pytest.raises(FileNotFoundError, match="names shards that are not .*safetensors regular files"):
            tn_hf.push_to_hub(folder, "org/index", progress=False)
    assert "org/index" not in hub.repos or not any(b"PRIVATE KEY" in v for v in hub.files("org/index").values())


def _vivit_saved(path):
    T = pytest.importorskip("transformers")
    cfg = T.VivitConfig(tubelet_size=[2, 8, 8], image_size=32, num_frames=4, hidden_size=64, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=128, num_labels=3)
    torch.manual_seed(0)
    model = T.VivitForVideoClassification(cfg).eval()
    tn_hf.compress(model, tn_hf.TNConfig(ranks=4, min_params=1000), progress=False)
    model.save_pretrained(path)
    return T


def test_transformers_load_matches_tn_cores_by_name(tmp_path):
    """A TN core renamed in the weights file (same shapes, so the count check passes) is a CheckpointError
    naming the core, from transformers' own loader and from tn_hf's, never uninitialised memory."""
    from safetensors.torch import load_file, save_file
    T = _vivit_saved(tmp_path)
    T.VivitForVideoClassification.from_pretrained(tmp_path)  # loads as saved
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith("projection.cores.0"))
    sd[key.replace("projection.", "projection_renamed.")] = sd.pop(key)
    save_file(sd, str(f), metadata={"format": "pt"})
    for load in (T.VivitForVideoClassification.from_pretrained, T.AutoModelForVideoClassification.from_pretrained,
                 tn_hf.from_pretrained):
        with pytest.raises(CheckpointError, match=r"missing keys.*projection\.cores\.0"):
            load(tmp_path)


@pytest.mark.parametrize("edit", ["unexpected", "missing"])
def test_transformers_load_names_unexpected_and_missing_tn_keys(tmp_path, edit):
    """An extra tensor in a TN layer (transformers alone would drop it with a warning) or a core missing
    from the file is a CheckpointError naming the key, before the layers are allocated."""
    from safetensors.torch import load_file, save_file
    T = _vivit_saved(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith(".cores.0"))
    if edit == "unexpected":
        key = key.replace("cores.0", "scale")
        sd[key] = torch.ones(3)
    else:
        del sd[key]
    save_file(sd, str(f), metadata={"format": "pt"})
    for load in (T.VivitForVideoClassification.from_pretrained, tn_hf.from_pretrained):
        with pytest.raises(CheckpointError, match=rf"{edit}.*{re.escape(key)}"):
            load(tmp_path)


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_compress_leaves_the_model_as_it_was(interrupt, monkeypatch, tmp_path):
    import tn_hf.convert as convert
    torch.manual_seed(0)
    model = Net()
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    real, calls = convert._decompose, []

    def second_fails(t, config):
        calls.append(t.name)
        if len(calls) == 2:
            raise interrupt
        return real(t, config)
    monkeypatch.setattr(convert, "_decompose", second_fails)
    cfg = tn_hf.TNConfig(ranks=4, min_params=500, target_modules=["inp", "mid", "rnn"])
    with pytest.raises(type(interrupt)):
        tn_hf.compress(model, cfg, progress=False)
    assert len(calls) == 2
    assert dict(model.named_modules()) == modules  # the same module objects, none swapped
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and state.keys() == \
        model.state_dict().keys()
    assert not hasattr(model, "tn_hf_specs") and not hasattr(model, "tn_hf_report")
    monkeypatch.setattr(convert, "_decompose", real)
    tn_hf.compress(model, cfg, progress=False)  # a retry compresses all three and saves a loadable checkpoint
    assert set(model.tn_hf_specs) == {"inp", "mid", "rnn"}
    tn_hf.save_pretrained(model, tmp_path, model_args={"width": 32})
    assert isinstance(tn_hf.from_pretrained(tmp_path, model_class=Net).mid, TNLayer)


def test_a_load_during_a_slow_save_breaks_nothing(tmp_path, monkeypatch):
    """Another writer's staging folder is left alone by a load (and by a second save); the slow save then
    returns, and what it saved is on disk."""
    import threading

    import tn_hf.serialization as ser
    model = _saved(tmp_path)
    staged, release = threading.Event(), threading.Event()
    real = ser.write_weights

    def slow(m, path):
        real(m, path)
        staged.set()
        assert release.wait(60)
    monkeypatch.setattr(ser, "write_weights", slow)
    with torch.no_grad():
        model.out.bias.fill_(7.0)
    errors = []

    def save():
        try:
            tn_hf.save_pretrained(model, tmp_path, model_args={"width": 32})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    saver = threading.Thread(target=save)
    saver.start()
    assert staged.wait(60)
    monkeypatch.setattr(ser, "write_weights", real)
    loaded = tn_hf.from_pretrained(tmp_path, model_class=Net)  # the old checkpoint, whole
    assert not torch.all(loaded.out.bias == 7.0)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tn_hf-staging-")]  # still there
    release.set()
    saver.join(60)
    assert errors == []
    assert torch.all(tn_hf.from_pretrained(tmp_path, model_class=Net).out.bias == 7.0)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tn_hf")]


def test_recovery_acts_only_on_staging_folders_tn_hf_created(tmp_path):
    """A folder named like a staging folder but without the writer's marker is not tn_hf's: loads and
    saves keep it (and a journal naming it moves nothing); one with the marker whose writer is gone,
    or an empty one, is removed."""
    _saved(tmp_path)
    foreign = tmp_path / ".tn_hf-staging-0000000000aa"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / ".tn_hf-staging-0000000000bb").mkdir()  # a writer killed before its marker
    dead = tmp_path / ".tn_hf-staging-0000000000cc"  # a writer killed mid-render
    dead.mkdir()
    (dead / ".tn_hf-writer").touch()
    (dead / "model.safetensors").write_bytes(b"partial")
    tn_hf.from_pretrained(tmp_path, model_class=Net)
    _saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tn_hf")) == [foreign.name]
    assert (foreign / "notes.txt").read_text() == "mine"
    (tmp_path / ".tn_hf-commit.json").write_text(json.dumps({"staging": foreign.name, "files": ["notes.txt"]}))
    with pytest.raises(CheckpointError, match=r"not a tn_hf save journal.*not created by tn_hf's writer"):
        tn_hf.from_pretrained(tmp_path, model_class=Net)
    assert (foreign / "notes.txt").read_text() == "mine" and not (tmp_path / "notes.txt").exists()


def test_only_a_card_tn_hf_wrote_is_replaced(tmp_path):
    (tmp_path / "README.md").write_text("# my project\n\nCompressed with tn_hf; see tn_hf.compress.\n")
    with pytest.warns(UserWarning, match="kept your .*README.md"):
        _saved(tmp_path)
    assert (tmp_path / "README.md").read_text().startswith("# my project")
    os.remove(tmp_path / "README.md")
    _saved(tmp_path)
    card = (tmp_path / "README.md").read_text()
    _saved(tmp_path)  # our own card is replaced without a word
    assert (tmp_path / "README.md").read_text() == card and "# my project" not in card


def test_hostile_json_and_repo_ids_and_card_text(tmp_path):
    from tn_hf.hub import is_repo_id
    _saved(tmp_path)
    good = (tmp_path / "config.json").read_text()
    for text in ('{"tn_hf": ' + "[" * 100000 + "]" * 100000 + "}", '{"tn_hf": ' + "[" * 200 + "]" * 200 + "}",
                 '{"tn_hf": {"format_version": ' + "9" * 5000 + "}}"):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match="config.json"):
            tn_hf.from_pretrained(tmp_path, model_class=Net)
    (tmp_path / "config.json").write_text(good)
    assert not is_repo_id("org/name\n") and not is_repo_id("name\n") and is_repo_id("org/name")
    torch.manual_seed(0)
    model = Net()
    model.add_module("<script>alert(1)</script>", nn.Linear(32, 32))
    tn_hf.compress(model, tn_hf.TNConfig(ranks=4, min_params=500, target_modules=["<script>alert(1)</script>"]),
                   progress=False)
    tn_hf.save_pretrained(model, tmp_path / "card")
    card = (tmp_path / "card" / "README.md").read_text()
    assert "<script>" not in card and "&lt;script&gt;alert(1)&lt;/script&gt;" in card
