"""Speed-related behaviour: contiguous conv weights, cached eval weights, the layout planner."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tn_hf.layers import TTConv2d, conv as conv_mod

D = torch.float64


def _canonical_strides(t):
    s, acc = [], 1
    for n in reversed(t.shape):
        s.append(acc)
        acc *= n
    return tuple(reversed(s))


@pytest.mark.parametrize("dense_path", [False, True])
def test_strided_1x1_conv_fwd_bwd_matches_dense(monkeypatch, dense_path):
    """64->128 1x1 stride-2 conv (ResNet downsample): every weight reaching the conv kernel has
    row-major strides, and forward + backward equal the rebuilt dense conv in float64."""
    torch.manual_seed(0)
    m = TTConv2d.from_dense(nn.Conv2d(64, 128, 1, stride=2, bias=True).to(D), ranks=[1, 7, 36, 36, 7, 1])
    seen = []
    real = conv_mod._CONV_FN[2]

    def spy(x, w, *a, **k):
        seen.append((tuple(w.shape), w.stride(), _canonical_strides(w)))
        return real(x, w, *a, **k)

    monkeypatch.setitem(conv_mod._CONV_FN, 2, spy)
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


def test_torch_compile_inductor_compressed_model():
    from tn_hf.layers import TTLinear
    torch.manual_seed(0)
    model = nn.Sequential(TTConv2d(4, 8, 3, padding=1, ranks=3, in_factors=(2, 2), out_factors=(2, 4)),
                          nn.ReLU(), nn.Flatten(), TTLinear(8 * 16, 10, ranks=3)).eval()
    x = torch.randn(2, 4, 4, 4)
    compiled = torch.compile(model, backend="inductor")
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-5)
