"""Speed-related behaviour: contiguous conv weights, cached eval weights, the layout planner."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tn_hf.layers import TTConv2d
from tn_hf.layers import conv as conv_mod

D = torch.float64


def _canonical_strides(t):
    s, acc = [], 1
    for n in reversed(t.shape):
        s.append(acc)
        acc *= n
    return tuple(reversed(s))


def _conv_weights_seen(monkeypatch, what):
    """Record ``what(weight)`` for every weight the TN convs hand to the 2d conv kernel."""
    seen = []
    real = conv_mod._CONV_FN[2]

    def spy(x, w, *a, **k):
        seen.append(what(w))
        return real(x, w, *a, **k)
    monkeypatch.setitem(conv_mod._CONV_FN, 2, spy)
    return seen


@pytest.mark.parametrize("fmt,dense_path", [("tt", False), ("tt", True), ("tr", False)])
def test_strided_1x1_conv_fwd_bwd_matches_dense(monkeypatch, fmt, dense_path):
    """64->128 1x1 stride-2 conv (ResNet downsample): every weight reaching the conv kernel has
    row-major strides, and forward + backward equal the rebuilt dense conv in float64."""
    from tn_hf.layers import TRConv2d
    torch.manual_seed(0)
    cls, ranks = (TTConv2d, [1, 7, 36, 36, 7, 1]) if fmt == "tt" else (TRConv2d, [2, 4, 12, 12, 4, 2])
    m = cls.from_dense(nn.Conv2d(64, 128, 1, stride=2, bias=True).to(D), ranks=ranks)
    seen = _conv_weights_seen(monkeypatch, lambda w: (tuple(w.shape), w.stride(), _canonical_strides(w)))
    monkeypatch.setattr(m, "use_dense_path", lambda *_: dense_path)
    x = torch.randn(3, 64, 9, 9, dtype=D, requires_grad=True)
    y = m(x)
    gx, *gc = torch.autograd.grad((y * y).sum(), (x, *m.cores))
    assert seen and all(s == c for _, s, c in seen), seen
    # reference: dense conv on the rebuilt weight, gradients through the same rebuild
    xr = x.detach().clone().requires_grad_(True)
    yr = F.conv2d(xr, m.weight, m.bias, stride=2)
    gxr, *gcr = torch.autograd.grad((yr * yr).sum(), (xr, *m.cores))
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, gxr, rtol=1e-10, atol=1e-12)
    for a, b in zip(gc, gcr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _counting(monkeypatch, layer, name):
    calls = []
    real = getattr(layer, name)

    def wrapped(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(layer, name, wrapped)
    return calls


@pytest.mark.parametrize("case", ["conv_factorized", "conv_dense", "linear_sweep", "linear_dense"])
def test_eval_cache_reused_until_a_core_changes(monkeypatch, case):
    from tn_hf.layers import TTLinear
    torch.manual_seed(0)
    if case.startswith("conv"):
        m = TTConv2d(6, 8, 3, padding=1, ranks=3, in_factors=(2, 3), out_factors=(2, 4)).to(D)
        x = torch.randn(2, 6, 5, 5, dtype=D)
        merge = "_factors" if case == "conv_factorized" else "full_tensor"
    else:
        m = TTLinear(12, 20, ranks=3, in_factors=(3, 4), out_factors=(4, 5)).to(D)
        x = torch.randn(5, 12, dtype=D)
        merge = "_sweep_cores" if case == "linear_sweep" else "full_tensor"
    monkeypatch.setattr(m, "use_dense_path", lambda *_: case.endswith("dense"))
    calls = _counting(monkeypatch, m, merge)
    ref = lambda: m.to_dense()(x)  # noqa: E731

    m.eval()
    with torch.no_grad():
        y1, n0 = m(x), len(calls)
        y2 = m(x)
        assert n0 == 1 and len(calls) == 1 and torch.equal(y1, y2)   # merged once, reused
        torch.testing.assert_close(y1, ref(), rtol=1e-10, atol=1e-12)

    # training step: gradients flow (nothing cached while autograd records), then the cache is stale
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    before = len(calls)
    m(x).pow(2).sum().backward()
    m(x)
    assert len(calls) == before + 2 and all(c.grad is not None for c in m.cores)
    opt.step()
    m.eval()
    with torch.no_grad():
        n = len(calls)
        y3 = m(x)
        assert len(calls) == n + 1                                    # the step invalidated the cache
        torch.testing.assert_close(y3, ref(), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(y3, y1)

    # load_state_dict (in-place copy) invalidates, inference_mode works too
    other = type(m).from_spec(m.spec()).to(D)
    expect = other.to_dense()(x).detach()
    n = len(calls)
    m.load_state_dict(other.state_dict())
    with torch.inference_mode():
        y4 = m(x)
        m(x)
    assert len(calls) == n + 1
    torch.testing.assert_close(y4, expect, rtol=1e-10, atol=1e-12)

    # a core replaced by a new Parameter invalidates too
    with torch.no_grad():
        m.cores[0] = torch.nn.Parameter(m.cores[0].detach() * 2)
        n = len(calls)
        y5 = m(x)
    assert len(calls) == n + 1
    torch.testing.assert_close(y5, ref(), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(y5, y4)


@pytest.mark.parametrize("pointwise", ["conv", "gemm"])
def test_torch_compile_inductor_compressed_model(pointwise):
    from tn_hf.layers import TTLinear
    torch.manual_seed(0)
    model = nn.Sequential(TTConv2d(4, 8, 3, padding=1, ranks=3, in_factors=(2, 2), out_factors=(2, 4),
                                   pointwise=pointwise),
                          nn.ReLU(), nn.Flatten(), TTLinear(8 * 16, 10, ranks=3)).eval()
    x = torch.randn(2, 4, 4, 4)
    compiled = torch.compile(model, backend="inductor")
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- planner
from nets import ConvNet  # noqa: E402

import tn_hf  # noqa: E402
from tn_hf import cost  # noqa: E402
from tn_hf.layers import TTLinear  # noqa: E402

_Net = ConvNet  # input 3x8x8


def _fake_costs(monkeypatch, fn):
    """Replace the planner's times by (fn(spec, shape), 1.0) seconds (TN, dense); record the calls."""
    calls = []

    def pair(self, what, build, dense, shape, device, dtype, channels_last=False):
        calls.append((what["class"], tuple(shape)) + (("channels_last",) if channels_last else ()))
        return fn(what, shape), 1.0   # (TN seconds, dense seconds): every dense layer takes 1 s
    monkeypatch.setattr(cost.Estimator, "pair", pair)
    return calls


