"""The plan is a value: deterministic (``tn_hf.plan``), measured only on request (``tn_hf.tune``), JSON,
and what compress / ADMMScheduler / ADMMTTCallback / the CLI take. Nothing touches the caller's RNG."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from nets import ConvNet
from torch import nn

import tn_hf
from tn_hf import cost
from tn_hf.plans import Plan, PlanError

CFG = tn_hf.TNConfig(compression_ratio=3.0, min_params=4000)


def _net(seed=0):
    torch.manual_seed(seed)
    return ConvNet(hw=16).eval()


_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import tn_hf
    from test_plan import _net, CFG
    print(tn_hf.plan(_net(), CFG).to_json())
""")


def test_the_same_plan_in_processes_with_other_thread_counts_and_caches(tmp_path):
    outs = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads, TN_HF_CACHE=str(tmp_path / f"cache{threads}"))
        r = subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=os.path.dirname(__file__))],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout)
    assert outs[0] == outs[1]
    assert Plan.from_json(outs[0]) == tn_hf.plan(_net(), CFG)  # and in this process
    assert not list(tmp_path.rglob("*.json"))  # the deterministic plan times and caches nothing


def test_plan_times_nothing(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the deterministic plan must not time anything")
    monkeypatch.setattr(cost, "measure_pair", fail)
    p = tn_hf.plan(_net(), CFG)
    assert p.tuned is None and set(p.specs) | set(p.kept_dense) == {"a", "b", "fc1"}


@pytest.mark.parametrize("what", ["plan", "compress", "admm", "tune"])
def test_the_callers_random_stream_is_untouched(what, monkeypatch):
    monkeypatch.setattr(cost, "MIN_SECONDS", 0.0)
    m = _net()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    if what == "plan":
        tn_hf.plan(m, CFG)
    elif what == "compress":
        tn_hf.compress(m, CFG, progress=False)
    elif what == "admm":
        tn_hf.ADMMScheduler(m, CFG, total_steps=10)
    else:
        tn_hf.tune(m, CFG, batch_sizes=(1, 2))
    assert torch.equal(torch.rand(3), expected)


def test_plan_json_round_trip_and_compress_takes_it(tmp_path):
    p = tn_hf.plan(_net(), CFG)
    path = p.save(tmp_path / "plans" / "p.json")
    assert path.read_text() == p.to_json() and json.loads(path.read_text())["plan_version"] == 1
    back = Plan.load(path)
    assert back == p and back.config == CFG
    m1, m2 = _net(), _net()
    tn_hf.compress(m1, CFG, progress=False)
    tn_hf.compress(m2, back, progress=False)
    assert m1.tn_hf_specs == m2.tn_hf_specs
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(m1(x), m2(x), rtol=0, atol=0)
    assert not [f for f in os.listdir(tmp_path / "plans") if f != "p.json"]  # no temporary file left


def test_a_plan_for_another_model_is_refused():
    p = tn_hf.plan(_net(), CFG)
    other = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    with pytest.raises(PlanError, match="targets 'a', which Sequential does not have"):
        tn_hf.compress(other, p, progress=False)
    wider = _net()
    wider.b = nn.Conv2d(64, 32, 3, padding=1)
    with pytest.raises(PlanError,
                       match=r"module .b. \(Conv2d\) does not fit its spec: out_channels=64 in the plan, 32"):
        tn_hf.compress(wider, p, progress=False)
    assert type(wider.a) is nn.Conv2d  # nothing swapped


@pytest.mark.parametrize("text,match", [
    ("[]", "a plan is a JSON object"),
    ('{"plan_version": 1, "config": {"compression_ratio": 3}, "specs": {}, "extra": 1}', "unknown keys"),
    ('{"plan_version": 99, "config": {"compression_ratio": 3}, "specs": {}}', "plan_version 99"),
    ('{"plan_version": 1, "config": {"compression_ratio": 0.5}, "specs": {}}', "bad 'config'"),
    ('{"plan_version": 1, "config": {"compression_ratio": 3}, "specs": {"a": 1}}', "'specs' must map"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
])
def test_bad_plan_files_raise_a_plan_error(tmp_path, text, match):
    f = tmp_path / "p.json"
    f.write_text(text)
    with pytest.raises(PlanError, match=match):
        Plan.load(f)


def test_missing_plan_file():
    with pytest.raises(FileNotFoundError, match="no plan file"):
        Plan.load("/nonexistent/plan.json")


def test_admm_trains_for_the_plan_and_the_callback_takes_one():
    p = tn_hf.plan(_net(), tn_hf.TNConfig(compression_ratio=3.0, min_params=4000, allocation="uniform"))
    m = _net()
    sched = tn_hf.ADMMScheduler(m, p, total_steps=5)
    leaf = {n: s["ranks"] for n, s in p.specs.items()}
    assert sched.ranks == leaf and sched.plan == p
    assert not [k for k in vars(m) if k.startswith("tn_hf")]
    sched.compress(progress=False)
    assert {n: m.get_submodule(n).ranks for n in leaf} == leaf
    cb = tn_hf.ADMMTTCallback(p)
    assert cb.config is p


def _fake_measure(monkeypatch, slow: str):
    """Measured times: the TN form of module class/channels ``slow`` 1.5x dense, the others 0.5x."""
    def measure(modules, shape, device, dtype, **kw):
        tn = modules[0]
        return [1.5 if getattr(tn, "in_channels", None) == 16 and slow == "a" else 0.5, 1.0]
    monkeypatch.setattr(cost, "measure_pair", measure)


def test_tune_measures_and_records_what_it_was_tuned_on(monkeypatch, tmp_path):
    _fake_measure(monkeypatch, "a")
    cfg = tn_hf.TNConfig(compression_ratio=3.0, min_params=4000, allocation="uniform")
    p = tn_hf.tune(_net(), cfg, batch_sizes=(32, 1, 1), dtype=torch.float32, cache=tmp_path / "c.json")
    assert p.tuned["batch_sizes"] == [1, 32] and p.tuned["dtype"] == "float32"
    assert p.tuned["device"].startswith("cpu:") and p.tuned["threads"] == torch.get_num_threads()
    assert list(p.kept_dense) == ["a"] and p.kept_dense["a"].startswith("TN not faster (1.50x")
    assert (tmp_path / "c.json").is_file()
    back = Plan.from_json(p.to_json())
    assert back == p and "tuned on cpu:" in back.summary()
    m = _net()
    tn_hf.compress(m, back, progress=False)
    assert type(m.a) is nn.Conv2d and not isinstance(m.b, nn.Conv2d)


def test_tune_needs_a_ratio_and_valid_batches():
    with pytest.raises(ValueError, match="nothing to measure"):
        tn_hf.tune(_net(), tn_hf.TNConfig(ranks=4))
    with pytest.raises(ValueError, match="batch_sizes"):
        tn_hf.tune(_net(), CFG, batch_sizes=(0,))


@pytest.mark.parametrize("content", [
    '{"version": 2, "times": {"a": 5}}', "null", '{"version": 2, "times": {"k": [0, 1]}}',
    '{"version": 2, "times": {"k": [NaN, 1]}}', '{"version": 2, "times": {"k": [-1, 1]}}', "{not json",
])
def test_a_corrupt_timing_cache_is_ignored_with_a_warning(tmp_path, content, caplog):
    path = tmp_path / "cost.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="tn_hf.cost"):
        cm = cost.CostModel(path)
    assert cm.table == {}
    assert str(path) in caplog.text


def test_a_bad_entry_does_not_drop_the_good_ones(tmp_path, caplog):
    path = tmp_path / "cost.json"
    path.write_text('{"version": 2, "times": {"good": [0.5, 1.0], "bad": [null, 1]}}')
    with caplog.at_level(logging.WARNING, logger="tn_hf.cost"):
        assert cost.CostModel(path).table == {"good": (0.5, 1.0)}
    assert "1 bad entries" in caplog.text


@pytest.mark.parametrize("where", ["file_in_the_way", "read_only"])
def test_tune_works_where_the_cache_cannot_be_written(monkeypatch, tmp_path, where, caplog):
    if where == "read_only" and os.geteuid() == 0:
        folder = tmp_path / "blocked"
        folder.write_text("a file where the folder should be")  # root ignores permissions: block it another way
        cache = folder / "sub" / "cost.json"
    elif where == "read_only":
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        cache = folder / "cost.json"
    else:
        (tmp_path / "cost.json").mkdir()  # a folder where the file should be
        cache = tmp_path / "cost.json"
    _fake_measure(monkeypatch, "a")
    with caplog.at_level(logging.WARNING, logger="tn_hf.cost"):
        p = tn_hf.tune(_net(), tn_hf.TNConfig(compression_ratio=3.0, min_params=4000, allocation="uniform"),
                       cache=cache)
    assert list(p.kept_dense) == ["a"] and "cannot write the timing cache" in caplog.text


def test_cli_compress_saves_and_reuses_a_plan(tmp_path, monkeypatch, capsys):
    from tn_hf import cli

    monkeypatch.setattr(cli, "load_source", lambda source, **kw: (_net(), None))
    plan_file = tmp_path / "plan.json"
    assert cli.main(["compress", "x", "--ratio", "3", "--dry-run", "--save-plan", str(plan_file)]) == 0
    saved = Plan.load(plan_file)
    assert saved == tn_hf.plan(_net(), tn_hf.TNConfig(compression_ratio=3.0))
    assert cli.main(["compress", "x", "--plan", str(plan_file), "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert set(config["tn_hf"]["specs"]) == set(saved.specs)
    capsys.readouterr()
    assert cli.main(["compress", "x", "--plan", str(plan_file), "--ratio", "3", "--dry-run"]) == 2
    assert "not both" in capsys.readouterr().err


def test_keep_rng_saves_the_generators_of_the_devices_the_model_is_on(monkeypatch):
    """CUDA stand-in: a model whose parameters say they are on cuda:1 gets that device's generator saved
    and restored too (torch.random.fork_rng with device_type="cuda"); a CPU model only the CPU's."""
    from tn_hf.layers.base import keep_rng
    seen = []
    monkeypatch.setattr(torch.random, "fork_rng", lambda **kw: seen.append(kw) or "ctx")

    class _P:
        device = torch.device("cuda", 1)

    class _Model:
        def parameters(self):
            return iter([_P(), _P()])
    assert keep_rng(_Model()) == "ctx" and seen[-1] == {"devices": [1], "device_type": "cuda"}
    keep_rng(_net())
    assert seen[-1] == {"devices": []}
