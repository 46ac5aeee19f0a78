"""Tucker format: ST-HOSVD, projection, layers (both forward paths), compress, save/load, ADA, SCADA."""
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tn_hf
from tn_hf.decompositions import (
    project,
    tucker_params,
    tucker_project,
    tucker_ranks,
    tucker_ranks_for_ratio,
    tucker_svd,
    tucker_to_full,
)
from tn_hf.layers import (
    TuckerConv1d,
    TuckerConv2d,
    TuckerConv3d,
    TuckerGRU,
    TuckerLinear,
    TuckerLSTM,
    layer_from_spec,
    tn_class_for,
)
from tn_hf.layers.base import TNLayer


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _random_tucker(shape, ranks, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(*ranks, generator=g, dtype=dtype)
    return tucker_to_full(core, [torch.randn(n, r, generator=g, dtype=dtype) for n, r in zip(shape, ranks)])


# ----------------------------------------------------------------------------- decompositions
def test_st_hosvd_exact_at_true_ranks_and_orthonormal_factors():
    x = _random_tucker((8, 9, 10), (3, 4, 5))
    core, factors = tucker_svd(x, ranks=[3, 4, 5])
    assert core.shape == (3, 4, 5) and [tuple(u.shape) for u in factors] == [(8, 3), (9, 4), (10, 5)]
    _close(tucker_to_full(core, factors), x, 1e-9)
    for u in factors:
        _close(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), 1e-10)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5])
def test_st_hosvd_error_bound_and_rank_shrinks(eps):
    x = torch.randn(12, 10, 14, dtype=torch.float64) + 3 * _random_tucker((12, 10, 14), (2, 2, 2), seed=1)
    core, factors = tucker_svd(x, rel_error=eps)
    err = float((tucker_to_full(core, factors) - x).norm() / x.norm())
    assert err <= eps + 1e-9
    if eps >= 0.2:
        assert tucker_params(x.shape, list(core.shape)) < x.numel()


