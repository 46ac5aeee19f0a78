"""Tests for tn_hf.decompositions against tensorly as the reference."""
import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import tensor_ring, tensor_train

from tn_hf.decompositions import (
    allocate_ranks,
    allocation_summary,
    auto_modes,
    factorize,
    ranks_for_ratio,
    tn_params,
    tr_project,
    tr_svd,
    tr_to_full,
    tt_project,
    tt_svd,
    tt_to_full,
)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def storage(cores):
    return sum(c.numel() for c in cores)


@pytest.fixture
def x():
    torch.manual_seed(0)
    # moderately structured tensor: low TT rank + noise
    g = [torch.randn(1, 6, 5), torch.randn(5, 7, 5), torch.randn(5, 8, 5), torch.randn(5, 5, 1)]
    t = tt_to_full(g).double()
    return t / t.norm() + 0.02 * torch.randn(6, 7, 8, 5, dtype=torch.float64) / 40


def test_factorize():
    assert factorize(512, 3) == (8, 8, 8)
    assert factorize(576, 3) == (8, 8, 9)
    assert factorize(768, 3) == (8, 8, 12)
    assert factorize(7, 2) == (1, 7)
    assert factorize(1, 3) == (1, 1, 1)
    for n, d in [(1000, 3), (4096, 4), (3 * 7 * 11, 2), (97, 3)]:
        f = factorize(n, d)
        assert len(f) == d and int(np.prod(f)) == n and list(f) == sorted(f)
    assert auto_modes(512) == (4, 4, 4, 8) and auto_modes(7) == (7,)
    with pytest.raises(ValueError):
        factorize(0, 2)


@pytest.mark.parametrize("ranks", [[1, 3, 4, 2, 1], [1, 6, 10, 5, 1], [1, 2, 2, 2, 1]])
def test_tt_svd_matches_tensorly(x, ranks):
    cores = tt_svd(x, ranks=ranks)
    assert [c.shape[0] for c in cores] + [1] == ranks
    ref = tl.tt_to_tensor(tensor_train(x.numpy(), rank=ranks))
    ref_err = np.linalg.norm(ref - x.numpy()) / np.linalg.norm(x.numpy())
    assert rel(tt_to_full(cores), x) == pytest.approx(ref_err, rel=1e-6, abs=1e-10)


def test_tt_rel_error_bound_and_float32(x):
    for e in (0.5, 0.1, 0.02, 1e-3):
        cores = tt_svd(x, rel_error=e)
        assert rel(tt_to_full(cores), x) <= e
    x32 = x.float()
    cores = tt_svd(x32, rel_error=0.1, max_rank=3)
    assert all(c.dtype == torch.float32 for c in cores)
    assert max(c.shape[-1] for c in cores) <= 3
    assert rel(tt_to_full(tt_svd(x32, ranks=100)), x32) < 1e-5  # int ranks are clipped, exact


def test_tr_svd_matches_tensorly(x):
    ranks = [2, 3, 4, 5, 2]
    cores = tr_svd(x, ranks=ranks)
    assert [c.shape[0] for c in cores] + [cores[-1].shape[-1]] == ranks
    ref = tl.tr_to_tensor(tensor_ring(x.numpy(), rank=ranks))
    ref_err = np.linalg.norm(ref - x.numpy()) / np.linalg.norm(x.numpy())
    # same algorithm; the split of the first SVD basis into (ring, bond) indices is a convention
    # (tensorly orders it differently), so errors agree closely rather than exactly
    assert rel(tr_to_full(cores), x) <= 1.01 * ref_err
    assert rel(tr_to_full(cores), x) >= 0.9 * ref_err
    assert rel(tr_to_full(tr_svd(x, ranks=[1, 3, 4, 5, 1])), x) == pytest.approx(
        rel(tt_to_full(tt_svd(x, ranks=[1, 3, 4, 5, 1])), x), rel=1e-9)


def test_tr_search_never_worse_than_tt(x):
    torch.manual_seed(1)
    g = [torch.randn(3, n, 3, dtype=torch.float64) for n in (6, 7, 8, 9)]
    ring = tr_to_full(g)
    ring = ring / ring.norm() + 1e-4 * torch.randn_like(ring)
    for t in (x, ring, torch.randn(4, 9, 5, 6, dtype=torch.float64)):
        for e in (0.3, 0.1, 0.01):
            tr = tr_svd(t, rel_error=e)
            assert rel(tr_to_full(tr), t) <= e
            assert storage(tr) <= storage(tt_svd(t, rel_error=e))
            assert [c.shape[1] for c in tr] == list(t.shape)  # original mode order
    # on a true ring the search finds a ring (r0 > 1) that is strictly smaller than TT
    tr = tr_svd(ring, rel_error=1e-3)
    assert tr[0].shape[0] > 1 and storage(tr) < storage(tt_svd(ring, rel_error=1e-3))


