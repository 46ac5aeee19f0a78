"""compress -> forward -> save -> load with the ecosystem's own loader -> identical outputs."""
import json

import pytest
import torch
from nets import Seq
from torch import nn

import tn_hf
from tn_hf.layers.base import TNLayer

CFG = dict(ranks=4, min_params=1000)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _n_tn(model):
    return sum(isinstance(m, TNLayer) for m in model.modules())


# ----------------------------------------------------------------------------- timm
TIMM = ["test_resnet", "resnet10t", "regnetx_002", "test_efficientnet", "mobilenetv3_small_050",
        "test_convnext", "test_vit"]


@pytest.mark.parametrize("arch", TIMM)
def test_timm_roundtrip(arch, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=5).eval()
    tn_hf.compress(model, tn_hf.TNConfig(**CFG), progress=False)
    n = _n_tn(model)
    assert n > 0
    size = 160 if "vit" in arch else 64
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        y = model(x)
    tn_hf.save_pretrained(model, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["architecture"] == arch and cfg["num_classes"] == 5 and "pretrained_cfg" in cfg
    assert set(cfg["tn_hf"]["specs"]) == set(model.tn_hf_specs)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'ckpt'}", pretrained=True).eval()
    assert _n_tn(loaded) == n
    with torch.no_grad():
        _close(loaded(x), y)
    again = tn_hf.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        _close(again(x), y)


def test_hf_hub_sources(tmp_path, hub):
    """hf-hub ids (local Hub server via HF_ENDPOINT): timm, tn_hf and transformers loaders."""
    timm = pytest.importorskip("timm")
    from huggingface_hub import create_repo, upload_folder
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    tn_hf.compress(model, tn_hf.TNConfig(**CFG), progress=False)
    tn_hf.save_pretrained(model, tmp_path / "repo")
    create_repo("org/tn-resnet")
    upload_folder(folder_path=str(tmp_path / "repo"), repo_id="org/tn-resnet")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        _close(timm.create_model("hf-hub:org/tn-resnet", pretrained=True).eval()(x), y)
        _close(tn_hf.from_pretrained("org/tn-resnet").eval()(x), y)
    tf_model, cls, inputs, _ = _tf_compressed("vivit")
    tn_hf.save_pretrained(tf_model, tmp_path / "vivit")
    create_repo("org/tn-vivit-src")
    upload_folder(folder_path=str(tmp_path / "vivit"), repo_id="org/tn-vivit-src")
    y = _out(tf_model, inputs)
    _close(_out(cls.from_pretrained("org/tn-vivit-src"), inputs), y)
    _close(_out(tn_hf.from_pretrained("org/tn-vivit-src"), inputs), y)