def test_max_rank_caps_and_projection_idempotent_and_best_matrix_case():
    x = torch.randn(6, 7, 8, dtype=torch.float64)
    core, _ = tucker_svd(x, max_rank=4)
    assert max(core.shape) <= 4
    p = tucker_project(x, [3, 4, 5])
    _close(tucker_project(p, [3, 4, 5]), p, 1e-9)
    assert float((x - p).norm()) < float(x.norm())
    # order 2: Tucker projection = truncated SVD (Eckart-Young)
    m = torch.randn(20, 15, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    _close(tucker_project(m, [4, 4]), (u[:, :4] * s[:4]) @ vh[:4], 1e-9)


def test_project_dispatch_matches_each_format():
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    from tn_hf.decompositions import tr_project, tt_project
    _close(project(x, [2, 3, 2], "tucker"), tucker_project(x, [2, 3, 2]))
    _close(project(x, [1, 2, 2, 1], "tt"), tt_project(x, [1, 2, 2, 1]))
    _close(project(x, [2, 2, 2, 2], "tr"), tr_project(x, [2, 2, 2, 2]))
    with pytest.raises(ValueError, match="valid"):
        project(x, 2, "cp")


def test_rank_normalisation_and_errors():
    assert tucker_ranks([4, 5, 100], 10) == [4, 5, 10]
    assert tucker_ranks([3, 50], 10) == [3, 3]  # r_k <= product of the other ranks
    with pytest.raises(ValueError, match="not attainable"):
        tucker_ranks([4, 5, 6], [5, 2, 2])
    with pytest.raises(ValueError, match="3 ints"):
        tucker_ranks([4, 5, 6], [2, 2])
    with pytest.raises(ValueError, match="exactly one"):
        tucker_svd(torch.randn(3, 4), ranks=2, rel_error=0.1)


@pytest.mark.parametrize("data", [False, True])
def test_ranks_for_ratio_meet_budget(data):
    shape = (16, 12, 9, 20)
    t = torch.randn(shape) if data else None
    for ratio in (5, 40, 300):
        r = tucker_ranks_for_ratio(shape, ratio, t)
        assert tucker_ranks(shape, r) == r
        assert tucker_params(shape, r) <= math.prod(shape) / ratio or r == [1] * 4


def test_global_allocation_gives_small_tensors_rank():
    from tn_hf.decompositions import tucker_allocate
    torch.manual_seed(0)
    big, small = torch.randn(30, 40, 50), _random_tucker((10, 10), (6, 6), dtype=torch.float32)
    r = tucker_allocate({"big": big, "small": small}, ratio=20)
    assert tucker_params(big.shape, r["big"]) + tucker_params(small.shape, r["small"]) <= (big.numel() + 100) / 20
    assert r["small"] == [6, 6]  # its whole energy for a few params, though 100 / 20 = 5 would be its share
    with pytest.raises(ValueError, match="ratio"):
        tucker_allocate({"x": big}, 0)


def test_ranks_for_ratio_follows_the_spectrum():
    # multilinear ranks (4, 2, 2): the greedy gives mode 0 its 4 and the rest to modes 1, 2
    x = _random_tucker((40, 6, 6), (4, 2, 2), dtype=torch.float32)
    r = tucker_ranks_for_ratio(x.shape, 6, x)
    assert r[0] == 4 and r[1] >= 2 and r[2] >= 2 and tucker_params(x.shape, r) <= x.numel() / 6
    assert float((tucker_project(x, r) - x).norm() / x.norm()) < 1e-5


# ----------------------------------------------------------------------------- layers
def _conv(dim, **kw):
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    return cls(12, 16, 3, **kw).double()


def _input(dim, b=2):
    return torch.randn(b, 12, *([7] * dim), dtype=torch.float64)


@pytest.mark.parametrize("ranks", [3, [4, 5, 3, 6]])
def test_linear_both_paths_equal_float64(ranks):
    torch.manual_seed(0)
    lin = nn.Linear(36, 20).double()
    layer = TuckerLinear.from_dense(lin, ranks=ranks, in_factors=[6, 6], out_factors=[4, 5])
    x = torch.randn(3, 5, 36, dtype=torch.float64)
    dense = F.linear(x, layer.weight, layer.bias)
    _close(layer.contract(x), dense)
    _close(layer(x), dense)
    full = TuckerLinear.from_dense(lin, ranks=[4, 5, 6, 6], in_factors=[6, 6], out_factors=[4, 5])
    _close(full(x), lin(x))  # full ranks: exact


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("kw", [dict(stride=2, padding=1), dict(padding="same", padding_mode="reflect", dilation=2)])
def test_conv_both_paths_equal_float64(dim, kw):
    torch.manual_seed(dim)
    conv = _conv(dim, **kw)
    cls = tn_class_for(conv, "tucker")
    assert cls is {1: TuckerConv1d, 2: TuckerConv2d, 3: TuckerConv3d}[dim]
    layer = cls.from_dense(conv, ranks=3)
    x = _input(dim)
    ref = cls._from_spec(layer.spec()).double()
    ref.load_state_dict(layer.state_dict())
    dense_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]
    y_dense = dense_fn(layer._pad_input(x), layer.weight, layer.bias, layer.stride, layer._conv_padding,
                       layer.dilation)
    _close(layer.contract(x), y_dense)
    _close(layer(x), y_dense)
    full = cls.from_dense(conv, ranks=100)
    _close(full(x), conv(x), 1e-9)  # full multilinear ranks reproduce the dense conv


def test_forward_path_choice_follows_flops():
    layer = TuckerLinear(1024, 1024, ranks=4)
    assert not layer.use_dense_path(64)  # tiny core: factorized
    cost = layer.cost((64, 1024))
    assert cost["path"] == "contract" and cost["contract"] < cost["rebuild"]
    assert layer.flops((64, 1024)) == cost["contract"] and cost["dense"] == 2 * 64 * 1024 * 1024
    big = TuckerLinear(64, 64, ranks=[8, 8, 8, 8])  # full ranks: rebuilding is cheaper for a big batch
    assert big.use_dense_path(4096) and big.cost((4096, 64))["path"] == "rebuild"


def test_gradients_match_dense_weight_path():
    torch.manual_seed(0)
    layer = TuckerConv2d(12, 16, 3, padding=1, ranks=3).double()
    x = _input(2)
    grads = []
    for path in ("factorized", "dense"):
        layer.zero_grad()
        y = layer.contract(x) if path == "factorized" else F.conv2d(x, layer.weight, layer.bias, 1, 1)
        (y ** 2).sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        _close(a, b, 1e-9)
    lin = TuckerLinear(12, 10, ranks=2, in_factors=[3, 4], out_factors=[2, 5]).double()
    assert torch.autograd.gradcheck(lambda x: lin.contract(x), torch.randn(2, 12, dtype=torch.float64,
                                                                           requires_grad=True))