def test_tt_project_idempotent_and_near_exact(x):
    for ranks in ([1, 3, 4, 2, 1], 4):
        p = tt_project(x, ranks)
        assert rel(tt_project(p, ranks), p) < 1e-9
        exact = np.linalg.norm(tl.tt_to_tensor(tensor_train(x.numpy(), rank=ranks if isinstance(ranks, list)
                                                            else [1, 4, 4, 4, 1])) - x.numpy())
        assert float((p - x).norm()) <= 1.01 * exact
    # wide unfoldings (randomized / Gram paths) stay within 1% of exact SVD-based TT-SVD
    torch.manual_seed(2)
    w = torch.randn(56, 64, 64) @ torch.diag(torch.logspace(0, -2, 64))
    p = tt_project(w, [1, 16, 24, 1])
    ref = tl.tt_to_tensor(tensor_train(w.double().numpy(), rank=[1, 16, 24, 1]))
    assert float((p - w).norm()) <= 1.01 * np.linalg.norm(ref - w.double().numpy())
    q = tr_project(x, [2, 2, 4, 3, 2])
    assert q.shape == x.shape and rel(q, x) < rel(tt_project(x, 1), x)


@pytest.mark.parametrize("bad,match", [
    (dict(ranks=[1, 2, 1]), "length 5"),
    (dict(ranks=[1, 0, 2, 2, 1]), ">= 1"),
    (dict(ranks=[1, 7, 43, 5, 1]), "exceeds"),
    (dict(ranks=[2, 2, 2, 2, 1]), "boundary"),
    (dict(ranks=0), ">= 1"),
    (dict(ranks=2, rel_error=0.1), "exactly one"),
    (dict(), "exactly one"),
    (dict(rel_error=-1.0), "rel_error"),
])
def test_tt_errors(x, bad, match):
    with pytest.raises(ValueError, match=match):
        tt_svd(x, **bad)