def test_planner_keeps_slow_layers_dense_and_rebalances_budget(monkeypatch):
    torch.manual_seed(0)
    # conv "a" is slower as TN at every size; everything else is 0.5x dense
    calls = _fake_costs(monkeypatch, lambda spec, shape: 1.3 if spec.get("in_channels") == 16 else 0.5)
    m = _Net().eval()
    cfg = tn_hf.TNConfig(compression_ratio=3.0, min_params=4000, allocation="uniform", plan_for_speed=True)
    report = tn_hf.compress(m, cfg, progress=False)
    rows = {r["name"]: r for r in report.rows}
    assert set(rows) == {"a", "b", "fc1"}
    assert type(m.a) is nn.Conv2d and isinstance(m.b, TTConv2d) and isinstance(m.fc1, TTLinear)
    assert rows["a"]["kept_dense"].startswith("TN not faster (1.30x dense time at batch 32")
    assert rows["a"]["tn_type"].startswith("kept dense: TN not faster") and rows["a"]["ratio"] == 1.0
    assert "kept dense: TN not faster" in str(report)
    # both planning batches measured, at the probed shapes
    assert ("TTConv2d", (32, 64, 8, 8)) in calls and ("TTLinear", (1, 64)) in calls
    # the budget of the layer kept dense moved to the others: the targets as a whole stay at 3x
    w = {n: getattr(m, n).weight.numel() if n == "a" else sum(c.numel() for c in getattr(m, n).cores)
         for n in rows}
    dense = 16 * 64 * 9 + 64 * 64 * 9 + 64 * 256
    assert 2.7 <= dense / sum(w.values()) <= 3.3
    assert rows["b"]["ratio"] > 3.2 and rows["fc1"]["ratio"] > 3.2
    y = m(torch.randn(2, 3, 8, 8))
    assert y.shape == (2, 10)
    # plan() itself says what stays dense; nothing is left on the model
    from tn_hf.targeting import plan
    fresh = _Net().eval()
    p = plan(fresh, cfg)
    assert list(p.specs) == ["b", "fc1"] and list(p.kept_dense) == ["a"]
    assert p.kept_dense["a"].startswith("TN not faster") and "tn_hf_kept_dense" not in vars(fresh)


