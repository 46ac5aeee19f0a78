import json

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from tn_hf.layers import (
    TRGRU,
    TRLSTM,
    TTGRU,
    TTLSTM,
    TNLayer,
    TRConv1d,
    TRConv2d,
    TRConv3d,
    TRLinear,
    TTConv1d,
    TTConv2d,
    TTConv3d,
    TTLinear,
    layer_from_spec,
    registry,
    tn_class_for,
    tn_targets,
)

LINEAR = [TTLinear, TRLinear]
CONV = [TTConv1d, TTConv2d, TTConv3d, TRConv1d, TRConv2d, TRConv3d]
RNN = [TTLSTM, TRLSTM, TTGRU, TRGRU]
D = torch.float64


def small(cls, ranks=3, **kw):
    """A tiny layer of class cls plus a matching input (float64)."""
    if cls in LINEAR:
        m = cls(12, 20, ranks=ranks, in_factors=(3, 4), out_factors=(4, 5), **kw)
        x = torch.randn(5, 12, dtype=D)
    elif cls in CONV:
        m = cls(6, 8, 3, padding=1, ranks=ranks, in_factors=(2, 3), out_factors=(2, 4), **kw)
        x = torch.randn(2, 6, *([5] * cls.dim), dtype=D)
    else:
        m = cls(6, 4, ranks=ranks, n_modes=2, **kw)
        x = torch.randn(4, 2, 6, dtype=D)
    return m.to(D), x


def dense_of(cls, bias=True):
    if cls in LINEAR:
        return nn.Linear(12, 20, bias=bias).to(D)
    if cls in CONV:
        return cls.dense_type(6, 8, 3, padding=1, bias=bias).to(D)
    return cls.dense_type(6, 4, num_layers=2, bidirectional=True).to(D)


def both_paths(m, x):
    if isinstance(m, (TTLinear, TRLinear)):
        return torch.nn.functional.linear(x, m.weight, m.bias), m.contract(x)
    return m.to_dense()(x), m.contract(x)


@pytest.mark.parametrize("cls", LINEAR + CONV, ids=lambda c: c.__name__)
def test_paths_equal_and_forward(cls):
    torch.manual_seed(0)
    m, x = small(cls)
    y_dense, y_tn = both_paths(m, x)
    torch.testing.assert_close(y_dense, y_tn, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m(x), y_dense, rtol=1e-10, atol=1e-12)
    if cls in LINEAR:  # both sweep directions of the core contraction
        torch.testing.assert_close(m.contract(x, reverse=True), y_dense, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m.contract(x, reverse=False), y_dense, rtol=1e-10, atol=1e-12)


def test_path_choice_follows_flops():
    m = TTLinear(768, 3072, ranks=16, in_factors=(8, 8, 12), out_factors=(16, 16, 12))
    assert not m.use_dense_path(1)          # one token: contracting the cores is cheaper
    assert m.use_dense_path(100000)         # many tokens: rebuild once + one GEMM
    c = TTConv2d(256, 256, 3, padding=1, ranks=[1, 16, 64, 64, 16, 1])
    assert not c.use_dense_path((32, 256, 14, 14))
    assert c.flops((32, 256, 14, 14)) < c.dense_flops((32, 256, 14, 14)) / 3
    one, many = m.cost((1, 768)), m.cost((100000, 768))
    assert one["path"] == "contract" and one["contract"] < one["rebuild"] and m.flops((1, 768)) == one["contract"]
    assert many["path"] == "rebuild" and many["rebuild"] < 2.0 * many["contract"]
    assert many["dense"] == m.dense_flops((100000, 768)) == 2 * 100000 * 768 * 3072
    cc = c.cost((32, 256, 14, 14))
    assert cc["path"] == "contract" and cc["contract"] == c.flops((32, 256, 14, 14)) < cc["rebuild"]


