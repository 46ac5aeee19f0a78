"""TNConfig: options that cannot act together are a ValueError naming the conflict and the valid
choices; the rank budget is one explicit choice ("auto", "params", "params+flops", "flops",
"latency"); JSON round trips, and dicts written by earlier versions still load."""
import json
import warnings

import pytest
import torch
from torch import nn

import tn_hf
from tn_hf import TNConfig


class _Net(nn.Module):
    """Convs on a 32x32 and an 8x8 map (a FLOPs budget weighs them differently) and a Linear."""

    def __init__(self, size=(3, 32, 32)):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 64, 3, padding=1)
        self.b = nn.Conv2d(64, 64, 3, padding=1)
        self.c = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128, 256)
        self.fc2 = nn.Linear(256, 10)
        if size is not None:
            self.pretrained_cfg = {"input_size": size}

    def forward(self, x):
        x = self.b(torch.relu(self.a(torch.relu(self.stem(x)))))
        x = self.c(nn.functional.max_pool2d(x, 4))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def _net(size=(3, 32, 32)):
    torch.manual_seed(0)
    return _Net(size).eval()


CONFLICTS = [  # (options, what the message names)
    (dict(format="tucker", compression_ratio=3, budget="latency"),
     r"format='tucker', budget='latency'.*valid budgets for it are 'auto', 'params'"),
    (dict(format="tucker", compression_ratio=3, budget="flops"), r"format='tucker', budget='flops'"),
    (dict(format="bt", compression_ratio=3, budget="params+flops"), r"format='bt', budget='params\+flops'"),
    (dict(format="tucker", compression_ratio=3, allocation="time"),
     r"format='tucker', allocation='time'.*valid allocations for it are 'global', 'uniform'"),
    (dict(format="tucker", ranks=4, kernel_mode="in"),
     r"format='tucker', kernel_mode='in'.*TT/TR convolutions.*leave kernel_mode at 'auto'"),
    (dict(format="tucker", ranks=4, kernel_mode={"a": "own"}), r"format='tucker', kernel_mode=\{'a': 'own'\}"),
    (dict(rel_error=0.1, budget="latency"), r"budget='latency', rel_error=.*leave budget at 'auto'"),
    (dict(rel_error=0.1, allocation="uniform"), r"allocation='uniform', rel_error=.*leave allocation at 'global'"),
    (dict(rel_error=0.1, format="tucker", adaptive_reshape=True), r"adaptive_reshape=True needs compression_ratio"),
    (dict(ranks=4, budget="params"), r"budget='params', ranks=.*give compression_ratio="),
    (dict(ranks=4, allocation="time"), r"allocation='time', ranks="),
    (dict(compression_ratio=3, budget="latency", plan_for_speed=False),
     r"budget='latency', plan_for_speed=False.*'auto', 'params', 'params\+flops', 'flops'"),
    (dict(compression_ratio=3, budget="latency", allocation="uniform"), r"budget='latency', allocation='uniform'"),
    (dict(compression_ratio=3, allocation="time", budget="flops"),
     r"allocation='time', budget='flops'.*budget='auto' or budget='params'"),
    (dict(compression_ratio=3, allocation="time", plan_for_speed=False),
     r"allocation='time', plan_for_speed=False.*allocation='global' or 'uniform'"),
    (dict(compression_ratio=3, allocation="uniform", budget="flops"),
     r"allocation='uniform', budget='flops'.*needs allocation='global'"),
    (dict(compression_ratio=3, max_rank=8), r"max_rank=8.*caps the ranks that rel_error= chooses"),
    (dict(ranks=4, max_rank=8), r"max_rank=8"),
    (dict(ranks=4, compress_hidden=True, layer_types=["linear", "conv"]),
     r"compress_hidden=True, layer_types=\['linear', 'conv'\].*add 'lstm' or 'gru'"),
    (dict(ranks=4, kernel_mode="in", layer_types=["linear"]), r"kernel_mode='in', layer_types=\['linear'\].*'conv'"),
]


@pytest.mark.parametrize("options,message", CONFLICTS)
def test_conflicting_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        TNConfig(**options)


@pytest.mark.parametrize("options", [
    dict(format="tucker", compression_ratio=3), dict(format="tucker", compression_ratio=3, budget="params",
                                                     allocation="uniform"),
    dict(format="bt", ranks=2), dict(rel_error=0.1, max_rank=8), dict(ranks=4, compress_hidden=True),
    dict(ranks=4, compress_hidden=True, layer_types=["gru"]), dict(ranks=4, kernel_mode="in"),
    dict(compression_ratio=3, budget="latency"), dict(compression_ratio=3, allocation="time", budget="params"),
    dict(compression_ratio=3, budget="params+flops"), dict(compression_ratio=3, budget="flops", plan_for_speed=False),
])
def test_options_that_act_together_are_accepted(options):
    cfg = TNConfig(**options)
    assert TNConfig.from_json(cfg.to_json()) == cfg