def test_input_errors(x):
    with pytest.raises(ValueError, match="modes"):
        tt_svd(torch.randn(5), ranks=2)
    y = x.clone()
    y[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tt_project(y, 2)
    with pytest.raises(ValueError, match="ring rank"):
        tr_svd(x, ranks=[2, 2, 2, 2, 3])
    with pytest.raises(ValueError, match="exceeds"):
        tr_svd(x, ranks=[3, 3, 2, 2, 3])
    with pytest.raises(ValueError, match="format"):
        allocate_ranks({"a": x}, format="tucker2", compression_ratio=2.0)


def test_tn_params_and_ranks_for_ratio():
    assert tn_params((4, 5, 6), [1, 2, 3, 1]) == 4 * 2 + 2 * 5 * 3 + 3 * 6
    for fmt in ("tt", "tr"):
        r = ranks_for_ratio((8, 8, 9, 8, 8), 4.0, fmt)
        p = tn_params((8, 8, 9, 8, 8), r)
        assert p <= 8 * 8 * 9 * 8 * 8 / 4.0 and p > 8 * 8 * 9 * 8 * 8 / 4.0 / 1.6


def test_allocate_ranks_budget_and_structure():
    torch.manual_seed(3)

    def q(m, n):
        return torch.linalg.qr(torch.randn(m, n)).Q

    # TT rank 8 with (near) flat spectra: orthonormal cores
    g = [q(16, 8).reshape(1, 16, 8), q(128, 8).reshape(8, 16, 8), q(16, 8).T.reshape(8, 16, 1)]
    structured = tt_to_full(g)
    structured = structured / structured.norm() * 64 + 1e-3 * torch.randn(16, 16, 16)
    tensors = {"structured": structured, "random": torch.randn(16, 16, 16),
               "conv": torch.randn(8, 9, 4, 8)}
    flops = {"structured": 1.0, "random": 1.0, "conv": 4.0}
    for fmt in ("tt", "tr"):
        for alloc in ("global", "uniform"):
            for budget in ("params", "flops"):
                for ratio in (3.0, 6.0):
                    r = allocate_ranks(tensors, format=fmt, compression_ratio=ratio, budget=budget,
                                       flops_per_param=flops, allocation=alloc)
                    got = allocation_summary(tensors, r, budget=budget, flops_per_param=flops)["ratio"]
                    assert ratio <= got <= ratio * 1.1, (fmt, alloc, budget, ratio, r, got)
                    assert r["structured"][0] == r["structured"][-1]
    # tight budget: the low-rank tensor gets (close to) its true ranks, the random one far less
    r = allocate_ranks(tensors, format="tt", compression_ratio=10.0)
    assert min(r["structured"][1:-1]) >= 5 and max(r["random"]) <= 2, r


def test_allocate_ranks_params_and_flops_budgets_both_hold():
    torch.manual_seed(5)
    # same shapes, different positions: "early" runs at 16x the positions of "late"
    tensors = {"early": torch.randn(16, 9, 16), "late": torch.randn(16, 9, 16), "mid": torch.randn(8, 9, 32)}
    fpp = {"early": 16.0, "late": 1.0, "mid": 4.0}
    dense_p = sum(t.numel() for t in tensors.values())
    dense_f = sum(t.numel() * fpp[n] for n, t in tensors.items())
    for ratio in (3.0, 6.0):
        r = allocate_ranks(tensors, compression_ratio=ratio, budget="params+flops", flops_per_param=fpp)
        p = {n: tn_params(t.shape, r[n]) for n, t in tensors.items()}
        assert sum(p.values()) <= dense_p / ratio and sum(p.values()) >= dense_p / ratio / 1.15, (ratio, r)
        assert sum(p[n] * fpp[n] for n in p) <= dense_f / ratio, (ratio, r)
        # params alone spends on the layer that costs most FLOPs per param and breaks the FLOPs budget
        r0 = allocate_ranks(tensors, compression_ratio=ratio, budget="params")
        f0 = sum(tn_params(t.shape, r0[n]) * fpp[n] for n, t in tensors.items())
        assert f0 > dense_f / ratio, (ratio, r0)
        assert tn_params((16, 9, 16), r["early"]) < tn_params((16, 9, 16), r0["early"])
    with pytest.raises(ValueError, match="budget='params\\+flops' needs flops_per_param"):
        allocate_ranks(tensors, compression_ratio=3.0, budget="params+flops")
    with pytest.raises(ValueError, match="valid|one of"):
        allocate_ranks(tensors, compression_ratio=3.0, budget="time")


def _decaying(shape, rate, seed):
    """A tensor whose (mode-1) singular values decay as exp(-rate * k)."""
    g = torch.Generator().manual_seed(seed)
    u, _, v = torch.linalg.svd(torch.randn(shape[0], shape[1] * shape[2], generator=g), full_matrices=False)
    return (u @ torch.diag(torch.exp(-rate * torch.arange(shape[0]).float())) @ v).reshape(shape)


def test_allocate_ranks_weights_flops_up_until_the_params_budget_is_spent(monkeypatch):
    import tn_hf.decompositions.ranks as ranks_mod
    # "a" has a fast-decaying spectrum and costs 256 FLOPs per param: at equal weights its steps take
    # the FLOPs budget while params are left; FLOPs weighted up, "b" gets them
    tensors = {"a": _decaying((16, 9, 16), 0.3, 0), "b": _decaying((16, 9, 64), 0.02, 1)}
    fpp = {"a": 256.0, "b": 64.0}
    budget_p = sum(t.numel() for t in tensors.values()) / 8
    budget_f = sum(t.numel() * fpp[n] for n, t in tensors.items()) / 8

    def spent():
        r = allocate_ranks(tensors, compression_ratio=8.0, budget="params+flops", flops_per_param=fpp)
        p = {n: tn_params(t.shape, r[n]) for n, t in tensors.items()}
        return sum(p.values()) / budget_p, sum(p[n] * fpp[n] for n in p) / budget_f
    p, f = spent()
    assert ranks_mod.FILL <= p <= 1.0 and f <= 1.0, (p, f)
    monkeypatch.setattr(ranks_mod, "FILL", 0.0)  # no re-weighting: the equal-weight greedy alone
    p0, f0 = spent()
    assert p0 < 0.9 and f0 <= 1.0, (p0, f0)


def test_randomized_path_close_to_exact(monkeypatch):
    import tn_hf.decompositions.tt as tt_mod
    torch.manual_seed(4)
    w = (torch.randn(64, 96) @ torch.diag(torch.logspace(0, -2, 96)) @ torch.randn(96, 768)).reshape(64, 8, 12, 8)
    exact = float((tt_project(w, [1, 12, 16, 8, 1]) - w).norm())
    monkeypatch.setattr(tt_mod, "_RANDOMIZED_MIN_SIDE", 32)  # force the range finder on 64 x 768
    fast = float((tt_project(w, [1, 12, 16, 8, 1]) - w).norm())
    assert fast <= 1.01 * exact


def test_tr_als_never_worse_and_keeps_a_ring_where_tr_svd_moves_it():
    from tn_hf.decompositions import tr_als
    torch.manual_seed(3)
    t = torch.randn(6, 8, 9, 5, dtype=torch.float64)
    ranks = [2, 3, 5, 4, 2]
    cold = tr_svd(t, ranks=ranks)
    errs = [rel(tr_to_full(cold), t)] + [rel(tr_to_full(tr_als(t, cold, k)), t) for k in (1, 2, 4)]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:])) and errs[-1] < errs[0] - 1e-3, errs
    assert rel(tr_to_full(tr_svd(t, ranks=ranks, sweeps=4)), t) == pytest.approx(errs[-1], rel=1e-9)
    # a tensor that has TR ranks r: TR-SVD at r does not return it, ALS from its own cores does
    ring = [torch.randn(r0, n, r1, dtype=torch.float64) for r0, n, r1 in zip(ranks, t.shape, ranks[1:])]
    p = tr_to_full(ring)
    assert rel(tr_to_full(tr_svd(p, ranks=ranks)), p) > 0.05
    assert rel(tr_to_full(tr_als(p, ring, 1)), p) < 1e-9
    assert rel(tr_project(p, ranks), p) < rel(tr_to_full(tr_svd(p, ranks=ranks)), p)
    with pytest.raises(ValueError, match=r"tr_als: cores .* do not fit a tensor of shape \(6, 8, 9, 5\)"):
        tr_als(t, ring[:-1])