def test_variance_matched_init():
    torch.manual_seed(0)
    v = torch.stack([TuckerLinear(256, 128, ranks=8).weight.detach().var() for _ in range(30)]).mean()
    assert abs(float(v) * 3 * 256 - 1) < 0.2
    v = torch.stack([TuckerConv2d(32, 32, 3, ranks=4).weight.detach().var() for _ in range(30)]).mean()
    assert abs(float(v) * 3 * 32 * 9 - 1) < 0.25


@pytest.mark.parametrize("make", [lambda: TuckerLinear(36, 20, ranks=[2, 3, 4, 5], in_factors=[6, 6],
                                                       out_factors=[4, 5], bias=False),
                                  lambda: TuckerConv2d(12, 16, (3, 1), stride=(2, 1), padding="valid", ranks=3),
                                  lambda: TuckerLSTM(12, 16, num_layers=2, bidirectional=True, ranks=3),
                                  lambda: TuckerGRU(12, 16, ranks=2, compress_hidden=True)])
def test_spec_roundtrip_exact_shapes_and_to_dense(make):
    import json
    layer = make()
    spec = json.loads(json.dumps(layer.spec()))
    again = layer_from_spec(spec)
    assert type(again) is type(layer) and again.spec() == spec
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}
    again.load_state_dict(layer.state_dict())
    dense = layer.to_dense()
    assert type(dense) is layer.dense_type
    if isinstance(layer, (TuckerLSTM, TuckerGRU)):
        x = torch.randn(5, 2, 12)
        _close(layer(x)[0], dense(x)[0], 1e-5)
        _close(again(x)[0], dense(x)[0], 1e-5)
    else:
        x = torch.randn(2, 36) if isinstance(layer, TuckerLinear) else torch.randn(2, 12, 8, 8)
        _close(layer(x), dense(x), 1e-5)
        _close(layer.weight, dense.weight, 1e-6)


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_recurrent_from_dense_full_rank_exact(rnn):
    torch.manual_seed(0)
    dense = rnn(12, 8, num_layers=2, bidirectional=True, batch_first=True).double()
    cls = tn_class_for(dense, "tucker")
    layer = cls.from_dense(dense, ranks=100, compress_hidden=True)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    _close(layer(x)[0], dense(x)[0], 1e-9)
    small = cls.from_dense(dense, compression_ratio=3)
    assert small.params() < sum(p.numel() for p in dense.parameters())


def test_bad_input_errors_name_module_and_choices():
    with pytest.raises(ValueError, match=r"TuckerLinear\(36->20\).*in_factors"):
        TuckerLinear(36, 20, ranks=2, in_factors=[5, 7])
    with pytest.raises(ValueError, match=r"TuckerLinear\(36->20\).*not attainable"):
        TuckerLinear(36, 20, ranks=[9, 1, 1, 1], in_factors=[6, 6], out_factors=[4, 5])
    with pytest.raises(ValueError, match="ranks are required"):
        TuckerLinear(36, 20, ranks=None)
    with pytest.raises(ValueError, match="input last dim"):
        TuckerLinear(36, 20, ranks=2)(torch.randn(2, 35))
    with pytest.raises(ValueError, match="valid choices"):
        tn_hf.TNConfig(format="cp", ranks=2)
    with pytest.raises(ValueError, match="format='tucker'"):
        tn_hf.TNConfig(format="tt", compression_ratio=4, adaptive_reshape=True)
    with pytest.raises(ValueError, match="compression_ratio"):
        tn_hf.TNConfig(format="tucker", ranks=4, adaptive_reshape=True)


# ----------------------------------------------------------------------------- compress / save / load
class Net(nn.Sequential):
    """A small MNIST CNN: three convs (pooled to 4x4) and two linears."""

    def __init__(self):
        super().__init__(OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1), act1=nn.ReLU(), pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(16, 32, 3, padding=1), act2=nn.ReLU(), pool2=nn.MaxPool2d(2),
            conv3=nn.Conv2d(32, 32, 3, padding=1), act3=nn.ReLU(), pool3=nn.AdaptiveAvgPool2d(4),
            flat=nn.Flatten(), fc1=nn.Linear(32 * 4 * 4, 64), act4=nn.ReLU(), fc2=nn.Linear(64, 10)))


