"""ADMM vs direct decomposition of an LSTM classifier on real sequence data that sktime ships.

``--data vowels`` (default): JapaneseVowels, 12 channels, 9 speakers, 270 train / 370 test;
``--data basicmotions``: BasicMotions, 6-channel accelerometer / gyroscope series, 4 activities,
40 train / 40 test (see seqdata.py). Model: LSTM(channels -> 64) + linear head on the last hidden
state; the LSTM is the target with its input and hidden matrices in TN form (compress_hidden=True).
Arms as in admm_common.py at equal total epochs. Results: benchmarks/results/admm_lstm_<data>.json / .md.

    python benchmarks/admm_lstm.py --data vowels --formats tt tr tucker bt --ratios 8 16 32 --seeds 0 1 2
"""
import os

import admm_common as C
import plots
import seqdata
import torch
from torch import nn

from tn_hf import TNConfig, demo

HERE = os.path.dirname(os.path.abspath(__file__))
# data: (dense epochs, ADMM epochs, fine-tune epochs after ADMM); Adam lr 5e-3 for all
EPOCHS = {"vowels": (60, 20, 10), "basicmotions": (100, 20, 10)}
LR = 5e-3


class LSTMNet(nn.Module):
    def __init__(self, n_in=6, hidden=64, n_cls=4):
        super().__init__()
        self.lstm = nn.LSTM(n_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_cls)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def intro(data: str) -> str:
    dense, admm, ft = EPOCHS[data]
    return (f"Data: sktime's {data} (seqdata.py). Model: LSTM(channels -> 64) + head, trained {dense} epochs per "
            f"seed (Adam lr {LR}, cosine). Target: the LSTM, input and hidden matrices in TN form "
            f"(compress_hidden=True), allocation='uniform'. Arms as in admm_common.py: direct = decomposition + "
            f"{admm + ft} epochs fine-tune (at lr and at lr/10, the better counts); ADMM = {admm} epochs ADMM at "
            f"the scheduler's defaults, decomposition, {ft} epochs fine-tune at lr/10 (and at lr, shown). "
            f"`python benchmarks/admm_lstm.py --data {data}`.")


def main():
    ap = C.grid_parser()
    ap.add_argument("--data", default="vowels", choices=sorted(EPOCHS))
    a = ap.parse_args()
    out = os.path.join(HERE, "results", f"admm_lstm_{a.data}")
    path, data = C.start(out)
    dense_epochs, admm_epochs, ft_epochs = EPOCHS[a.data]
    for seed in a.seeds:
        tl, te, n_in, n_cls = seqdata.loaders(a.data, seed)
        torch.manual_seed(seed)
        dense = LSTMNet(n_in, 64, n_cls)
        demo.train(dense, tl, dense_epochs, lr=LR, progress=False)
        data["dense"][str(seed)] = {"acc": demo.evaluate(dense, te), "params": demo.n_params(dense)}
        for fmt in a.formats:
            for ratio in a.ratios:
                key = f"{fmt}|{ratio:g}|{seed}"
                if key in data["cells"]:
                    continue
                cfg = TNConfig(format=fmt, compression_ratio=ratio, compress_hidden=True, allocation="uniform")
                torch.manual_seed(1000 + seed)
                cell = C.run_cell(dense, tl, te, cfg, admm_epochs=admm_epochs, ft_epochs=ft_epochs, lr=LR)
                data["cells"][key] = cell
                print(key, {k: cell[k] for k in C.ARMS}, flush=True)
                C.save(path, data)
    C.save(path, data)
    with open(out + ".md", "w") as f:
        f.write(C.render(data, f"ADMM vs direct decomposition, LSTM on {a.data} (benchmarks/admm_lstm.py)",
                         intro(a.data)))
    plots.draw(path)


if __name__ == "__main__":
    main()
