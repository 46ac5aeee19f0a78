"""Block-term format: decomposition, projection, layers (both forward paths), compress, save/load, ADMM."""
import json
import math

import pytest
import torch
from test_tucker import Net, _net
from torch import nn
from torch.nn import functional as F

import tn_hf
from tn_hf.decompositions import (
    bt_allocate,
    bt_decompose,
    bt_params,
    bt_project,
    bt_ranks,
    bt_ranks_for_ratio,
    bt_to_full,
    project,
    tucker_project,
)
from tn_hf.layers import BTGRU, BTLSTM, BTConv1d, BTConv2d, BTConv3d, BTLinear, TNLayer, layer_from_spec, tn_class_for


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _random_bt(shape, n, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(n, *ranks, generator=g, dtype=torch.float64)
    return bt_to_full(core, [torch.randn(n, s, r, generator=g, dtype=torch.float64) for s, r in zip(shape, ranks)])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- decompositions
def test_recovers_a_block_term_tensor_and_error_never_increases():
    x = _random_bt((8, 9, 10), 2, (2, 2, 2))
    res = bt_decompose(x, ranks=[2, 2, 2, 2], sweeps=60)
    assert res.core.shape == (2, 2, 2, 2) and [tuple(u.shape) for u in res.factors] == [(2, 8, 2), (2, 9, 2),
                                                                                         (2, 10, 2)]
    assert res.rel_error < 1e-5 and res.rel_error == pytest.approx(_rel(bt_to_full(res.core, res.factors), x))
    assert all(a >= b - 1e-12 for a, b in zip(res.history, res.history[1:]))
    for u in res.factors[0]:  # orthonormal columns in every block
        _close(u.T @ u, torch.eye(2, dtype=u.dtype), 1e-9)
    one = bt_decompose(x, ranks=[1, 2, 2, 2], sweeps=60)  # one block (Tucker) cannot: its error is large
    assert one.rel_error > 0.1


def test_error_decreases_with_rank_and_is_exact_at_full_rank():
    x = torch.randn(8, 9, 10, dtype=torch.float64)
    errs = [bt_decompose(x, ranks=[2, r, r, r]).rel_error for r in (1, 2, 3, 4, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    res = bt_decompose(x, ranks=[2, 8, 9, 10])
    assert res.rel_error < 1e-12
    _close(bt_to_full(res.core, res.factors), x, 1e-10)
    # more blocks at the same block ranks: a lower error
    assert bt_decompose(x, ranks=[3, 3, 3, 3]).rel_error < bt_decompose(x, ranks=[1, 3, 3, 3]).rel_error
    # one block is Tucker: no worse than ST-HOSVD (HOOI steps only lower its error)
    assert bt_decompose(x, ranks=[1, 3, 4, 5]).rel_error <= _rel(tucker_project(x, [3, 4, 5]), x) + 1e-12


def test_history_is_monotone_on_random_data():
    torch.manual_seed(0)
    x = torch.randn(6, 7, 8, 5, dtype=torch.float64)
    res = bt_decompose(x, ranks=[3, 2, 3, 2, 2], sweeps=15, tol=0)
    assert len(res.history) == 16
    assert all(a >= b - 1e-12 for a, b in zip(res.history, res.history[1:]))
    assert res.history[-1] < res.history[0]


def test_rank_normalisation_and_errors():
    assert bt_ranks([4, 5, 100], 10) == [2, 4, 5, 10]  # an int: 2 blocks, block ranks clipped as Tucker's
    assert bt_ranks([4, 5, 6], [3, 2, 2, 2]) == [3, 2, 2, 2]
    assert bt_params([4, 5, 6], [3, 2, 2, 2]) == 3 * (8 + 2 * (4 + 5 + 6))
    with pytest.raises(ValueError, match=r"\[N, r_1..r_3\] of 4 ints"):
        bt_ranks([4, 5, 6], [2, 2, 2])
    with pytest.raises(ValueError, match="blocks N = r\\[0\\] must be >= 1"):
        bt_ranks([4, 5, 6], [0, 2, 2, 2])
    with pytest.raises(ValueError, match="not attainable"):
        bt_ranks([4, 5, 6], [2, 5, 2, 2])
    with pytest.raises(ValueError, match="exactly one of ranks= or compression_ratio="):
        bt_decompose(torch.randn(3, 4), ranks=2, compression_ratio=2)


@pytest.mark.parametrize("data", [False, True])
def test_ranks_for_ratio_and_allocation_meet_budget(data):
    torch.manual_seed(0)
    shape = (16, 12, 9, 20)
    t = torch.randn(shape) if data else None
    for ratio in (5, 40, 300):
        r = bt_ranks_for_ratio(shape, ratio, t)
        assert bt_ranks(shape, r) == r and r[0] == (2 if ratio < 300 else 1)  # 300x: two rank-1 blocks don't fit
        assert bt_params(shape, r) <= math.prod(shape) / ratio
    res = bt_decompose(torch.randn(shape), compression_ratio=40)
    assert bt_params(shape, list(res.core.shape)) <= math.prod(shape) / 40
    big, small = torch.randn(30, 40, 50), _random_bt((10, 10), 1, (6, 6)).float()
    r = bt_allocate({"big": big, "small": small}, ratio=10)
    assert bt_params(big.shape, r["big"]) + bt_params(small.shape, r["small"]) <= (big.numel() + 100) / 10
    assert r["small"] == [1, 6, 6]  # exact with one block: a second would only cost parameters


def test_project_dispatch():
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    _close(project(x, [2, 2, 2, 2], "bt"), bt_project(x, [2, 2, 2, 2]))
    with pytest.raises(ValueError, match="'bt'"):
        project(x, 2, "cp")


# ----------------------------------------------------------------------------- layers
@pytest.mark.parametrize("ranks", [3, [3, 4, 2, 3, 5]])
def test_linear_both_paths_equal_and_full_rank_exact(ranks):
    torch.manual_seed(0)
    lin = nn.Linear(36, 20).double()
    layer = BTLinear.from_dense(lin, ranks=ranks, in_factors=[6, 6], out_factors=[4, 5])
    x = torch.randn(3, 5, 36, dtype=torch.float64)
    dense = F.linear(x, layer.weight, layer.bias)
    _close(layer.contract(x), dense)
    _close(layer(x), dense)
    full = BTLinear.from_dense(lin, ranks=[1, 4, 5, 6, 6], in_factors=[6, 6], out_factors=[4, 5])
    _close(full(x), lin(x), 1e-9)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("kw", [dict(stride=2, padding=1), dict(padding="same", padding_mode="reflect", dilation=2)])
def test_conv_both_paths_equal_and_full_rank_exact(dim, kw):
    torch.manual_seed(dim)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim](12, 16, 3, **kw).double()
    cls = tn_class_for(conv, "bt")
    assert cls is {1: BTConv1d, 2: BTConv2d, 3: BTConv3d}[dim]
    layer = cls.from_dense(conv, ranks=3)
    assert layer.ranks == [2, 3, 3, 3, 3, 3]
    x = torch.randn(2, 12, *([7] * dim), dtype=torch.float64)
    dense_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]
    y_dense = dense_fn(layer._pad_input(x), layer.weight, layer.bias, layer.stride, layer._conv_padding,
                       layer.dilation)
    _close(layer.contract(x), y_dense)
    _close(layer(x), y_dense)
    full = cls.from_dense(conv, ranks=100)  # two blocks at full block ranks (clipped)
    _close(full(x), conv(x), 1e-9)


def test_forward_path_follows_flops_and_gradients_match():
    layer = BTLinear(1024, 1024, ranks=4)
    cost = layer.cost((64, 1024))
    assert not layer.use_dense_path(64) and cost["path"] == "contract" and cost["contract"] < cost["rebuild"]
    big = BTLinear(64, 64, ranks=[2, 8, 8, 8, 8])
    assert big.use_dense_path(4096) and big.cost((4096, 64))["path"] == "rebuild"
    torch.manual_seed(0)
    conv = BTConv2d(12, 16, 3, padding=1, ranks=3).double()
    x = torch.randn(2, 12, 7, 7, dtype=torch.float64)
    grads = []
    for path in ("factorized", "dense"):
        conv.zero_grad()
        y = conv.contract(x) if path == "factorized" else F.conv2d(x, conv.weight, conv.bias, 1, 1)
        (y ** 2).sum().backward()
        grads.append([p.grad.clone() for p in conv.parameters()])
    for a, b in zip(*grads):
        _close(a, b, 1e-9)


def test_variance_matched_init():
    torch.manual_seed(0)
    v = torch.stack([BTLinear(256, 128, ranks=[3, 8, 8, 8, 8]).weight.detach().var() for _ in range(30)]).mean()
    assert abs(float(v) * 3 * 256 - 1) < 0.2
    v = torch.stack([BTConv2d(32, 32, 3, ranks=4).weight.detach().var() for _ in range(30)]).mean()
    assert abs(float(v) * 3 * 32 * 9 - 1) < 0.25


@pytest.mark.parametrize("make", [lambda: BTLinear(36, 20, ranks=[3, 2, 3, 4, 5], in_factors=[6, 6],
                                                   out_factors=[4, 5], bias=False),
                                  lambda: BTConv2d(12, 16, (3, 1), stride=(2, 1), padding="valid", ranks=3),
                                  lambda: BTLSTM(12, 16, num_layers=2, bidirectional=True, ranks=3),
                                  lambda: BTGRU(12, 16, ranks=2, compress_hidden=True)])
def test_spec_roundtrip_and_to_dense(make):
    layer = make()
    spec = json.loads(json.dumps(layer.spec()))
    again = layer_from_spec(spec)
    assert type(again) is type(layer) and again.spec() == spec
    again.load_state_dict(layer.state_dict())
    dense = layer.to_dense()
    assert type(dense) is layer.dense_type
    if isinstance(layer, (BTLSTM, BTGRU)):
        x = torch.randn(5, 2, 12)
        _close(again(x)[0], dense(x)[0], 1e-5)
    else:
        x = torch.randn(2, 36) if isinstance(layer, BTLinear) else torch.randn(2, 12, 8, 8)
        _close(again(x), dense(x), 1e-5)


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_recurrent_from_dense_full_rank_exact(rnn):
    torch.manual_seed(0)
    dense = rnn(12, 8, num_layers=2, bidirectional=True, batch_first=True).double()
    cls = tn_class_for(dense, "bt")
    assert cls is (BTLSTM if rnn is nn.LSTM else BTGRU)
    layer = cls.from_dense(dense, ranks=100, compress_hidden=True)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    _close(layer(x)[0], dense(x)[0], 1e-9)
    small = cls.from_dense(dense, compression_ratio=3)
    assert small.params() < sum(p.numel() for p in dense.parameters())


def test_config_and_layer_errors_name_the_choices():
    with pytest.raises(ValueError, match="format='bt', rel_error=.*ranks= or compression_ratio="):
        tn_hf.TNConfig(format="bt", rel_error=0.1)
    for opt in ("adaptive_reshape", "shared_core"):
        with pytest.raises(ValueError, match=f"{opt}=True needs format='tucker'"):
            tn_hf.TNConfig(format="bt", ranks=3, compression_ratio=None, **{opt: True})
    with pytest.raises(ValueError, match=r"BTLinear\(36->20\).*\[N, r_1..r_4\]"):
        BTLinear(36, 20, ranks=[2, 2, 2, 2], in_factors=[6, 6], out_factors=[4, 5])
    with pytest.raises(ValueError, match=r"BTLinear\(36->20\).*fitted at fixed ranks"):
        BTLinear.from_dense(nn.Linear(36, 20), rel_error=0.1)
    with pytest.raises(ValueError, match=r"kernel_mode 'in'; valid: \('own',\)"):
        BTConv2d(8, 8, 3, ranks=2, kernel_mode="in")
    with pytest.raises(ValueError, match="'bt'"):
        tn_hf.TNConfig(format="block", ranks=2)


# ----------------------------------------------------------------------------- compress / save / load / ADMM
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_compress_at_ratio_meets_budget_and_decompress(allocation):
    model = _net()
    x = torch.randn(2, 1, 16, 16)
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in ("conv2", "conv3", "fc1")}
    report = tn_hf.compress(model, tn_hf.TNConfig(format="bt", compression_ratio=6, min_params=1000,
                                                  allocation=allocation), progress=False)
    assert [r["name"] for r in report.rows] == ["conv2", "conv3", "fc1"]
    total = 0
    for row in report.rows:
        layer = model.get_submodule(row["name"])
        assert isinstance(layer, (BTConv2d, BTLinear)) and layer.format == "bt" and row["tn_type"].startswith("BT")
        total += sum(p.numel() for p in layer.cores)
        err = _rel(layer.weight.detach(), dense[row["name"]])
        assert row["rel_error"] == pytest.approx(err, rel=1e-4, abs=1e-6) and err < 1
    assert total <= sum(w.numel() for w in dense.values()) / 6
    with torch.no_grad():
        y = model(x)
    tn_hf.decompress(model)
    assert type(model.conv2) is nn.Conv2d
    _close(model(x), y, 1e-5)


