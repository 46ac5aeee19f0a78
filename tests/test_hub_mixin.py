"""huggingface_hub's PyTorchModelHubMixin: save_pretrained / from_pretrained of compressed models keep
the TN layers (tn_hf.integrations.hub_mixin), locally and through the local Hub server."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_model
from torch import nn

import tn_hf
from tn_hf.layers.linear import TTLinear
from tn_hf.serialization import CheckpointError

hub_mixin = pytest.importorskip("huggingface_hub.hub_mixin")
from tn_hf.integrations import hub_mixin as hook  # noqa: E402


class MixNet(nn.Module, hub_mixin.PyTorchModelHubMixin):
    def __init__(self, width: int = 64, n_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@dataclasses.dataclass
class Width:
    width: int = 64


class ConfigNet(nn.Module, hub_mixin.PyTorchModelHubMixin):
    """A dataclass ``config`` argument: the mixin records the dataclass itself."""

    def __init__(self, config: Width):
        super().__init__()
        self.fc1 = nn.Linear(64, config.width)

    def forward(self, x):
        return self.fc1(x)


class NoArgNet(nn.Module, hub_mixin.PyTorchModelHubMixin):
    """No constructor arguments: a loaded instance records the whole config.json as its config."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 48)

    def forward(self, x):
        return self.fc1(x)


X = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))


def _compressed(width=32):
    torch.manual_seed(0)
    model = MixNet(width=width).eval()
    tn_hf.compress(model, tn_hf.TNConfig(format="tt", ranks=4, min_params=100, target_modules=["fc1", "fc2"]),
                   progress=False)
    return model


def _same(loaded, model):
    assert isinstance(loaded, MixNet) and not loaded.training
    assert {n: type(loaded.get_submodule(n)) for n in model.tn_hf_specs} == {"fc1": TTLinear, "fc2": TTLinear}
    assert loaded.tn_hf_specs == model.tn_hf_specs and loaded.fc2.in_features == model.fc2.in_features
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_mixin_save_then_mixin_load(tmp_path):
    model = _compressed(width=32)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["width"] == 32 and cfg["n_classes"] == 10 and set(cfg["tn_hf"]["specs"]) == {"fc1", "fc2"}
    assert f'MixNet.from_pretrained("{tmp_path}")' in (tmp_path / "README.md").read_text()  # tn_hf's card
    _same(MixNet.from_pretrained(tmp_path), model)


def test_tn_hf_save_then_mixin_load(tmp_path):
    model = _compressed(width=32)  # not the default width: the kwargs must reach __init__
    tn_hf.save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["width"] == 32 and cfg["model_args"] == {"width": 32, "n_classes": 10}
    _same(MixNet.from_pretrained(tmp_path), model)
    _same(tn_hf.from_pretrained(tmp_path, model_class=MixNet), model)


@pytest.mark.parametrize("build", [lambda: ConfigNet(Width(width=32)), NoArgNet], ids=["dataclass", "no-args"])
def test_loaded_model_saves_and_loads_again(tmp_path, build):
    torch.manual_seed(0)
    model = build().eval()
    tn_hf.compress(model, tn_hf.TNConfig(format="tt", ranks=4, target_modules=["fc1"]), progress=False)
    model.save_pretrained(tmp_path / "a")
    again = type(model).from_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")  # a loaded instance's recorded config holds tn_hf's keys too
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["tn_hf"]["specs"] == model.tn_hf_specs and "model_args" not in cfg["model_args"]
    last = type(model).from_pretrained(tmp_path / "b")
    assert isinstance(last.fc1, TTLinear) and last.fc1.out_features == model.fc1.out_features
    with torch.no_grad():
        assert torch.equal(last(X), model(X))


