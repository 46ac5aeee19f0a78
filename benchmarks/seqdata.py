"""Real sequence classification sets that ship inside sktime, as (train, test) DataLoaders of
``(batch, time, channels)`` float tensors, normalised with the training set's statistics.

* ``basicmotions``: BasicMotions, 6-channel accelerometer / gyroscope series of length 100,
  4 activities, 40 train / 40 test (one test series = 2.5 points);
* ``vowels``: JapaneseVowels, 12 LPC cepstrum channels of 9 speakers saying /ae/, lengths 7-29
  (zero-padded at the front, so the last step is always real), 9 classes, 270 train / 370 test;
* ``italypower``: ItalyPowerDemand, univariate daily load curves of length 24, 2 classes
  (winter / summer), 67 train / 1029 test.
"""
from __future__ import annotations

import numpy as np
import torch

from tn_hf.extras import require

# name: (loader function in sktime.datasets, batch size); channels and classes come from the data
SETS = {"basicmotions": ("load_basic_motions", 8), "vowels": ("load_japanese_vowels", 16),
        "italypower": ("load_italy_power_demand", 16)}


def _arrays(name: str, split: str):
    load = getattr(require("sktime.datasets", f"the {name} benchmark"), SETS[name][0])
    if name != "vowels":
        X, y = load(return_type="numpy3D", split=split)
        return np.asarray(X, dtype=np.float32), np.asarray(y)
    X, y = load(return_type="nested_univ", split=split)   # unequal lengths: pad at the front to 29
    out = np.zeros((len(X), X.shape[1], 29), dtype=np.float32)
    for i in range(len(X)):
        for c in range(X.shape[1]):
            s = np.asarray(X.iloc[i, c], dtype=np.float32)
            out[i, c, 29 - len(s):] = s
    return out, np.asarray(y)


def loaders(name: str, seed: int):
    """(train loader shuffled by ``seed``, test loader, channels, classes) of the set ``name``."""
    if name not in SETS:
        raise ValueError(f"unknown sequence set {name!r}; valid: {sorted(SETS)}")
    X, y = _arrays(name, "train")
    Xt, yt = _arrays(name, "test")
    classes = sorted(set(y))
    mu, sd = X.mean(axis=(0, 2), keepdims=True), X.std(axis=(0, 2), keepdims=True) + 1e-6

    def ds(a, b):
        x = torch.as_tensor(((a - mu) / sd).transpose(0, 2, 1), dtype=torch.float32)
        return torch.utils.data.TensorDataset(x, torch.as_tensor(np.array([classes.index(v) for v in b])))
    g = torch.Generator().manual_seed(seed)
    return (torch.utils.data.DataLoader(ds(X, y), batch_size=SETS[name][1], shuffle=True, generator=g),
            torch.utils.data.DataLoader(ds(Xt, yt), batch_size=512), X.shape[1], len(classes))
