"""plan / compress / decompress / CompressionReport."""
import pytest
import torch
from torch import nn

import tn_hf
from tn_hf.layers.base import TNLayer
from tn_hf.targeting import plan


class CNN(nn.Module):
    def __init__(self, width=32, n_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.conv = nn.Conv2d(width, 64, 3, padding=1)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.tiny = nn.Linear(8, 8)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, n_classes)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.conv(torch.relu(self.stem(x))))))
        x = x.mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def _cnn():
    torch.manual_seed(0)
    return CNN().eval()


def test_plan_default_skips_stem_head_grouped_small():
    names = list(plan(_cnn(), tn_hf.TNConfig(ranks=4, min_params=1000)).specs)
    assert names == ["conv", "fc1"]  # stem, depthwise, tiny and head skipped


def test_plan_explicit_targets_and_excludes():
    m = _cnn()
    assert list(plan(m, tn_hf.TNConfig(ranks=4, target_modules=["fc.*"])).specs) == ["fc1", "fc2"]
    assert list(plan(m, tn_hf.TNConfig(ranks=4, min_params=1000, exclude_modules="fc1")).specs) == ["conv"]


def test_target_pattern_matching_nothing_raises():
    with pytest.raises(ValueError, match=r"'nope\.\*'.*candidate module names.*fc1"):
        plan(_cnn(), tn_hf.TNConfig(ranks=4, target_modules=["nope.*"]))


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_compression_ratio_at_most_one_raises(ratio):
    with pytest.raises(ValueError, match="compression_ratio"):
        tn_hf.TNConfig(compression_ratio=ratio)


def test_tied_weights_are_skipped():
    m = _cnn()
    m.fc3 = nn.Linear(64, 128)
    m.fc3.weight = m.fc1.weight  # shared parameter
    names = list(plan(m, tn_hf.TNConfig(ranks=4, min_params=1000)).specs)
    assert "fc1" not in names and "fc3" not in names and "conv" in names


def test_compress_report_and_decompress_roundtrip():
    m = _cnn()
    x = torch.randn(2, 3, 8, 8)
    ref = m(x)
    report = tn_hf.compress(m, tn_hf.TNConfig(ranks=64, min_params=1000), progress=False)
    assert isinstance(m.conv, TNLayer) and isinstance(m.fc1, TNLayer)
    assert isinstance(m.stem, nn.Conv2d) and isinstance(m.fc2, nn.Linear)
    assert set(m.tn_hf_specs) == {"conv", "fc1"}
    assert m.tn_hf_config["ranks"] == 64
    rows = {r["name"]: r for r in report.rows}
    assert rows["fc1"]["dense_params"] == 64 * 128 + 128
    assert rows["fc1"]["tn_params"] == sum(p.numel() for p in m.fc1.parameters())
    # full ranks: exact up to float error
    assert max(r["rel_error"] for r in report.rows) < 1e-4
    y = m(x)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    table = str(report)
    assert "fc1" in table and "conv" in table and "TOTAL" in table
    assert report.to_dict()["totals"]["layers"] == 2
    tn_hf.decompress(m)
    assert type(m.conv) is nn.Conv2d and type(m.fc1) is nn.Linear
    assert not hasattr(m, "tn_hf_specs")
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)


def test_low_rank_error_reported_and_ratio():
    m = _cnn()
    report = tn_hf.compress(m, tn_hf.TNConfig(ranks=2, min_params=1000), progress=False)
    for r in report.rows:
        assert r["tn_params"] < r["dense_params"]
        w = dict(m.named_modules())[r["name"]]
        assert 0.05 < r["rel_error"] < 1.0, (r["name"], r["rel_error"])
        assert isinstance(w, TNLayer)
    assert report.totals["model_params_tn"] < report.totals["model_params_dense"]


def test_rel_error_config_bounds_error():
    m = _cnn()
    report = tn_hf.compress(m, tn_hf.TNConfig(rel_error=0.3, min_params=1000), progress=False)
    assert all(r["rel_error"] <= 0.3 + 1e-4 for r in report.rows)


def test_compression_ratio_global_budget():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    report = tn_hf.compress(m, tn_hf.TNConfig(compression_ratio=4.0), progress=False)
    assert [r["name"] for r in report.rows] == ["0", "2"]
    ratio = report.totals["target_ratio"]
    assert 3.0 <= ratio <= 8.0, ratio


def test_timm_plan_skips_stem_head_depthwise():
    timm = pytest.importorskip("timm")
    m = timm.create_model("mobilenetv3_small_050", pretrained=False)
    names = list(plan(m, tn_hf.TNConfig(ranks=4)).specs)
    assert names and "conv_stem" not in names and "classifier" not in names
    mods = dict(m.named_modules())
    assert all(getattr(mods[n], "groups", 1) == 1 for n in names)
    r = timm.create_model("test_resnet", pretrained=False)
    names = list(plan(r, tn_hf.TNConfig(ranks=4, min_params=100)).specs)
    assert "conv1.0" not in names and "fc" not in names and any(n.startswith("layer") for n in names)


def test_timm_report_has_flops():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("test_resnet", pretrained=False).eval()
    report = tn_hf.compress(m, tn_hf.TNConfig(ranks=4, min_params=2000), progress=False)
    assert report.totals["flops_per"] == "sample"
    for r in report.rows:
        assert r["flops_dense"] > r["flops_tn"] > 0


def test_flops_budget_and_report_json():
    import json
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("test_resnet", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    report = tn_hf.compress(m, tn_hf.TNConfig(compression_ratio=3.0, budget="flops", min_params=2000),
                            progress=False)
    assert report.totals["flops_tn"] < report.totals["flops_dense"]
    assert m(x).shape == (1, 1000)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["totals"]["layers"] == len(report.rows) > 0


def test_no_target_error_names_conv_subclasses_with_their_own_forward():
    class StdConv(nn.Conv2d):  # weight-standardized, as timm's StdConv2d
        def forward(self, x):
            w = ((self.weight - self.weight.mean((1, 2, 3), keepdim=True))
                 / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5))
            return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)

    m = nn.Sequential(nn.Conv2d(3, 64, 3), StdConv(64, 64, 3), StdConv(64, 64, 3))
    with pytest.raises(ValueError, match="StdConv subclass a supported type with a forward of their own"):
        tn_hf.compress(m, tn_hf.TNConfig(compression_ratio=3))
    assert type(m[1]) is StdConv


def test_progress_says_each_stage_from_the_start(capsys):
    """The bar is up before planning and names each stage (planning, probing, decomposing)."""
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    cfg = tn_hf.TNConfig(ranks=4, min_params=1000, target_modules=["0"])
    tn_hf.compress(net, cfg, progress=True)
    err = capsys.readouterr().err
    at = [err.find(f"tn_hf compress: {s}") for s in ("planning", "probing input shapes", "decomposing")]
    assert -1 not in at and at == sorted(at), err
    assert "1/1" in err
    tn_hf.compress(nn.Sequential(nn.Linear(64, 128), nn.ReLU()), cfg, progress=False)
    assert capsys.readouterr().err == ""
