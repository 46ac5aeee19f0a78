"""What a newcomer tries first: error-driven ranks on 1x1 convs, container targets, timm head
re-initialisation, compress-on-load through transformers' quantization_config."""
import pytest
import torch
from torch import nn

import tn_hf
from tn_hf.layers.base import TNLayer
from tn_hf.targeting import plan


def test_rel_error_on_strided_1x1_convs():
    """resnet18's downsample 1x1 convs have a size-1 kernel mode: an error-driven sweep must not
    produce ranks its own layer rejects."""
    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(64, 128, 1, stride=2), nn.Conv2d(128, 256, 1, stride=2))
    report = tn_hf.compress(convs, tn_hf.TNConfig(rel_error=0.1, target_modules=["0", "1"]), progress=False)
    assert all(r["rel_error"] <= 0.1 + 1e-4 for r in report.rows)
    x = torch.randn(2, 64, 8, 8)
    (convs(x) ** 2).sum().backward()  # forward + backward of the strided 1x1 TT convs


def test_container_name_selects_its_layers():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False)
    names = list(plan(model, tn_hf.TNConfig(ranks=4, target_modules=["layer4"])).specs)
    expected = [n for n, m in model.named_modules() if n.startswith("layer4.") and type(m) is nn.Conv2d]
    assert names == expected and names
    excluded = list(plan(model, tn_hf.TNConfig(ranks=4, exclude_modules=["layer4"], min_params=1)).specs)
    assert excluded and not any(n.startswith("layer4.") for n in excluded)


def test_timm_local_dir_with_new_num_classes(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    tn_hf.compress(model, tn_hf.TNConfig(ranks=4, min_params=1000), progress=False)
    tn_hf.save_pretrained(model, tmp_path)
    five = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=5).eval()
    assert five.get_classifier().out_features == 5
    for name in model.tn_hf_specs:
        assert isinstance(five.get_submodule(name), TNLayer)
        for a, b in zip(five.get_submodule(name).parameters(), model.get_submodule(name).parameters()):
            assert torch.equal(a, b)
    with torch.no_grad():
        assert five(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_compress_on_load_with_quantization_config(tmp_path):
    T = pytest.importorskip("transformers")
    cfg = T.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=64,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=3)
    torch.manual_seed(0)
    dense = T.VideoMAEForVideoClassification(cfg).eval()
    dense.save_pretrained(tmp_path / "dense")
    model = T.VideoMAEForVideoClassification.from_pretrained(
        tmp_path / "dense", quantization_config=tn_hf.TNConfig(ranks=64, min_params=1000)).eval()
    assert isinstance(model.videomae.encoder.layer[0].intermediate.dense, TNLayer)
    x = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x).logits, atol=1e-5, rtol=1e-4)  # full rank
    model.save_pretrained(tmp_path / "tn")
    again = T.VideoMAEForVideoClassification.from_pretrained(tmp_path / "tn").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits)


def test_timm_hook_lets_the_hub_error_through_unchanged(monkeypatch):
    """Hub unreachable: timm's own error reaches the caller as it is (the same object, nothing chained
    to it); the hook's config.json lookup failing hands the load to timm instead of raising its own."""
    pytest.importorskip("timm")
    from timm.models import _hub

    from tn_hf.integrations.timm import _make_wrapper

    class HubDown(Exception):
        pass
    upstream = HubDown("timm's loader: the Hub cannot be reached")

    def original(model, pretrained_cfg=None, *args, **kwargs):
        raise upstream

    def unreachable(*args, **kwargs):
        raise ConnectionError("config.json: the Hub cannot be reached")
    monkeypatch.setattr(_hub, "download_from_hf", unreachable)
    wrapper = _make_wrapper(original)
    for cfg in ({"source": "hf-hub", "hf_hub_id": "org/name"}, {"hf_hub_id": "timm/resnet18.a1_in1k"}):
        with pytest.raises(HubDown) as e:
            wrapper(nn.Linear(2, 2), cfg)
        assert e.value is upstream and e.value.__cause__ is None and e.value.__context__ is None