@pytest.mark.parametrize("others_at_1", [0.5, 0.95])
def test_layers_slower_at_batch_1_are_taken_when_the_others_pay_for_it(monkeypatch, others_at_1):
    # "a": 0.5x dense at batch 32, 1.2x at batch 1; "b" and "fc1": 0.5x at batch 32, others_at_1 at batch 1.
    # Saved at batch 1 by b and fc1: 2 x (1 - others_at_1) s; lost by a: 0.2 s.
    _fake_costs(monkeypatch, lambda spec, shape: 0.5 if shape[0] == 32 else
                (1.2 if spec.get("in_channels") == 16 else others_at_1))
    m = _Net().eval()
    cfg = tn_hf.TNConfig(compression_ratio=3.0, min_params=4000, allocation="uniform", plan_for_speed=True)
    rows = {r["name"]: r for r in tn_hf.compress(m, cfg, progress=False).rows}
    assert set(rows) == {"a", "b", "fc1"}
    if others_at_1 == 0.5:   # 1.0 s saved >= 0.2 s lost
        assert isinstance(m.a, TTConv2d) and not rows["a"].get("kept_dense")
        assert rows["a"]["note"] == "slower than dense at batch 1 (1.20x), paid for by the other TN layers' " \
                                    "batch-1 savings"
    else:                    # 0.1 s saved < 0.2 s lost
        assert type(m.a) is nn.Conv2d and rows["a"]["kept_dense"].startswith("TN not faster (0.50x dense time at "
                                                                             "batch 32, 1.20x dense time at batch 1")
    assert isinstance(m.b, TTConv2d) and isinstance(m.fc1, TTLinear)


def test_planner_prefers_faster_aligned_ranks(monkeypatch):
    # measured: unaligned ranks are slow (as conv kernels are at odd channel counts)
    _fake_costs(monkeypatch, lambda spec, shape: 0.5 if all(r % 8 == 0 or r < 8 for r in spec["ranks"]) else 0.8)
    m = _Net().eval()
    cfg = tn_hf.TNConfig(compression_ratio=3.0, target_modules=["b"], allocation="uniform", plan_for_speed=True)
    tn_hf.compress(m, cfg, progress=False)
    assert all(r % 8 == 0 or r < 8 for r in m.b.ranks), m.b.ranks
    dense = 64 * 64 * 9
    assert dense / 3 * cost.MIN_FILL <= sum(c.numel() for c in m.b.cores) <= dense / 3


@pytest.mark.parametrize("faster", ["in", "own"])
def test_planner_picks_the_faster_conv_layout_at_the_same_size(monkeypatch, tmp_path, faster):
    _fake_costs(monkeypatch, lambda spec, shape: 0.4 if spec.get("kernel_mode", "own") == faster else 0.6)
    m = _Net().eval()
    x = torch.randn(2, 3, 8, 8)
    cfg = tn_hf.TNConfig(compression_ratio=3.0, target_modules=["b"], allocation="uniform", plan_for_speed=True)
    tn_hf.compress(m, cfg, progress=False)
    assert m.b.kernel_mode == faster and (len(m.b.cores) == 2) == (faster == "in")
    dense = 64 * 64 * 9
    assert dense / 3 * cost.MIN_FILL <= sum(c.numel() for c in m.b.cores) <= dense / 3
    # the layout travels with the checkpoint
    tn_hf.save_pretrained(m, tmp_path / "ckpt")
    back = tn_hf.from_pretrained(tmp_path / "ckpt", model_class=_Net)
    assert back.b.kernel_mode == faster and back.b.spec() == m.b.spec()
    torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)
    # a fixed layout is kept whatever the timings say
    m2 = _Net().eval()
    tn_hf.compress(m2, dataclasses.replace(cfg, kernel_mode="own"), progress=False)
    assert m2.b.kernel_mode == "own" and len(m2.b.cores) == 5


def test_planner_times_channels_last_models_in_channels_last(monkeypatch):
    calls = _fake_costs(monkeypatch, lambda spec, shape: 0.5)
    m = _Net().eval().to(memory_format=torch.channels_last)
    tn_hf.compress(m, tn_hf.TNConfig(compression_ratio=3.0, allocation="uniform", plan_for_speed=True), progress=False)
    convs = [c for c in calls if c[0] == "TTConv2d"]
    assert convs and all(c[-1] == "channels_last" for c in convs)
    assert all(c[-1] != "channels_last" for c in calls if c[0] == "TTLinear")
    calls.clear()
    tn_hf.compress(_Net().eval(), tn_hf.TNConfig(compression_ratio=3.0, allocation="uniform", plan_for_speed=True),
                   progress=False)
    assert calls and not any(c[-1] == "channels_last" for c in calls)