def test_save_load_torch_and_timm_and_cli(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    model = _net()
    tn_hf.compress(model, tn_hf.TNConfig(format="bt", ranks=3, min_params=1000), progress=False)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        y = model(x)
    tn_hf.save_pretrained(model, tmp_path / "torch")
    assert "Block-Term" in (tmp_path / "torch" / "README.md").read_text()
    loaded = tn_hf.from_pretrained(tmp_path / "torch", model_class=Net)
    assert isinstance(loaded.conv2, BTConv2d) and loaded.conv2.spec() == model.conv2.spec()
    with torch.no_grad():
        _close(loaded(x), y, 1e-6)

    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()
    tn_hf.compress(net, tn_hf.TNConfig(format="bt", ranks=3, min_params=1000), progress=False)
    n_tn = sum(isinstance(m, TNLayer) for m in net.modules())
    xi = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        yi = net(xi)
    tn_hf.save_pretrained(net, tmp_path / "timm")
    again = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert sum(isinstance(m, TNLayer) for m in again.modules()) == n_tn > 0
    with torch.no_grad():
        _close(again(xi), yi, 1e-5)

    from tn_hf.cli import main
    torch.manual_seed(0)
    assert main(["compress", "test_resnet", "--random-init", "--format", "bt", "--ratio", "4", "--targets",
                 "layer3.0.conv2", "--out", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "cli")]) == 0
    assert "BTConv2d" in capsys.readouterr().out