def test_cost_of_composite_sums_leaves_and_contract_is_enforced():
    torch.manual_seed(0)
    m = TTLSTM.from_dense(nn.LSTM(6, 4, num_layers=2, bidirectional=True), ranks=2)
    cost = m.cost((5, 3, 6))
    assert set(cost["path"]) == {n for n, _ in tn_targets(m)}
    hh = 2 * 15 * 16 * 4 * 2 * 2  # dense hidden-to-hidden matmuls, 2 layers x 2 directions
    assert cost["contract"] == hh + sum(leaf.cost((15, leaf.in_features))["contract"] for _, leaf in tn_targets(m))
    assert cost["dense"] == m.dense_flops((5, 3, 6))

    class Half(TNLayer):
        pass
    with pytest.raises(NotImplementedError, match="Half must implement tensorize"):
        Half.tensorize(torch.zeros(2, 2), {})
    with pytest.raises(NotImplementedError, match="Half must implement _path_flops"):
        Half().cost((1, 2))
    registry.pop("Half")


@pytest.mark.parametrize("cls", LINEAR + CONV, ids=lambda c: c.__name__)
def test_init_variance(cls):
    torch.manual_seed(0)
    if cls in LINEAR:
        ms = [cls(256, 256, ranks=8, in_factors=(4, 8, 8), out_factors=(8, 4, 8)) for _ in range(8)]
        target = 1 / (3 * 256)
    else:
        ms = [cls(64, 64, 3, ranks=8, in_factors=(8, 8), out_factors=(8, 8)) for _ in range(8)]
        target = 1 / (3 * 64 * 3 ** cls.dim)
    var = torch.stack([m.weight.detach().var() for m in ms]).mean().item()
    assert 0.75 < var / target < 1.33, (var, target)


def test_rnn_init_variance():
    torch.manual_seed(0)
    var = torch.stack([TTLSTM(64, 32, ranks=8).weight_ih_l0.detach().var() for _ in range(8)]).mean().item()
    assert 0.75 < var / (1 / (3 * 32)) < 1.33