def test_admm_keeps_the_planned_conv_layout(monkeypatch):
    from tn_hf import ADMMScheduler
    _fake_costs(monkeypatch, lambda spec, shape: 0.4 if spec.get("kernel_mode") == "in" else 0.6)
    torch.manual_seed(0)
    m = _Net().eval()
    cfg = tn_hf.TNConfig(compression_ratio=3.0, target_modules=["b"], allocation="uniform", plan_for_speed=True)
    sched = ADMMScheduler(m, cfg)
    (slot,) = sched.slots
    assert slot.spec["kernel_mode"] == "in" and len(slot.ranks) == 3
    fresh = copy.deepcopy(m)
    sched.compress(m, progress=False)
    assert m.b.kernel_mode == "in" and m.b.ranks == slot.ranks
    # the config that reproduces ADMM's layers names the layout
    again = sched.compress_config()
    assert again.kernel_mode == {"b": "in"}
    monkeypatch.undo()
    tn_hf.compress(fresh, again, progress=False)
    assert fresh.b.spec() == m.b.spec()


def test_latency_budget_is_a_time_ratio(monkeypatch):
    # synthetic cost: time proportional to the TN params (FLOPs ~ params for these layers)
    def fn(spec, shape):
        from tn_hf.layers import registry
        layer = registry[spec["class"]].from_spec(spec)
        return sum(c.numel() for c in layer.cores) / layer.dense_params()
    _fake_costs(monkeypatch, fn)
    m = _Net().eval()
    report = tn_hf.compress(m, tn_hf.TNConfig(compression_ratio=4.0, budget="latency", target_modules=["b", "fc1"]),
                            progress=False)
    for r in report.rows:  # the largest TN form at <= 1/4 of dense time: param ratio 4 (the grid step)
        assert 4.0 <= r["ratio"] < 6.0, r
    with pytest.raises(ValueError, match="budget.*latency"):
        tn_hf.TNConfig(compression_ratio=2.0, budget="speed")


@pytest.mark.parametrize("cheap", ["b", "fc1"])
def test_time_allocation_spends_the_budget_where_params_cost_least_time(monkeypatch, cheap):
    # synthetic cost: TN time = k x (TN params / dense params), k 0.2 for the "cheap" layer, 1.0 for the other
    def fn(spec, shape):
        from tn_hf.layers import registry
        layer = registry[spec["class"]].from_spec(spec)
        k = 0.2 if (spec["class"] == "TTLinear") == (cheap == "fc1") else 1.0
        return k * sum(c.numel() for c in layer.cores) / layer.dense_params()
    _fake_costs(monkeypatch, fn)
    m = _Net().eval()
    cfg = tn_hf.TNConfig(compression_ratio=3.0, allocation="time", target_modules=["b", "fc1"])
    rows = {r["name"]: r for r in tn_hf.compress(m, cfg, progress=False).rows}
    dear = "fc1" if cheap == "b" else "b"
    dense = {"b": 64 * 64 * 9, "fc1": 64 * 256}
    tn = {n: sum(c.numel() for c in getattr(m, n).cores) for n in dense}
    # the targets as a whole at the ratio asked for or a little above (grid steps and aligned ranks leave
    # part of the budget unspent), the cheap layer larger than uniform
    assert 3.0 <= sum(dense.values()) / sum(tn.values()) <= 3.6, tn
    assert rows[cheap]["ratio"] < 3.0 < rows[dear]["ratio"], rows
    # the uniform allocation of the same budget is slower under this cost
    def total(ratios):
        return sum((0.2 if n == cheap else 1.0) / r for n, r in ratios.items())
    assert total({n: rows[n]["ratio"] for n in dense}) < total({n: 3.0 for n in dense})
    with pytest.raises(ValueError, match="allocation='time'.*budget='params'"):
        tn_hf.TNConfig(compression_ratio=3.0, allocation="time", budget="flops")


def _size_fraction(spec) -> float:
    """TN params of the form over the dense layer's."""
    from tn_hf.layers import registry
    layer = registry[spec["class"]].from_spec(spec)
    return sum(c.numel() for c in layer.cores) / layer.dense_params()


def _compress_a_and_fc1(monkeypatch, fn):
    """_Net's conv "a" and fc1 at 3x (uniform) under the fake costs ``fn``: (model, report rows)."""
    _fake_costs(monkeypatch, fn)
    m = _Net().eval()
    rows = {r["name"]: r for r in tn_hf.compress(
        m, tn_hf.TNConfig(compression_ratio=3.0, allocation="uniform", target_modules=["a", "fc1"]),
        progress=False).rows}
    return m, rows