def test_timm_plain_checkpoint_still_loads(tmp_path):
    """The hook passes non-TN checkpoints to timm's own loader."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    save_for_hf(model, str(tmp_path))
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert _n_tn(loaded) == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _close(loaded(x), model(x))


# ----------------------------------------------------------------------------- transformers
def _tf_models():
    import transformers as T
    vid = dict(image_size=32, num_frames=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=128, num_labels=3)
    video = torch.randn(1, 4, 3, 32, 32)
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    return {
        "videomae": (lambda: T.VideoMAEConfig(patch_size=8, tubelet_size=2, **vid),
                     T.VideoMAEForVideoClassification, dict(pixel_values=video)),
        "timesformer": (lambda: T.TimesformerConfig(patch_size=8, **vid),
                        T.TimesformerForVideoClassification, dict(pixel_values=video)),
        "vivit": (lambda: T.VivitConfig(tubelet_size=[2, 8, 8], **vid),
                  T.VivitForVideoClassification, dict(pixel_values=video)),
        "vjepa2": (lambda: T.VJEPA2Config(crop_size=32, frames_per_clip=4, patch_size=8, tubelet_size=2,
                                          hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          mlp_ratio=2.0, pred_hidden_size=32, pred_num_hidden_layers=1,
                                          pred_num_attention_heads=2, num_labels=3),
                   T.VJEPA2ForVideoClassification, dict(pixel_values_videos=video)),
        "rwkv": (lambda: T.RwkvConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
                                      intermediate_size=128, context_length=32, rescale_every=1),
                 T.RwkvForCausalLM, dict(input_ids=ids)),
        "mamba": (lambda: T.MambaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2),
                  T.MambaForCausalLM, dict(input_ids=ids)),
        "recurrent_gemma": (lambda: T.RecurrentGemmaConfig(
            vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32, intermediate_size=128, lru_width=64, attention_window_size=16,
            block_types=["recurrent", "attention"]), T.RecurrentGemmaForCausalLM, dict(input_ids=ids)),
        "xlstm": (lambda: T.xLSTMConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_heads=2,
                                        qk_dim_factor=1.0), T.xLSTMForCausalLM, dict(input_ids=ids)),
    }


def _out(model, inputs):
    with torch.no_grad():
        o = model(**inputs)
    return o.logits


def _tf_compressed(family):
    pytest.importorskip("transformers")
    make_cfg, cls, inputs = _tf_models()[family]
    torch.manual_seed(0)
    model = cls(make_cfg()).eval()
    report = tn_hf.compress(model, tn_hf.TNConfig(**CFG), progress=False)
    return model, cls, inputs, report


@pytest.mark.parametrize("family", ["videomae", "timesformer", "vivit", "vjepa2",
                                    "rwkv", "mamba", "recurrent_gemma", "xlstm"])
def test_transformers_roundtrip(family, tmp_path):
    model, cls, inputs, report = _tf_compressed(family)
    assert report.rows
    # save before the first eval forward: RWKV rescales some weights in place in eval mode
    # (transformers would save those rescaled weights, for dense models too)
    model.save_pretrained(tmp_path / "native")  # transformers' own writer
    tn_hf.save_pretrained(model, tmp_path / "ours")
    y = _out(model, inputs)
    cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "tn_hf"
    assert set(cfg["quantization_config"]["specs"]) == set(model.tn_hf_specs)
    loaded = cls.from_pretrained(tmp_path / "native").eval()
    assert _n_tn(loaded) == _n_tn(model) > 0
    _close(_out(loaded, inputs), y)
    again = tn_hf.from_pretrained(tmp_path / "ours")
    _close(_out(again, inputs), y)


def test_videomae_patch_embedding_conv3d_compressed_and_decompress():
    model, cls, inputs, _ = _tf_compressed("videomae")
    assert isinstance(model.videomae.embeddings.patch_embeddings.projection, TNLayer)
    assert isinstance(model.classifier, nn.Linear)  # head skipped
    y = _out(model, inputs)
    tn_hf.decompress(model)
    assert type(model.videomae.embeddings.patch_embeddings.projection) is nn.Conv3d
    assert getattr(model.config, "quantization_config", None) is None
    _close(_out(model, inputs), y)


def test_rwkv_rescaled_weights_and_tied_heads_skipped():
    model, *_ = _tf_compressed("rwkv")
    names = set(model.tn_hf_specs)
    assert not any(n.endswith(("attention.output", "feed_forward.value")) for n in names)
    assert "head" not in names and any(n.endswith("attention.key") for n in names)
    # at full rank the compressed model's eval forward (with RWKV's rescaling) equals the dense one
    make_cfg, cls, inputs = _tf_models()["rwkv"]
    torch.manual_seed(0)
    dense = cls(make_cfg()).eval()
    full = cls(make_cfg()).eval()
    full.load_state_dict(dense.state_dict())
    tn_hf.compress(full, tn_hf.TNConfig(ranks=256, min_params=1000), progress=False)
    _close(_out(full, inputs), _out(dense, inputs))
    _close(_out(full, inputs), _out(dense, inputs))  # second call: layers already rescaled
    mamba, *_ = _tf_compressed("mamba")
    assert "lm_head" not in mamba.tn_hf_specs  # tied to the input embedding


def test_transformers_strict_load_raises_on_missing_key(tmp_path):
    from safetensors.torch import load_file, save_file
    model, cls, inputs, _ = _tf_compressed("videomae")
    model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith("cores.0"))
    del sd[key]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match the TN specs.*only in the specs"):
        cls.from_pretrained(tmp_path)


def test_transformers_bad_spec_raises(tmp_path):
    model, cls, inputs, _ = _tf_compressed("vivit")
    model.save_pretrained(tmp_path)
    good = (tmp_path / "config.json").read_text()
    cfg = json.loads(good)
    name = next(iter(cfg["quantization_config"]["specs"]))
    cfg["quantization_config"]["specs"][name]["class"] = "TTFancy"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{name}.*TTFancy"):
        cls.from_pretrained(tmp_path)
    cfg = json.loads(good)
    name = next(n for n in cfg["quantization_config"]["specs"] if n.endswith("q_proj"))
    _bump_ranks(cfg["quantization_config"]["specs"][name])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mismatch"):
        cls.from_pretrained(tmp_path)


def test_transformers_trainer_finetunes_loaded_model(tmp_path):
    from transformers import Trainer, TrainingArguments
    model, cls, inputs, _ = _tf_compressed("videomae")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = cls.from_pretrained(tmp_path / "ckpt")
    before = [p.detach().clone() for n, p in loaded.named_parameters() if "cores" in n]
    data = [{"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor(i % 3)} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    Trainer(model=loaded, args=args, train_dataset=data).train()
    after = [p.detach() for n, p in loaded.named_parameters() if "cores" in n]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


# ----------------------------------------------------------------------------- plain torch


@pytest.mark.parametrize("cfg", [dict(ranks=4), dict(format="tucker", compression_ratio=3, compress_hidden=True)],
                         ids=["tt", "tucker"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_plain_recurrent_roundtrip(cell, cfg, tmp_path):
    torch.manual_seed(0)
    model = Seq(cell).eval()
    tn_hf.compress(model, tn_hf.TNConfig(min_params=500, **cfg), progress=False)
    assert isinstance(model.rnn, TNLayer) and isinstance(model.head, nn.Linear)
    assert model.rnn.format == cfg.get("format", "tt")
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y = model(x)
    tn_hf.save_pretrained(model, tmp_path, model_args={"cell": cell})
    loaded = tn_hf.from_pretrained(tmp_path, model_class=Seq)
    with torch.no_grad():
        _close(loaded(x), y)
    tn_hf.decompress(loaded)
    assert type(loaded.rnn) is (nn.LSTM if cell == "lstm" else nn.GRU)
    with torch.no_grad():
        _close(loaded(x), y)


# ----------------------------------------------------------------------------- bad input
def _saved_torch(tmp_path):
    torch.manual_seed(0)
    model = Seq("lstm").eval()
    tn_hf.compress(model, tn_hf.TNConfig(ranks=4, min_params=500), progress=False)
    tn_hf.save_pretrained(model, tmp_path, model_args={"cell": "lstm"})
    return model


def test_truncated_safetensors_raises(tmp_path):
    _saved_torch(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors.*corrupt or truncated"):
        tn_hf.from_pretrained(tmp_path, model_class=Seq)


def test_corrupt_safetensors_timm_raises(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_resnet", pretrained=False)
    tn_hf.compress(model, tn_hf.TNConfig(**CFG), progress=False)
    tn_hf.save_pretrained(model, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)


def test_spec_not_matching_weights_raises(tmp_path):
    _saved_torch(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    name = next(iter(cfg["tn_hf"]["specs"]))
    _bump_ranks(cfg["tn_hf"]["specs"][name])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch.*cores"):
        tn_hf.from_pretrained(tmp_path, model_class=Seq)


def _bump_ranks(spec):
    """Raise every internal rank of every leaf spec by one."""
    if isinstance(spec, dict):
        if isinstance(spec.get("ranks"), list):
            r = spec["ranks"]
            spec["ranks"] = [r[0]] + [x + 1 for x in r[1:-1]] + [r[-1]]
        for v in spec.values():
            _bump_ranks(v)


def test_unknown_layer_class_raises(tmp_path):
    _saved_torch(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    name = next(iter(cfg["tn_hf"]["specs"]))
    cfg["tn_hf"]["specs"][name]["class"] = "TTFancy"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"config.json.*{name}.*TTFancy"):
        tn_hf.from_pretrained(tmp_path, model_class=Seq)


def test_unrebuildable_plain_model_raises(tmp_path):
    _saved_torch(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["model_class"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="cannot rebuild.*model_class="):
        tn_hf.from_pretrained(tmp_path)


def test_uncompressed_model_save_raises(tmp_path):
    with pytest.raises(ValueError, match="no TN spec"):
        tn_hf.save_pretrained(Seq(), tmp_path)


def test_crash_mid_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    import tn_hf.serialization as ser
    model = _saved_torch(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ser, "write_weights", boom)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        tn_hf.save_pretrained(model, tmp_path / "ckpt", model_args={"cell": "lstm"})
    after = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(after) == sorted(before)  # no staging folder left behind
    monkeypatch.undo()
    tn_hf.save_pretrained(model, tmp_path / "ckpt", model_args={"cell": "lstm"})
    loaded = tn_hf.from_pretrained(tmp_path / "ckpt", model_class=Seq)
    _close(loaded.head.weight, model.head.weight)


def test_tensor_ring_roundtrip(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    tn_hf.compress(model, tn_hf.TNConfig(format="tr", ranks=2, min_params=1000), progress=False)
    assert all(s["format"] == "tr" for s in model.tn_hf_specs.values())
    x = torch.randn(1, 3, 64, 64)
    tn_hf.save_pretrained(model, tmp_path)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    with torch.no_grad():
        _close(loaded(x), model(x))
