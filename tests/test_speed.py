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