def test_layers_kept_dense_shrink_when_they_alone_exceed_the_budget(monkeypatch):
    # conv "a" (9216 weights) is faster as TN only at <= 1/6 of its size; with fc1 (16384) at 3x the
    # budget is 8533, less than "a" alone: keeping "a" dense would leave the targets at 1.7x
    m, rows = _compress_a_and_fc1(monkeypatch, lambda spec, shape: 1.3 if spec.get("in_channels") == 16
                                  and _size_fraction(spec) > 1 / 6 else 0.5)
    assert isinstance(m.a, TTConv2d) and not rows["a"].get("kept_dense"), rows
    assert rows["a"]["ratio"] >= 5.5, rows  # the report's ratio counts the bias too
    assert rows["fc1"]["ratio"] <= 3.0, rows  # the other layer keeps at least its share
    dense = 16 * 64 * 9 + 64 * 256
    # and the budget "a" no longer takes goes back to fc1: the targets as a whole at the ratio, not above
    assert 3.0 * 0.99 <= dense / sum(sum(c.numel() for c in getattr(m, n).cores) for n in ("a", "fc1")) <= 3.3


@pytest.mark.parametrize("tiny_faster", [True, False])
def test_a_crowding_layer_never_shrinks_past_the_floor(monkeypatch, tiny_faster):
    # conv "a" crowds fc1 out (as above) and is slower at batch 1 at its share of the budget; at batch
    # 32 it is faster at every size. Tiny forms (20x smaller, past the floor 4 x 3 = 12x) would be faster
    # at batch 1 too but wreck the layer: "a" takes its share, slower at batch 1, rather than one of them.
    def fn(spec, shape):
        if spec.get("in_channels") != 16 or shape[0] == 32:
            return 0.5
        return 0.5 if tiny_faster and _size_fraction(spec) <= 1 / 20 else 2.0  # "a" loses more than fc1 saves
    m, rows = _compress_a_and_fc1(monkeypatch, fn)
    assert isinstance(m.a, TTConv2d) and not rows["a"].get("kept_dense"), rows
    assert 2.5 <= rows["a"]["ratio"] <= 3.5, rows
    assert rows["a"]["note"].startswith("slower than dense at batch 1 (0.50x dense time at batch 32, 2.00x "
                                        "dense time at batch 1), taken because kept dense"), rows["a"]
    assert not rows["fc1"].get("note")


@pytest.mark.parametrize("loss_at_share", [0.3, 1.0])
def test_a_crowding_layer_slower_at_batch_1_is_paid_for_like_admitted_ones(monkeypatch, loss_at_share):
    # fc1 (TN) saves 0.5 s at batch 1. "a" at its share (1/3) is faster at batch 32 and loses loss_at_share
    # at batch 1; at 1/5 of its size or less it is faster at both. Paid for (0.3 <= 0.5): its share, with a
    # note; not paid for (1.0 > 0.5): the largest smaller form faster at both, no note.
    from tn_hf.report import probe
    from tn_hf.targeting import select

    def fn(spec, shape):
        if spec.get("in_channels") != 16 or shape[0] == 32 or _size_fraction(spec) <= 1 / 5:
            return 0.5
        return 1.0 + loss_at_share
    _fake_costs(monkeypatch, fn)
    m = _Net().eval()
    cfg = tn_hf.TNConfig(compression_ratio=3.0, allocation="uniform", target_modules=["a", "fc1"])
    targets = {t.name: t for t in select(m, dataclasses.replace(cfg, plan_for_speed=False))[0]}
    kept = {"a": "TN not faster"}
    taken = cost._shrink_kept(cost.Estimator(), list(targets.values()), kept, cfg, probe(m, ["a", "fc1"]),
                              lambda taken: not taken, [targets["fc1"]])
    assert taken == [targets["a"]] and not kept
    share = _size_fraction(targets["a"].spec)
    if loss_at_share < 0.5:
        assert share > 0.25 and targets["a"].note == ("slower than dense at batch 1 (1.30x), paid for by the "
                                                      "other TN layers' batch-1 savings")
    else:
        assert 1 / 7 < share <= 1 / 5 and targets["a"].note is None


def test_time_allocation_may_keep_dense_the_layer_where_params_cost_least(monkeypatch):
    # fc1 as TN saves little time at any size (0.89x dense); conv b's time grows with its size. At 2x the
    # budget (26624) holds fc1 dense (16384) plus b at 4x: the budget spent at the least time
    def fn(spec, shape):
        from tn_hf.layers import registry
        layer = registry[spec["class"]].from_spec(spec)
        return 0.89 if spec["class"] == "TTLinear" else sum(c.numel() for c in layer.cores) / layer.dense_params()
    _fake_costs(monkeypatch, fn)
    m = _Net().eval()
    report = tn_hf.compress(m, tn_hf.TNConfig(compression_ratio=2.0, allocation="time", target_modules=["b", "fc1"]),
                            progress=False)
    rows = {r["name"]: r for r in report.rows}
    assert type(m.fc1) is nn.Linear and rows["fc1"]["kept_dense"].startswith("the time allocation"), rows
    assert isinstance(m.b, TTConv2d)
    assert 2.0 <= (64 * 64 * 9 + 64 * 256) / (64 * 256 + sum(c.numel() for c in m.b.cores)) <= 2.2