def test_unknown_budget_names_the_choices():
    with pytest.raises(ValueError, match=r"budget='speed'.*\('auto', 'params', 'params\+flops', 'flops', 'latency'\)"):
        TNConfig(compression_ratio=3, budget="speed")


def _specs(model, **options):
    p = tn_hf.plan(model, TNConfig(compression_ratio=3.0, min_params=2000, **options))
    return p.specs, p.kept_dense


def test_auto_budget_is_params_and_flops_where_the_input_size_is_known():
    auto = _specs(_net())
    assert TNConfig(compression_ratio=3).budget == "auto"
    assert auto == _specs(_net(), budget="params+flops")
    params = _specs(_net(), budget="params")  # params only: the layers on the 32x32 map get more rank
    assert params != auto
    ranks = {n: max(s["ranks"]) for n, s in params[0].items()}
    assert ranks["a"] > max(auto[0]["a"]["ranks"]) or "a" in auto[1]


def test_auto_budget_is_params_where_the_input_size_is_unknown():
    assert _specs(_net(None)) == _specs(_net(None), budget="params")
    # the size given in the config or to plan makes it params+flops again
    assert _specs(_net(None), input_size=[3, 32, 32]) == _specs(_net())
    cfg = TNConfig(compression_ratio=3.0, min_params=2000)
    assert tn_hf.plan(_net(None), cfg, input_size=(3, 32, 32)).specs == _specs(_net())[0]


@pytest.mark.parametrize("options,named", [(dict(allocation="time"), "allocation='time'"),
                                           (dict(budget="flops"), "budget='flops'"),
                                           (dict(budget="params+flops"), r"budget='params\+flops'")])
def test_budgets_that_need_the_input_size_raise_without_one(options, named):
    with pytest.raises(ValueError, match=named + r".*_Net, which declares none.*TNConfig\(input_size="
                                                  r".*tn_hf.plan\(model, config, input_size=\.\.\.\)"):
        tn_hf.plan(_net(None), TNConfig(compression_ratio=3.0, min_params=2000, **options))
    p = tn_hf.plan(_net(None), TNConfig(compression_ratio=3.0, min_params=2000, input_size=[3, 32, 32], **options))
    assert p.specs


@pytest.mark.parametrize("cfg", [
    TNConfig(compression_ratio=2.5, budget="params+flops", allocation="global", input_size=[3, 32, 32]),
    TNConfig(ranks={"a": [1, 4, 4, 1], "fc1": 3}, kernel_mode={"a": "in"}, target_modules="a"),
    TNConfig(format="tucker", rel_error=0.05, max_rank=16, layer_types=["linear"]),
    TNConfig(format="bt", compression_ratio=4, allocation="uniform", budget="params"),
])
def test_json_round_trip(cfg):
    back = TNConfig.from_json(cfg.to_json())
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert json.loads(cfg.to_json()) == cfg.to_dict()


def test_old_dicts_load():
    old = TNConfig(ranks=4).to_dict() | {"budget": "params", "plan_for_speed": True}  # the old defaults
    old.pop("input_size")  # (not written by earlier versions)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old default budget with fixed ranks: read silently
        cfg = TNConfig.from_dict(old)
    assert cfg.ranks == 4 and cfg.budget == "auto" and cfg.plan_for_speed
    ratio = TNConfig.from_dict({"compression_ratio": 3.0, "budget": "params", "plan_for_speed": True})
    assert ratio.budget == "params"
    # options earlier versions accepted and ignored: set to what they did, with a warning naming each
    legacy = {"format": "tucker", "compression_ratio": 3.0, "budget": "latency", "allocation": "time",
              "kernel_mode": {"a": "own"}, "max_rank": 8}
    with pytest.warns(UserWarning) as caught:
        cfg = TNConfig.from_dict(legacy)
    assert (cfg.budget, cfg.allocation, cfg.kernel_mode, cfg.max_rank) == ("auto", "uniform", "auto", None)
    said = " ".join(str(w.message) for w in caught)
    assert all(s in said for s in ("budget='latency'", "allocation='time'", "kernel_mode=", "max_rank=8"))
    with pytest.warns(UserWarning, match="budget='latency', plan_for_speed=False"):
        cfg = TNConfig.from_dict({"compression_ratio": 3.0, "budget": "latency", "plan_for_speed": False})
    assert cfg.plan_for_speed
    with pytest.raises(ValueError, match="allocation='time', budget='flops'"):  # refused then too
        TNConfig.from_dict({"compression_ratio": 3.0, "allocation": "time", "budget": "flops"})


def test_admm_compress_config_is_valid_for_any_planned_config():
    for cfg in (TNConfig(compression_ratio=3.0, min_params=2000, budget="params"),
                TNConfig(format="tucker", compression_ratio=3.0, min_params=2000, allocation="uniform")):
        sched = tn_hf.ADMMScheduler(_net(), cfg)
        fixed = sched.compress_config()
        assert isinstance(fixed.ranks, dict) and fixed.budget == "auto" and fixed.allocation == "global"
        assert (fixed.kernel_mode == "auto") == (cfg.format == "tucker")