def _net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_compress_at_ratio_meets_budget(allocation):
    model = _net()
    x = torch.randn(2, 1, 16, 16)
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in ("conv2", "conv3", "fc1")}
    report = tn_hf.compress(model, tn_hf.TNConfig(format="tucker", compression_ratio=6, min_params=1000,
                                                  allocation=allocation), progress=False)
    assert [r["name"] for r in report.rows] == ["conv2", "conv3", "fc1"]
    total = 0
    for row in report.rows:
        layer = model.get_submodule(row["name"])
        assert isinstance(layer, (TuckerConv2d, TuckerLinear)) and layer.format == "tucker"
        weight_params = sum(p.numel() for p in layer.cores)
        total += weight_params
        if allocation == "uniform":
            assert weight_params <= dense[row["name"]].numel() / 6
        err = float((layer.weight.detach() - dense[row["name"]]).norm() / dense[row["name"]].norm())
        assert row["rel_error"] == pytest.approx(err, rel=1e-4, abs=1e-6)
    assert 0.8 * sum(w.numel() for w in dense.values()) / 6 <= total <= sum(w.numel() for w in dense.values()) / 6
    assert model(x).shape == (2, 10)
    assert model.tn_hf_config["format"] == "tucker"
    with torch.no_grad():
        y = model(x)
    tn_hf.decompress(model)
    assert type(model.conv2) is nn.Conv2d
    _close(model(x), y, 1e-5)


def test_compress_rel_error_and_int_ranks():
    model = _net()
    tn_hf.compress(model, tn_hf.TNConfig(format="tucker", rel_error=0.3, min_params=1000), progress=False)
    assert isinstance(model.fc1, TuckerLinear)
    model = _net()
    tn_hf.compress(model, tn_hf.TNConfig(format="tucker", ranks=3, min_params=1000), progress=False)
    assert model.conv3.ranks == [3, 3, 3, 3, 3] and model.tn_hf_specs["conv3"]["ranks"] == [3, 3, 3, 3, 3]


def test_save_load_tn_hf_and_timm_local_dir(tmp_path):
    timm = pytest.importorskip("timm")
    model = _net()
    tn_hf.compress(model, tn_hf.TNConfig(format="tucker", compression_ratio=4, min_params=1000), progress=False)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        y = model(x)
    tn_hf.save_pretrained(model, tmp_path / "torch")
    assert "Tucker" in (tmp_path / "torch" / "README.md").read_text()
    loaded = tn_hf.from_pretrained(tmp_path / "torch", model_class=Net)
    assert isinstance(loaded.conv2, TuckerConv2d) and loaded.conv2.spec() == model.conv2.spec()
    with torch.no_grad():
        _close(loaded(x), y, 1e-6)

    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()
    tn_hf.compress(net, tn_hf.TNConfig(format="tucker", ranks=4, min_params=1000), progress=False)
    n_tn = sum(isinstance(m, TNLayer) for m in net.modules())
    xi = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        yi = net(xi)
    tn_hf.save_pretrained(net, tmp_path / "timm")
    again = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert sum(isinstance(m, TNLayer) for m in again.modules()) == n_tn > 0
    with torch.no_grad():
        _close(again(xi), yi, 1e-5)


def test_cli_compress_tucker_and_inspect(tmp_path, capsys):
    from tn_hf.cli import main
    out = tmp_path / "cli"
    torch.manual_seed(0)
    assert main(["compress", "test_resnet", "--random-init", "--format", "tucker", "--ratio", "4", "--targets",
                 "layer3.0.conv2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "TuckerConv2d" in capsys.readouterr().out


def test_transformers_roundtrip_tucker(tmp_path):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.MambaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2)
    model = T.MambaForCausalLM(cfg).eval()
    report = tn_hf.compress(model, tn_hf.TNConfig(format="tucker", ranks=4, min_params=1000), progress=False)
    assert report.rows
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        y = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = T.MambaForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(isinstance(m, TNLayer) for m in loaded.modules()) == len(report.rows)
    with torch.no_grad():
        _close(loaded(input_ids=ids).logits, y, 1e-5)


# ----------------------------------------------------------------------------- ADA-Tucker / SCADA-Tucker
def test_ada_reshape_finds_the_compressible_reshaping():
    from tn_hf.layers.tucker import ada_reshape
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    # a weight that is Tucker rank (2, 2, 2, 2) as an 8x8x8x8 tensor (rank 4 as a 64x64 matrix)
    with torch.no_grad():
        lin.weight.copy_(_random_tucker((8, 8, 8, 8), (2, 2, 2, 2), dtype=torch.float32).reshape(64, 64))
    spec, cands = ada_reshape(TuckerLinear, lin, compression_ratio=40)
    assert (spec["out_factors"], spec["in_factors"]) == ([8, 8], [8, 8])
    best = min(c["rel_error"] for c in cands)
    assert best < 1e-4 and max(c["rel_error"] for c in cands) > 0.1
    assert all(c["params"] <= 64 * 64 / 40 or c["ranks"] == [1] * len(c["ranks"]) for c in cands)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(64, 2))
    tn_hf.compress(model, tn_hf.TNConfig(format="tucker", compression_ratio=40, adaptive_reshape=True,
                                         min_params=100), progress=False)
    assert model[0].spec()["in_factors"] == [8, 8]
    _close(model[0].weight, lin.weight, 1e-4)


