"""transformers' Conv1D (GPT-2, weight stored (in, out)): layers, compress, save/load, ADMM."""
import pytest
import torch
from torch import nn

import tn_hf
from tn_hf.layers import TNLayer, registry, tn_class_for

T = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

FORMATS = ("tt", "tr", "tucker", "bt")
FULL = {"tt": 100, "tr": 100, "tucker": 100, "bt": 100}


def _gpt2():
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0,
                       eos_token_id=0)
    return T.GPT2LMHeadModel(cfg).eval()


def _ids():
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_is_a_drop_in_for_conv1d(fmt):
    torch.manual_seed(0)
    dense = Conv1D(20, 12).double()  # nf=20 outputs, nx=12 inputs: weight (12, 20)
    with torch.no_grad():
        dense.bias.normal_()
    cls = tn_class_for(dense, fmt)
    assert cls.__name__ == {"tt": "TTHFConv1D", "tr": "TRHFConv1D", "tucker": "TuckerHFConv1D",
                            "bt": "BTHFConv1D"}[fmt] and registry[cls.__name__] is cls
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    full = cls.from_dense(dense, ranks=FULL[fmt])
    assert (full.in_features, full.out_features) == (12, 20) and full.weight.shape == dense.weight.shape
    torch.testing.assert_close(full.weight, dense.weight, rtol=1e-9, atol=1e-10)  # read the right way round
    torch.testing.assert_close(full(x), dense(x), rtol=1e-9, atol=1e-10)
    small = cls.from_dense(dense, ranks=2)
    ref = small.to_dense()
    assert type(ref) is Conv1D and (ref.nf, ref.nx) == (20, 12)
    torch.testing.assert_close(small(x), ref(x), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(small.contract(x), ref(x), rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="expected transformers' Conv1D, got Linear"):
        cls.dense_spec(nn.Linear(12, 20))


@pytest.mark.parametrize("fmt", FORMATS)
def test_gpt2_compress_save_load_equal_logits(fmt, tmp_path):
    model = _gpt2()
    ids = _ids()
    report = tn_hf.compress(model, tn_hf.TNConfig(format=fmt, compression_ratio=2), progress=False)
    names = [r["name"] for r in report.rows]
    assert len(names) == 8 and all(r["type"] == "Conv1D" for r in report.rows)  # c_attn, c_proj, c_fc, c_proj x 2
    assert "transformer.h.0.attn.c_attn" in names and "lm_head" not in names
    with torch.no_grad():
        y = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    auto = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = tn_hf.from_pretrained(tmp_path).eval()
    for loaded in (auto, ours):
        assert sum(isinstance(m, TNLayer) for m in loaded.modules()) == 8
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, y, rtol=1e-5, atol=1e-5)
    tn_hf.decompress(model)
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, y, rtol=1e-4, atol=1e-4)


def test_admm_pulls_the_conv1d_weight_read_transposed():
    model = _gpt2()
    cfg = tn_hf.TNConfig(format="tt", compression_ratio=4, target_modules=["c_attn", "c_fc"])
    sched = tn_hf.ADMMScheduler(model, cfg, total_steps=6)
    name = "transformer.h.0.attn.c_attn"
    conv = model.get_submodule(name)
    assert sched.Z[name].shape == conv.weight.shape == (64, 192)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = _ids()
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():  # put Z in place: it is a TT matrix at the planned ranks in Conv1D's orientation ...
        for s in sched.slots:
            s.param.copy_(sched.Z[s.name])
        y = model(input_ids=ids).logits
    report = sched.compress()
    # ... so decomposing it at those ranks is exact and the model computes the same
    assert len(report.rows) == 4 and max(r["rel_error"] for r in report.rows) < 1e-4
    assert type(model.get_submodule(name)).__name__ == "TTHFConv1D"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, y, rtol=1e-4, atol=1e-4)