@pytest.mark.parametrize("cls", LINEAR + CONV, ids=lambda c: c.__name__)
def test_from_dense_full_rank_round_trip(cls):
    torch.manual_seed(0)
    dense = dense_of(cls)
    kw = dict(in_factors=(3, 4), out_factors=(4, 5)) if cls in LINEAR else dict(in_factors=(2, 3),
                                                                                 out_factors=(2, 4))
    m = cls.from_dense(dense, rel_error=1e-12, **kw)
    back = m.to_dense()
    assert type(back) is type(dense)
    torch.testing.assert_close(back.weight, dense.weight, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(back.bias, dense.bias)
    _, x = small(cls)
    torch.testing.assert_close(m(x), dense(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cls", [TTLinear, TRConv2d], ids=lambda c: c.__name__)
def test_compression_ratio(cls):
    torch.manual_seed(0)
    dense = nn.Linear(256, 512) if cls is TTLinear else nn.Conv2d(64, 64, 3)
    m = cls.from_dense(dense, compression_ratio=4)
    n_cores = sum(c.numel() for c in m.cores)
    assert dense.weight.numel() / 8 < n_cores <= dense.weight.numel() / 4
    assert "x smaller" in repr(m)


@pytest.mark.parametrize("cls", LINEAR + CONV, ids=lambda c: c.__name__)
def test_gradcheck_both_paths(cls):
    torch.manual_seed(0)
    if cls in LINEAR:
        m = cls(6, 4, ranks=2, in_factors=(2, 3), out_factors=(2, 2)).to(D)
        x = torch.randn(2, 6, dtype=D)
    else:
        k = 3 if cls.dim < 3 else 2  # keep the 3-d case cheap
        m = cls(4, 4, k, padding=1, ranks=2, in_factors=(2, 2), out_factors=(2, 2)).to(D)
        x = torch.randn(1, 4, *([k] * cls.dim), dtype=D)
    x.requires_grad_(True)
    params = (*m.cores, m.bias)
    for dense_path in (True, False):
        assert torch.autograd.gradcheck(lambda x, *ps, dense_path=dense_path: _call(m, x, ps, dense_path),
                                        (x, *params))


def _call(m, x, ps, dense_path):
    """m(x) with the given core/bias tensors and the forward path forced."""
    old = m.use_dense_path
    m.use_dense_path = lambda *_: dense_path
    try:
        state = {**{f"cores.{i}": p for i, p in enumerate(ps[:-1])}, "bias": ps[-1]}
        return torch.func.functional_call(m, state, (x,))
    finally:
        del m.use_dense_path
        assert m.use_dense_path == old


@pytest.mark.parametrize("cls", LINEAR + CONV + RNN, ids=lambda c: c.__name__)
def test_spec_round_trip(cls):
    torch.manual_seed(0)
    m, x = small(cls)
    spec = json.loads(json.dumps(m.spec()))
    assert spec["class"] == cls.__name__ and registry[cls.__name__] is cls
    m2 = layer_from_spec(spec).to(D)
    m2.load_state_dict(m.state_dict())
    assert cls.from_spec(spec).spec() == spec
    y1, y2 = m(x), m2(x)
    y1, y2 = (y1[0], y2[0]) if cls in RNN else (y1, y2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


@pytest.mark.parametrize("cls", RNN, ids=lambda c: c.__name__)
def test_rnn_matches_torch(cls):
    torch.manual_seed(0)
    dense = dense_of(cls)
    m = cls.from_dense(dense, rel_error=1e-12)
    names = sorted(dense.state_dict())
    assert names == sorted(n for n, _ in dense.named_parameters())
    for n in names:  # torch's names are readable on the TN layer
        torch.testing.assert_close(getattr(m, n), getattr(dense, n), rtol=1e-9, atol=1e-10)
    x = torch.randn(5, 3, 6, dtype=D)
    h0 = torch.randn(4, 3, 4, dtype=D)
    hx = (h0, torch.randn_like(h0)) if cls.mode == "LSTM" else h0
    packed = pack_padded_sequence(x, torch.tensor([3, 5, 2]), enforce_sorted=False)
    for inp in (x, packed):
        (y1, h1), (y2, h2) = m(inp, hx), dense(inp, hx)
        if isinstance(y1, torch.Tensor):
            torch.testing.assert_close(y1, y2, rtol=1e-9, atol=1e-10)
        else:
            torch.testing.assert_close(y1.data, y2.data, rtol=1e-9, atol=1e-10)
            assert torch.equal(y1.batch_sizes, y2.batch_sizes)
        torch.testing.assert_close(h1, h2, rtol=1e-9, atol=1e-10)
    back = m.to_dense()
    torch.testing.assert_close(back(x, hx)[0], dense(x, hx)[0], rtol=1e-9, atol=1e-10)
    assert [n for n, _ in tn_targets(m)] == ["ih_l0", "ih_l0_reverse", "ih_l1", "ih_l1_reverse"]
    assert set(cls.weight_specs(m.spec())) == set(cls.dense_weights(dense))


@pytest.mark.parametrize("cls", RNN, ids=lambda c: c.__name__)
def test_rnn_options_match_to_dense(cls):
    torch.manual_seed(0)
    m = cls(6, 4, num_layers=2, batch_first=True, ranks=2, n_modes=2, compress_hidden=True).to(D)
    d = m.to_dense()
    x = torch.randn(3, 5, 6, dtype=D)
    torch.testing.assert_close(m(x)[0], d(x)[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m(x[0])[0], d(x[0])[0], rtol=1e-10, atol=1e-12)  # unbatched
    assert len(list(tn_targets(m))) == 4


def test_rnn_gradcheck():
    torch.manual_seed(0)
    m = TRGRU(4, 2, ranks=2, n_modes=2).to(D)
    x = torch.randn(3, 1, 4, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x)[0], (x,))


def test_tn_class_for_and_errors():
    assert tn_class_for(nn.Linear(4, 4), "tt") is TTLinear
    assert tn_class_for(nn.Conv3d(4, 4, 3), "tr") is TRConv3d
    assert tn_class_for(nn.GRU(4, 4), "tr") is TRGRU
    with pytest.raises(ValueError, match="groups=2"):
        tn_class_for(nn.Conv2d(4, 4, 3, groups=2), "tt")
    with pytest.raises(ValueError, match="supported types.*Linear"):
        tn_class_for(nn.BatchNorm2d(4), "tt")
    with pytest.raises(ValueError, match="valid"):
        tn_class_for(nn.Linear(4, 4), "tucker3")
    with pytest.raises(ValueError, match="known.*TTLinear"):
        layer_from_spec({"class": "Nope"})
    with pytest.raises(ValueError, match=r"TTLinear\(12->20\).*product is 12"):
        TTLinear(12, 20, ranks=2, in_factors=(3, 5), out_factors=(4, 5))
    with pytest.raises(ValueError, match=r"TTLinear\(12->20\).*length 3"):
        TTLinear(12, 20, ranks=[1, 2], in_factors=(3, 4), out_factors=(4, 5))
    with pytest.raises(ValueError, match="exceeds"):
        TTLinear(12, 20, ranks=[1, 99, 1], in_factors=(3, 4), out_factors=(4, 5))
    with pytest.raises(ValueError, match="TRLinear.*ring rank"):
        TRLinear(12, 20, ranks=[2, 3, 4], in_factors=(3, 4), out_factors=(4, 5))
    with pytest.raises(ValueError, match="TTConv2d.*groups=2.*groups=1"):
        TTConv2d(4, 4, 3, groups=2, ranks=2)
    with pytest.raises(ValueError, match="expected Conv2d"):
        TTConv2d.dense_spec(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="proj_size"):
        TTLSTM.from_dense(nn.LSTM(4, 4, proj_size=2), ranks=2)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = nn.Sequential(TTConv2d(4, 8, 3, padding=1, ranks=3, in_factors=(2, 2), out_factors=(2, 4)),
                          nn.ReLU(), nn.Flatten(), TRLinear(8 * 16, 10, ranks=3, in_factors=(8, 16),
                                                            out_factors=(2, 5)))
    x = torch.randn(2, 4, 4, 4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, model(x))
    y.sum().backward()
    assert all(c.grad is not None for c in model[0].cores)


def test_every_public_layer_documents_its_arguments():
    import inspect
    assert len(registry) == 28  # TT/TR/Tucker/BT x (Linear, Conv1d/2d/3d, LSTM, GRU), and each format's Conv1D (GPT-2)
    for name, cls in registry.items():
        doc = inspect.getdoc(cls)
        assert doc.splitlines()[0] and "Args:" in doc, name
        args = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        assert all(a in doc for a in args), (name, [a for a in args if a not in doc])


@pytest.mark.parametrize("cls", CONV, ids=lambda c: c.__name__)
def test_kernel_mode_in_is_exact_and_two_steps(cls):
    """kernel_mode="in": modes (O, K*I), two cores, run as one kxk conv I -> r then a 1x1 conv; the
    full-rank decomposition reproduces the dense conv (strided, padded, reflect-padded)."""
    torch.manual_seed(0)
    for kw in (dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=3, padding=1, padding_mode="reflect")):
        dense = cls.dense_type(6, 8, **kw).to(D)
        m = cls.from_dense(dense, rel_error=1e-12, kernel_mode="in")
        assert m.kernel_mode == "in" and m.spec()["kernel_mode"] == "in"
        assert cls._modes(m.spec()) == [8, 6 * 3 ** cls.dim] and len(m.cores) == 2
        x = torch.randn(2, 6, *([7] * cls.dim), dtype=D)
        torch.testing.assert_close(m.contract(x), dense(x), rtol=1e-9, atol=1e-10)
        with torch.no_grad():
            m.eval()
            w_in, kernel, w_out = m._factors()
            assert w_in is None and kernel.shape[1] == 6 and w_out.shape[0] == 8   # two steps, no 1x1 input stage
            torch.testing.assert_close(m(x), dense(x), rtol=1e-9, atol=1e-10)
        assert layer_from_spec(json.loads(json.dumps(m.spec()))).spec() == m.spec()
    # rank r: r * (K*I + O) multiply-adds per output position instead of K*I*O
    c = cls(64, 64, 3, padding=1, ranks=[2, 8, 2] if cls.format == "tr" else [1, 8, 1], kernel_mode="in")
    shape = (32, 64) + (14,) * cls.dim
    per_position = c.ranks[0] * 8 * (3 ** cls.dim * 64 + 64)
    assert c.cost(shape)["contract"] == 2 * 32 * 14 ** cls.dim * per_position < c.dense_flops(shape)
    with pytest.raises(ValueError, match="kernel_mode 'middle'; valid: \\('own', 'in'\\)"):
        cls(6, 8, 3, ranks=2, kernel_mode="middle")
    with pytest.raises(ValueError, match="kernel_mode='in' takes one input mode"):
        cls(6, 8, 3, ranks=2, kernel_mode="in", in_factors=(2, 3))


@pytest.mark.parametrize("cls, dense_path", [(TTConv2d, False), (TTConv2d, True), (TRConv1d, False),
                                             (TRConv1d, True), (TTLinear, True), (TRLinear, True)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_eval_cache_follows_autocast(monkeypatch, cls, dense_path):
    """Merged weights cached under ``torch.autocast`` (bfloat16) are not reused by a plain float32
    forward, nor the float32 ones under autocast: each call equals an uncached layer's output (the
    convs' merged factors and every rebuilt weight; a linear layer's contraction merges nothing)."""
    import copy
    torch.manual_seed(0)
    m, x = small(cls)
    m, x = m.float().eval(), x.float()
    monkeypatch.setattr(type(m), "use_dense_path", lambda self, *_: dense_path)

    def uncached():
        with torch.no_grad():
            return copy.deepcopy(m)(x)  # a copy starts with an empty cache
    with torch.no_grad():
        for autocast in (True, False, True, False):
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                y, ref = m(x), uncached()
            assert y.dtype == ref.dtype and torch.equal(y, ref)


def test_load_cores_with_a_bias_into_a_layer_without_one_names_the_layer():
    m = TTLinear(12, 20, bias=False, ranks=2, in_factors=(3, 4), out_factors=(4, 5))
    cores = [c.detach().clone() for c in m.cores]
    with pytest.raises(ValueError, match=r"TTLinear\.load_cores: a bias was given but the layer has none"):
        m.load_cores(cores, torch.zeros(20))


def test_tt_rnn_default_layout_is_the_balanced_tt_matrix_not_the_low_rank_form():
    """TTLinear's default is the two-core low-rank form; for the matrices of a recurrent cell (4 gates
    stacked, a small input) that form leaves the input matrix rank 1 at 8x. The recurrent layers use the
    balanced TT-matrix layout for TT as for TR (explicit factors or n_modes still win)."""
    from tn_hf.layers import TTLSTM
    spec = TTLSTM.dense_spec(nn.LSTM(12, 64), compress_hidden=True)["weights"]
    assert spec["weight_ih_l0"]["in_factors"] == [3, 4] and spec["weight_ih_l0"]["out_factors"] == [16, 16]
    assert spec["weight_hh_l0"]["in_factors"] == [4, 4, 4] and len(spec["weight_hh_l0"]["out_factors"]) == 3
    m = TTLSTM.from_dense(nn.LSTM(12, 64), compression_ratio=8.0, compress_hidden=True)
    assert max(m.ih_l0.ranks) > 1 and len(m.hh_l0.cores) == 3
    assert TTLSTM.dense_spec(nn.LSTM(12, 64), n_modes=2)["weights"]["weight_ih_l0"]["in_factors"] == [3, 4]
    ones = TTLSTM.dense_spec(nn.LSTM(12, 64), in_factors=[1, 12], out_factors=[256, 1])["weights"]
    assert ones["weight_ih_l0"]["in_factors"] == [1, 12]