def test_through_the_hub(hub):
    model = _compressed(width=32)
    model.push_to_hub("org/mixnet")  # the mixin's own push (save_pretrained into a temp folder)
    assert json.loads(hub.files("org/mixnet")["config.json"])["tn_hf"]["specs"] == model.tn_hf_specs
    _same(MixNet.from_pretrained("org/mixnet"), model)
    tn_hf.push_to_hub(model, "org/mixnet-tn", progress=False)
    _same(MixNet.from_pretrained("org/mixnet-tn"), model)


def test_mismatched_or_corrupt_checkpoint_raises(tmp_path):
    model = _compressed(width=32)
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    good = json.dumps(cfg)
    cfg["tn_hf"]["specs"]["fc1"]["ranks"][1] += 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        MixNet.from_pretrained(tmp_path)
    cfg_path.write_text(good)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        MixNet.from_pretrained(tmp_path)


def test_cores_without_metadata_are_refused(tmp_path):
    model = _compressed(width=32)
    save_model(model, str(tmp_path / "model.safetensors"))  # what the mixin alone writes
    (tmp_path / "config.json").write_text(json.dumps({"width": 32, "n_classes": 10}))
    with pytest.raises(CheckpointError, match="no 'tn_hf' metadata"):
        MixNet.from_pretrained(tmp_path)


def test_dense_checkpoint_loads_as_without_the_hook(tmp_path):
    torch.manual_seed(0)
    dense = MixNet(width=32).eval()
    dense.save_pretrained(tmp_path)
    assert "tn_hf" not in json.loads((tmp_path / "config.json").read_text())
    assert "pytorch_model_hub_mixin" in (tmp_path / "README.md").read_text()  # the mixin's own card
    hooked = MixNet.from_pretrained(tmp_path)
    hook.uninstall()
    try:
        plain = MixNet.from_pretrained(tmp_path)
    finally:
        assert hook.install() is True
    assert isinstance(hooked.fc1, nn.Linear) and hooked.fc1.out_features == 32
    for (k, a), (k2, b) in zip(hooked.state_dict().items(), plain.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(hooked(X), dense(X))


def test_uninstall_restores_the_originals_and_version_guard(monkeypatch):
    import huggingface_hub
    mixin = hub_mixin.PyTorchModelHubMixin
    wrapped = {name: vars(mixin)[name] for name in ("_save_pretrained", "_load_as_safetensor")}
    originals = {name: hook._function(d)._tn_hf_original for name, d in wrapped.items()}
    assert hook._function(wrapped["_load_as_safetensor"]).__wrapped__ is originals["_load_as_safetensor"].__func__
    hook.uninstall()
    try:
        for name, original in originals.items():
            assert vars(mixin)[name] is original
        assert isinstance(vars(mixin)["_load_as_safetensor"], classmethod)
        monkeypatch.setattr(huggingface_hub, "__version__", "9.0.0")
        with pytest.warns(UserWarning, match="huggingface_hub 9.0.0 is not supported"):
            assert hook.install() is False
        assert vars(mixin)["_save_pretrained"] is originals["_save_pretrained"]
        monkeypatch.undo()
    finally:
        assert hook.install() is True
    assert hook.install() is True  # idempotent: wraps once
    assert hook._function(vars(mixin)["_save_pretrained"]).__wrapped__ is originals["_save_pretrained"]


@pytest.mark.parametrize("order", ["tn_hf first", "huggingface_hub first"])
def test_hook_installs_whichever_is_imported_first(order):
    imports = ["import tn_hf; print('huggingface_hub' in sys.modules)",
               "from huggingface_hub import PyTorchModelHubMixin as M"]
    if order != "tn_hf first":
        imports.reverse()
    code = "import sys; " + "; ".join(imports) + "; print(getattr(M._load_as_safetensor, '_tn_hf', False), " \
        "getattr(M._save_pretrained, '_tn_hf', False), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    flags = out.stdout.split()
    assert flags[-3:] == ["True", "True", "False"], out.stderr  # wrapped, and torch still not imported
    if order == "tn_hf first":
        assert flags[0] == "False"  # import tn_hf imported no huggingface_hub