def test_share_core_fits_layers_that_share_a_core():
    from tn_hf.layers.tucker import share_core
    torch.manual_seed(0)
    model = nn.Sequential(TuckerLinear(36, 20, ranks=3, in_factors=[6, 6], out_factors=[4, 5]),
                          TuckerLinear(36, 20, ranks=3, in_factors=[6, 6], out_factors=[4, 5])).double()
    q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64)).Q
    with torch.no_grad():  # same core up to a rotation of mode 0: a shared core represents both exactly
        model[1].cores[0].copy_(torch.einsum("ab,bcde->acde", q, model[0].cores[0]))
    before = [m.weight.detach().clone() for m in model]
    shared = share_core(model)
    assert model[0].cores[0] is model[1].cores[0] is shared
    assert sum(p.numel() for p in model.parameters()) == 81 + 2 * (4 + 5 + 6 + 6) * 3 + 40
    for m, w in zip(model, before):
        _close(m.weight, w, 1e-6)
    with pytest.raises(ValueError, match="different core shapes"):
        share_core(nn.Sequential(TuckerLinear(36, 20, ranks=2), TuckerLinear(36, 20, ranks=3)))


def test_shared_core_compress_train_save_load(tmp_path):
    model = _net()
    tn_hf.compress(model, tn_hf.TNConfig(format="tucker", ranks=3, shared_core=True,
                                         target_modules=["conv2", "conv3", "fc1"]), progress=False)
    leaves = [model.conv2, model.conv3, model.fc1]
    assert len({id(m.cores[0]) for m in leaves}) == 1 and all(m.spec()["shared_core"] for m in leaves)
    x = torch.randn(2, 1, 16, 16)
    model.train()
    model(x).sum().backward()  # one core, gradients from every layer
    assert model.conv2.cores[0].grad is not None
    model.eval()
    with torch.no_grad():
        y = model(x)
    tn_hf.save_pretrained(model, tmp_path)
    loaded = tn_hf.from_pretrained(tmp_path, model_class=Net)
    assert len({id(m.cores[0]) for m in (loaded.conv2, loaded.conv3, loaded.fc1)}) == 1
    with torch.no_grad():
        _close(loaded(x), y, 1e-6)
    with pytest.raises(ValueError, match="shared core of rank 9"):
        tn_hf.compress(_net(), tn_hf.TNConfig(format="tucker", ranks=9, shared_core=True,
                                              target_modules=["conv2"]), progress=False)


# ----------------------------------------------------------------------------- ADMM through project()
def test_admm_with_tucker_format():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    cfg = tn_hf.TNConfig(format="tucker", compression_ratio=8, min_params=2000)
    sched = tn_hf.ADMMScheduler(model, cfg, rho=1e-2, update_every=2)
    ranks = sched.ranks["2"]
    assert len(ranks) == 4 and tucker_params([8, 8, 8, 8], ranks) <= 64 * 64 / 8
    z = sched.Z["2"].reshape(8, 8, 8, 8)
    _close(tucker_project(z, ranks), z, 1e-4)  # Z is a Tucker tensor at the planned ranks
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
    # the final decomposition at the same ranks (pinned) reproduces Z's structure
    tn_hf.compress(model, tn_hf.TNConfig(format="tucker", ranks={"2": ranks}), progress=False)
    assert model[2].ranks == ranks


def test_tucker_conv_keeps_its_kernel_mode():
    from tn_hf.layers import TuckerConv2d
    with pytest.raises(ValueError, match="kernel_mode 'in'; valid: \\('own',\\)"):
        TuckerConv2d(8, 8, 3, ranks=2, kernel_mode="in")
    m = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3))
    tn_hf.compress(m, tn_hf.TNConfig(format="tucker", ranks=4, skip_stem=False), progress=False)
    assert type(m[1]).__name__ == "TuckerConv2d" and m[1].kernel_mode == "own"
