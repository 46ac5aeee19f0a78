"""ADMM-TT/TR vs direct decomposition of an LSTM classifier on sktime's BasicMotions (real sensor data).

BasicMotions: 40 train / 40 test multivariate series (6 channels: accelerometer + gyroscope, length
100), 4 activities. Model: LSTM(6 -> 64) + linear head on the last hidden state; the LSTM is the
target with its input and hidden matrices in TN form (compress_hidden=True). Arms as in
admm_common.py at equal total epochs. Results: benchmarks/results/admm_lstm.json / .md.

    python benchmarks/admm_lstm.py --formats tt --ratios 4 8 16 --seeds 0 1 2
"""
import os

import admm_common as C
import plots
import torch
from torch import nn

from tn_hf import TNConfig, demo

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "admm_lstm")
DENSE_EPOCHS, ADMM_EPOCHS, FT_EPOCHS, LR, BATCH = 40, 20, 10, 5e-3, 8


class LSTMNet(nn.Module):
    def __init__(self, n_in=6, hidden=64, n_cls=4):
        super().__init__()
        self.lstm = nn.LSTM(n_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_cls)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def loaders(seed: int):
    import numpy as np

    from tn_hf.extras import require
    load_basic_motions = require("sktime.datasets", "the BasicMotions benchmark").load_basic_motions
    X, y = load_basic_motions(return_type="numpy3D", split="train")
    Xt, yt = load_basic_motions(return_type="numpy3D", split="test")
    classes = sorted(set(y))
    mu, sd = X.mean(axis=(0, 2), keepdims=True), X.std(axis=(0, 2), keepdims=True) + 1e-6

    def ds(a, b):
        x = torch.as_tensor(((a - mu) / sd).transpose(0, 2, 1), dtype=torch.float32)
        return torch.utils.data.TensorDataset(x, torch.as_tensor(np.array([classes.index(v) for v in b])))
    g = torch.Generator().manual_seed(seed)
    return (torch.utils.data.DataLoader(ds(X, y), batch_size=BATCH, shuffle=True, generator=g),
            torch.utils.data.DataLoader(ds(Xt, yt), batch_size=40))


INTRO = (f"Data: sktime BasicMotions (real accelerometer/gyroscope series, 40 train / 40 test, 4 classes; one "
         f"test sample = 2.5 points). Model: LSTM(6 -> 64) + head, trained {DENSE_EPOCHS} epochs per seed (Adam "
         f"lr {LR}, cosine, batch {BATCH}). Target: the LSTM, input and hidden matrices in TN form "
         f"(compress_hidden=True). Arms as in admm_common.py: direct = decomposition + "
         f"{ADMM_EPOCHS + FT_EPOCHS} epochs fine-tune; ADMM = {ADMM_EPOCHS} epochs ADMM (default or tuned), "
         f"decomposition, {FT_EPOCHS} epochs fine-tune. `python benchmarks/admm_lstm.py`.")


def main():
    a = C.grid_parser().parse_args()
    path, data = C.start(OUT)
    for seed in a.seeds:
        tl, te = loaders(seed)
        torch.manual_seed(seed)
        dense = LSTMNet()
        demo.train(dense, tl, DENSE_EPOCHS, lr=LR, progress=False)
        data["dense"][str(seed)] = {"acc": demo.evaluate(dense, te), "params": demo.n_params(dense)}
        for fmt in a.formats:
            for ratio in a.ratios:
                key = f"{fmt}|{ratio:g}|{seed}"
                if key in data["cells"]:
                    continue
                cfg = TNConfig(format=fmt, compression_ratio=ratio, compress_hidden=True, allocation="uniform")
                torch.manual_seed(1000 + seed)
                cell = C.run_cell(dense, tl, te, cfg, admm_epochs=ADMM_EPOCHS, ft_epochs=FT_EPOCHS, lr=LR)
                data["cells"][key] = cell
                print(key, {k: cell[k] for k in C.ARMS}, flush=True)
                C.save(path, data)
    C.save(path, data)
    with open(OUT + ".md", "w") as f:
        f.write(C.render(data, "ADMM vs direct decomposition, TT/TR-LSTM on BasicMotions (benchmarks/admm_lstm.py)",
                         INTRO))
    plots.draw(path)


if __name__ == "__main__":
    main()
