"""Device-specific code driven without a GPU.

Stand-ins: the meta device (shapes and devices propagate, no data), a default device that differs
from the inputs' (``with torch.device("meta")``: a tensor made without ``device=`` lands there
instead of next to the tensors it meets), and monkeypatched ``torch.cuda`` / ``torch.accelerator``
functions for the branches that call them."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tn_hf
from tn_hf import cost
from tn_hf.decompositions import allocate_ranks, ranks_for_ratio
from tn_hf.layers import TuckerLinear, registry, tn_targets
from tn_hf.layers.hf_conv1d import _HFConv1D
from tn_hf.layers.tucker import share_core


def _dense_and_input_shape(cls):
    """A dense module of the type ``cls`` replaces (on the current default device) and an input shape."""
    t = cls.dense_type
    if issubclass(cls, _HFConv1D):  # transformers' Conv1D (GPT-2): weight (in, out)
        from transformers.pytorch_utils import Conv1D
        return Conv1D(20, 12), (5, 12)
    if t is nn.Linear:
        return nn.Linear(12, 20), (5, 12)
    if t in (nn.LSTM, nn.GRU):
        return t(6, 4, num_layers=2, bidirectional=True, batch_first=True), (3, 2, 6)
    dim = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[t]
    return t(6, 8, 3, stride=2, padding=1), (2, 6, *([5] * dim))


def _outputs(y):
    return list(y[:1]) + list(y[1]) if isinstance(y, tuple) and isinstance(y[1], tuple) else \
        list(y) if isinstance(y, tuple) else [y]


# ----------------------------------------------------------------------------- meta device
@pytest.mark.parametrize("name", sorted(registry))
def test_every_tn_layer_builds_and_runs_on_meta(name):
    cls = registry[name]
    with torch.device("meta"):
        dense, shape = _dense_and_input_shape(cls)
        layer = cls.from_spec(cls.dense_spec(dense, ranks=2))
        x = torch.empty(shape)
    assert all(p.is_meta for p in layer.parameters())
    want = [t.shape for t in _outputs(dense(x))]
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                got = _outputs(layer(x))
            assert [t.shape for t in got] == want, (mode, grad)
            assert all(t.is_meta for t in got)
    for _, leaf in tn_targets(layer):  # the path that never rebuilds the dense weight
        xs = torch.empty(4, leaf.in_features, device="meta") if hasattr(leaf, "in_features") else x
        y = leaf.contract(xs)
        assert y.is_meta and y.shape == leaf.to_dense()(xs).shape
        assert leaf.weight.is_meta and leaf.to_dense().weight.is_meta


@pytest.mark.parametrize("layout", [{"kernel_mode": "in"}, {"pointwise": "gemm"},
                                    {"kernel_mode": "in", "pointwise": "gemm"}])
def test_conv_layouts_run_on_meta(layout):
    with torch.device("meta"):
        dense = nn.Conv2d(6, 8, 3, padding=1)
        layer = registry["TTConv2d"].from_spec(registry["TTConv2d"].dense_spec(dense, ranks=3, **layout))
        x = torch.empty(2, 6, 7, 7)
    for mode in ("train", "eval"):
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                y = getattr(layer, mode)()(x)
            assert y.is_meta and y.shape == (2, 8, 7, 7)


# ----------------------------------------------------------------------------- inputs' device
def test_from_dense_builds_on_the_weights_device_not_the_default():
    torch.manual_seed(0)
    lin, rnn = nn.Linear(12, 20), nn.GRU(6, 4)
    x, seq = torch.randn(3, 12), torch.randn(5, 2, 6)
    ref = {n: registry[n].from_dense(lin, ranks=3) for n in ("TTLinear", "TRLinear", "TuckerLinear")}
    ref_rnn = registry["TTGRU"].from_dense(rnn, ranks=2)
    with torch.device("meta"):
        got = {n: registry[n].from_dense(lin, ranks=3) for n in ref}
        got_rnn = registry["TTGRU"].from_dense(rnn, ranks=2)
        outs = {n: m(x) for n, m in got.items()}
        seq_out = got_rnn(seq)[0]
    for n, m in got.items():
        assert all(p.device.type == "cpu" for p in m.parameters()), n
        torch.testing.assert_close(outs[n], ref[n](x), rtol=0, atol=0)
    assert all(p.device.type == "cpu" for p in got_rnn.parameters())
    torch.testing.assert_close(seq_out, ref_rnn(seq)[0], rtol=0, atol=0)


def test_tucker_shared_core_fit_stays_on_the_cores_device():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    for i in (0, 2):
        net[i] = TuckerLinear.from_dense(net[i], ranks=[2, 2, 2, 2], in_factors=(4, 4), out_factors=(4, 4))
    ref = copy.deepcopy(net)
    share_core(ref)
    with torch.device("meta"):  # an identity made without device= would land on meta, not beside the core
        shared = share_core(net)
    assert shared.device.type == "cpu" and net[0].cores[0] is net[2].cores[0] is shared
    torch.testing.assert_close(shared, ref[0].cores[0], rtol=0, atol=0)


def test_rank_allocation_is_host_math_whatever_the_default_device():
    torch.manual_seed(0)
    tensors = {"a": torch.randn(4, 8, 8), "b": torch.randn(8, 4, 4)}
    want = (ranks_for_ratio((16, 16, 9), 3.0, "tt"), allocate_ranks(tensors, compression_ratio=2.0))
    with torch.device("meta"):
        assert (ranks_for_ratio((16, 16, 9), 3.0, "tt"), allocate_ranks(tensors, compression_ratio=2.0)) == want


def test_compress_keeps_the_model_on_its_device_whatever_the_default():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(),
                        nn.Linear(256, 32), nn.Linear(32, 10))
    x = torch.randn(2, 8, 4, 4)
    ref = copy.deepcopy(net)
    cfg = tn_hf.TNConfig(compression_ratio=2, min_params=0)
    tn_hf.compress(ref, cfg, progress=False)
    with torch.device("meta"):
        tn_hf.compress(net, cfg, progress=False)
    assert net.tn_hf_specs == ref.tn_hf_specs and net.tn_hf_specs
    assert all(p.device.type == "cpu" for p in net.parameters())
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- CUDA-only branches
def test_device_name_asks_cuda_for_the_gpu_name(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: asked.append(torch.device(d)) or "NVIDIA H200")
    cost.device_name.cache_clear()
    try:
        assert cost.device_name(torch.device("cuda", 1)) == "cuda:NVIDIA H200"
        assert asked == [torch.device("cuda", 1)]
        assert cost.device_name(torch.device("cpu")).startswith("cpu:") and len(asked) == 1
    finally:
        cost.device_name.cache_clear()


def test_sync_waits_for_accelerators_only(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda d=None: waited.append(d))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: waited.append(d))
    cost._sync(torch.device("cuda", 1))
    assert [torch.device(d) for d in waited] == [torch.device("cuda", 1)]
    cost._sync(torch.device("cpu"))
    cost._sync(torch.device("meta"))
    assert len(waited) == 1


# ----------------------------------------------------------------------------- benchmarks/gpu_check.py
GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _gpu_check(tmp_path, *args, timeout=60):
    env = dict(os.environ, TN_HF_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=tmp_path)


def test_gpu_check_refuses_to_run_without_cuda(capsys, monkeypatch):
    import importlib.util
    monkeypatch.syspath_prepend(str(GPU_CHECK.parent))
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    with pytest.raises(SystemExit):
        gpu_check.main(["--help"])
    assert "--smoke" in capsys.readouterr().out
    assert gpu_check.main(["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "--device cpu --smoke" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA
    assert gpu_check.main([]) == 2 and "no CUDA device here" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--smoke", "--out", str(GPU_CHECK.parent / "results" / "gpu.md")]) == 2
    assert "smoke results never go to" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_on_cpu(tmp_path):
    results = GPU_CHECK.parent / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("gpu.*")}
    out = tmp_path / "smoke" / "gpu_smoke.md"
    r = _gpu_check(tmp_path, "--device", "cpu", "--smoke", "--models", "videomae", "--repeats", "1", "--out", str(out),
                   timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    data = json.loads(out.with_suffix(".json").read_text())
    (check,) = data["checks"]
    assert check["model"] == "videomae" and check["reload_equal"] is True and "error" not in check
    assert check["default_ratio"] > 2 and check["tuned_ratio"] > 2 and check["train_ratio"] > 2
    assert check["tuned_on"].startswith("cpu:") and math.isfinite(check["train_loss"])
    assert [(row["dtype"], row["batch"]) for row in data["rows"]] == [("float32", 1), ("float32", 2),
                                                                       ("bfloat16", 1), ("bfloat16", 2)]
    assert all(row[k] > 0 for row in data["rows"] for k in ("dense ms", "default plan ms", "tuned plan ms"))
    assert "| videomae | float32 | 1 |" in out.read_text()
    assert {p.name: p.stat().st_mtime_ns for p in results.glob("gpu.*")} == before