def test_time_allocation_without_input_shapes_raises(monkeypatch):
    calls = _fake_costs(monkeypatch, lambda spec, shape: 0.5)
    m = _Net().eval()
    del m.pretrained_cfg  # no declared input size: nothing can be timed (not silently uniform)
    with pytest.raises(ValueError, match=r"allocation='time'.*input size.*TNConfig\(input_size="):
        tn_hf.compress(m, tn_hf.TNConfig(compression_ratio=3.0, allocation="time", target_modules=["b", "fc1"]),
                       progress=False)
    assert calls == [] and type(m.b) is nn.Conv2d and type(m.fc1) is nn.Linear  # nothing swapped


def test_size_check_rejects_tn_larger_than_dense():
    conv = nn.Conv2d(64, 8, 1)
    spec = TTConv2d.dense_spec(conv, n_modes=1)
    spec["ranks"] = [1, 8, 64, 1]  # 8*8 + 8*64 + 64*64 params > 512 dense
    assert "not smaller" in cost._check_size(TTConv2d, spec, conv, (1, 64, 8, 8))
    spec["ranks"] = [1, 4, 4, 1]
    assert cost._check_size(TTConv2d, spec, conv, (1, 64, 8, 8)) is None


def test_cost_cache_measures_once_and_persists(tmp_path, monkeypatch):
    monkeypatch.setenv("TN_HF_CACHE", str(tmp_path))
    dense = nn.Linear(64, 64)
    layer = TTLinear.from_dense(dense, ranks=8)
    builds = []

    def build():
        builds.append(1)
        return layer
    cm = cost.CostModel()
    r1 = cm.pair(layer.spec(), build, dense, (4, 64), torch.device("cpu"), torch.float32)
    assert cm.pair(layer.spec(), build, dense, (4, 64), torch.device("cpu"), torch.float32) == r1
    cm.save()
    assert min(r1) > 0 and len(builds) == 1 and (tmp_path / "cost.json").exists()
    cm2 = cost.CostModel()
    assert cm2.pair(layer.spec(), build, dense, (4, 64), torch.device("cpu"), torch.float32) == r1
    assert len(builds) == 1
    cm2.pair(layer.spec(), build, dense, (8, 64), torch.device("cpu"), torch.float32)  # new shape: measured
    assert len(builds) == 2


def test_default_linear_layout_is_low_rank_two_gemms():
    torch.manual_seed(0)
    dense = nn.Linear(96, 160).to(D)
    m = TTLinear.from_dense(dense, compression_ratio=3)
    assert m.low_rank and m.in_factors == (1, 96) and m.out_factors == (160, 1)
    r = m.ranks[1]
    assert sum(c.numel() for c in m.cores) == r * (96 + 160) <= 96 * 160 / 3
    x = torch.randn(7, 96, dtype=D)
    assert not m.use_dense_path(7)
    assert m.flops((7, 96)) == 2 * 7 * r * (96 + 160) < m.dense_flops((7, 96))
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, m.weight, m.bias), rtol=1e-10, atol=1e-12)
    full = TTLinear.from_dense(dense, rel_error=1e-12)  # full rank reproduces the dense layer
    torch.testing.assert_close(full(x), dense(x), rtol=1e-9, atol=1e-10)