def test_transformers_roundtrip_bt(tmp_path):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.MambaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2)
    model = T.MambaForCausalLM(cfg).eval()
    report = tn_hf.compress(model, tn_hf.TNConfig(format="bt", compression_ratio=4, min_params=1000),
                            progress=False)
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        y = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = T.MambaForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(isinstance(m, BTLinear) for m in loaded.modules()) == len(report.rows) > 0
    with torch.no_grad():
        _close(loaded(input_ids=ids).logits, y, 1e-5)


def test_admm_with_bt_format_trains_towards_the_ranks_and_compresses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    cfg = tn_hf.TNConfig(format="bt", compression_ratio=8, min_params=2000)
    sched = tn_hf.ADMMScheduler(model, cfg, rho=1e-2, update_every=2)
    ranks = sched.ranks["2"]
    assert ranks[0] == 2 and bt_params([8, 8, 8, 8], ranks) <= 64 * 64 / 8
    z = sched.Z["2"].reshape(8, 8, 8, 8)  # Z is a BT tensor at the planned ranks: fitted again almost exactly
    assert bt_decompose(z.double(), ranks=ranks, sweeps=30).rel_error < 1e-2
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    for i in range(8):
        loss = F.cross_entropy(model(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8])
        opt.zero_grad()
        loss.backward()
        sched.prox_grad_()
        opt.step()
        sched.step()
    assert sched.updates == 4 and float(sched.U["2"].abs().sum()) > 0
    report = sched.compress()
    assert isinstance(model[2], BTLinear) and model[2].ranks == ranks and report.rows[0]["tn_type"] == "BTLinear"


def test_bt_warm_start_never_worse_than_its_init_and_checks_shapes():
    from tn_hf.decompositions import bt_decompose, bt_to_full, fit, to_full
    torch.manual_seed(5)
    x = torch.randn(6, 7, 8, dtype=torch.float64)
    cold = bt_decompose(x, ranks=[2, 3, 3, 3])
    near = x + 0.05 * torch.randn_like(x)
    warm = fit(near, [2, 3, 3, 3], "bt", init=[cold.core, *cold.factors])
    start = float((bt_to_full(cold.core, cold.factors) - near).norm())
    assert float((to_full(warm, "bt") - near).norm()) <= start + 1e-12
    # a BT tensor refitted from its own cores stays put
    again = fit(bt_to_full(cold.core, cold.factors), [2, 3, 3, 3], "bt", init=[cold.core, *cold.factors])
    full = bt_to_full(cold.core, cold.factors)
    assert float((to_full(again, "bt") - full).norm() / full.norm()) < 1e-9
    with pytest.raises(ValueError, match=r"bt_decompose: init shapes .* do not match the ranks"):
        bt_decompose(x, ranks=[2, 3, 3, 3], init=[cold.core, *cold.factors[:2], cold.factors[2][:, :, :2]])