class _TwoMaps(nn.Module):
    """A narrow conv on a large map and a wide one on a small map: per parameter, "early" costs
    64x the FLOPs of "late"."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.early = nn.Conv2d(32, 32, 3, padding=1)
        self.mid = nn.Conv2d(32, 128, 1)
        self.late = nn.Conv2d(128, 128, 3, padding=1)
        self.fc = nn.Linear(128, 10)
        self.pretrained_cfg = {"input_size": (3, 32, 32)}

    def forward(self, x):
        x = torch.relu(self.early(torch.relu(self.stem(x))))
        x = torch.relu(self.late(F.max_pool2d(torch.relu(self.mid(x)), 8)))
        return self.fc(x.mean((2, 3)))


def test_global_allocation_planned_for_speed_cuts_flops_by_the_ratio_too(monkeypatch):
    """Default config (global allocation, measured planning): the targets are compression_ratio x
    smaller in params *and* in FLOPs (params x output positions); size-only planning spends on the
    layer whose parameters are cheap and FLOPs dear."""
    from tn_hf.report import probe
    _fake_costs(monkeypatch, lambda spec, shape: 0.5)
    torch.manual_seed(0)
    base = _TwoMaps().eval()
    names = ["early", "mid", "late"]
    pos = {n: p.positions for n, p in probe(base, names).items()}
    dense_p = {n: base.get_submodule(n).weight.numel() for n in names}

    def totals(cfg):
        m = copy.deepcopy(base)
        rows = {r["name"]: r for r in tn_hf.compress(m, cfg, progress=False).rows}
        assert set(rows) == set(names) and not any(r.get("kept_dense") for r in rows.values())
        tn_p = {n: sum(c.numel() for c in m.get_submodule(n).cores) for n in names}
        return (sum(dense_p.values()) / sum(tn_p.values()),
                sum(dense_p[n] * pos[n] for n in names) / sum(tn_p[n] * pos[n] for n in names), tn_p)
    p_new, f_new, tn_new = totals(tn_hf.TNConfig(compression_ratio=3.0, min_params=4000))
    p_old, f_old, tn_old = totals(tn_hf.TNConfig(compression_ratio=3.0, min_params=4000, plan_for_speed=False))
    assert 2.7 <= p_new <= 3.5 and f_new >= 3.0, (p_new, f_new, tn_new)
    assert p_old >= 2.7 and f_old < 3.0, (p_old, f_old, tn_old)
    assert tn_new["early"] < tn_old["early"] and tn_new["late"] > tn_old["late"]


def test_without_speed_planning_only_size_decides_and_nothing_is_timed(monkeypatch):
    calls = _fake_costs(monkeypatch, lambda spec, shape: 5.0)  # "slower" everywhere: ignored
    m = _Net().eval()
    report = tn_hf.compress(m, tn_hf.TNConfig(compression_ratio=3.0, min_params=4000, allocation="uniform",
                                              plan_for_speed=False), progress=False)
    assert not calls and all(not r.get("kept_dense") for r in report.rows)
    assert isinstance(m.a, TTConv2d) and isinstance(m.b, TTConv2d) and isinstance(m.fc1, TTLinear)
    for r in report.rows:  # never more params or FLOPs than the dense layer
        assert r["tn_params"] < r["dense_params"] and r["flops_tn"] < r["flops_dense"]


def test_latency_budget_recurrent_layer_gets_planned_ratio(monkeypatch):
    from tn_hf.layers import TTLSTM

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(96, 32, batch_first=True)
            self.head = nn.Linear(32, 4)
            self.pretrained_cfg = {"input_size": (5, 96)}

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    def fn(spec, shape):  # time ~ params of the input projection
        leaf = spec["weights"]["weight_ih_l0"]
        return sum(leaf["ranks"][k] * n * leaf["ranks"][k + 1] for k, n in
                   enumerate(o * i for o, i in zip(leaf["out_factors"], leaf["in_factors"]))) / (96 * 128)
    calls = _fake_costs(monkeypatch, fn)
    m = Seq().eval()
    report = tn_hf.compress(m, tn_hf.TNConfig(compression_ratio=3.0, budget="latency"), progress=False)
    assert isinstance(m.lstm, TTLSTM) and calls and calls[0][1] == (1, 5, 96)
    ih = m.lstm.ih_l0  # the balanced TT-matrix layout needs fewer FLOPs than dense only from 24x on here
    assert len(ih.in_factors) == 3 and 96 * 128 / sum(c.numel() for c in ih.cores) >= 3.0, report
    row = report.rows[0]
    assert row["flops_tn"] < row["flops_dense"], report
    y = m(torch.randn(2, 5, 96))
    assert y.shape == (2, 4)


def test_admm_keeps_dense_what_the_planner_kept_dense(monkeypatch):
    from tn_hf import ADMMScheduler
    _fake_costs(monkeypatch, lambda spec, shape: 1.3 if spec.get("in_channels") == 16 else 0.5)
    torch.manual_seed(0)
    m = _Net().eval()
    sched = ADMMScheduler(m, tn_hf.TNConfig(compression_ratio=3.0, min_params=4000, allocation="uniform"))
    assert {s.target for s in sched.slots} == {"b", "fc1"}        # measured planning is the default
    rows = {r["name"]: r for r in sched.compress(progress=False).rows}
    assert type(m.a) is nn.Conv2d and rows["a"]["kept_dense"].startswith("TN not faster")
    assert isinstance(m.b, TTConv2d) and isinstance(m.fc1, TTLinear)
    assert set(sched.compress_config().ranks) == {"b", "fc1"}


@pytest.mark.parametrize("cls_name,kernel_mode,dims", [
    ("TTConv2d", "own", 2), ("TTConv2d", "in", 2), ("TRConv2d", "own", 2), ("TRConv2d", "in", 2),
    ("TuckerConv2d", "own", 2), ("TTConv1d", "own", 1), ("TTConv3d", "in", 3)])
@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (1, 1, 0), (1, 2, 0), (3, 2, 1)])
def test_pointwise_gemm_equals_the_conv_kernel(cls_name, kernel_mode, dims, kernel, stride, padding):
    """pointwise="gemm" (1x1 stages as batched matrix products) computes what the conv kernel does,
    forward and backward, for contiguous and channels-last inputs, and travels in the spec."""
    from tn_hf.layers import layer_from_spec, registry
    torch.manual_seed(0)
    cls = registry[cls_name]
    ranks = [2, 3, 1 if kernel == 1 else 2, 2, 2] if cls_name == "TuckerConv2d" else 3
    ref = cls(8, 12, kernel, stride=stride, padding=padding, ranks=ranks, in_factors=(2, 4) if kernel_mode == "own"
              else None, out_factors=(3, 4), kernel_mode=kernel_mode,
              **({"pointwise": "conv"} if "gemm" in getattr(cls, "pointwise_modes", ()) else {})).to(D)
    spec = dict(ref.spec(), pointwise="gemm")
    gemm = layer_from_spec(spec).to(D)
    gemm.load_state_dict(ref.state_dict())
    assert gemm.pointwise == "gemm" and gemm.spec()["pointwise"] == "gemm" and "pointwise" not in ref.spec()
    x = torch.randn(2, 8, *([7] * dims), dtype=D)
    inputs = [x] + ([x.contiguous(memory_format=torch.channels_last)] if dims == 2 else [])
    for xin in inputs:
        ys = []
        for layer in (ref, gemm):
            xi = xin.clone().requires_grad_(True)
            y = layer.contract(xi)
            ys.append((y, *torch.autograd.grad((y * y).sum(), (xi, *layer.cores))))
        for a, b in zip(*ys):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"pointwise 'bmm'; valid: \('conv', 'gemm'\)"):
        layer_from_spec(dict(spec, pointwise="bmm"))


def test_gemm_runs_the_1x1_stages_as_matrix_products(monkeypatch):
    """With pointwise="gemm" the conv kernel only sees the kxk stage (contiguous input); a
    channels-last input goes to the conv kernel throughout."""
    from tn_hf.layers import layer_from_spec
    m = layer_from_spec(dict(TTConv2d.dense_spec(nn.Conv2d(16, 16, 3, padding=1), ranks=4), pointwise="gemm"))
    seen = _conv_weights_seen(monkeypatch, lambda w: tuple(w.shape[2:]))
    x = torch.randn(2, 16, 6, 6)
    m.contract(x)
    assert seen == [(3, 3)]
    seen.clear()
    m.contract(x.contiguous(memory_format=torch.channels_last))
    assert seen == [(1, 1), (3, 3), (1, 1)]


@pytest.mark.parametrize("gemm_faster", [True, False])
def test_planner_takes_the_gemm_form_only_when_measured_faster(monkeypatch, tmp_path, gemm_faster):
    from tn_hf import ADMMScheduler
    fast = "gemm" if gemm_faster else "conv"
    _fake_costs(monkeypatch, lambda spec, shape: 0.4 if spec.get("pointwise", "conv") == fast else 0.5)
    m = _Net().eval()
    x = torch.randn(2, 3, 8, 8)
    cfg = tn_hf.TNConfig(compression_ratio=3.0, target_modules=["b"], allocation="uniform", plan_for_speed=True)
    tn_hf.compress(m, cfg, progress=False)
    assert m.b.pointwise == fast
    tn_hf.save_pretrained(m, tmp_path / "ckpt")
    back = tn_hf.from_pretrained(tmp_path / "ckpt", model_class=_Net)
    assert back.b.pointwise == fast and back.b.spec() == m.b.spec()
    torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)
    # ADMM's pinned form keeps it
    m2 = _Net().eval()
    sched = ADMMScheduler(m2, cfg)
    sched.compress(m2, progress=False)
    assert m2.b.pointwise == fast and m2.b.spec()["ranks"] == m.b.spec()["ranks"]
    # a channels-last model runs its 1x1 stages by the conv kernel whatever the spec says: not planned
    m3 = _Net().eval().to(memory_format=torch.channels_last)
    tn_hf.compress(m3, cfg, progress=False)
    assert m3.b.pointwise == "conv"
