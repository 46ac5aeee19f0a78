"""Whole-model speed of tn_hf-compressed models against the dense model they came from.

    python benchmarks/speed_models.py [--models resnet18,vit_small_patch16_224] [--ratios 3]
        [--batches 1,32] [--train-batch 8] [--compile resnet18] [--threads 2] [--repeats N]

For each model and compression ratio (by parameters over the targets; tn_hf.compress with
allocation="uniform" and plan_for_speed=True: layers kept dense where TN is not faster):
  * eval latency (no_grad) at each batch: dense and TN timed alternately in one process,
    median over repeats, after warm-up (a repeat times calls in a row for at least SAMPLE_SECONDS);
  * one training step (forward + backward + SGD step) at --train-batch, timed the same way;
  * params and forward FLOPs of the whole model at batch 1 (torch.utils.flop_counter);
  * with --compile MODEL: the same eval timing for torch.compile(inductor) of both models.
Models: timm (random init, pretrained=False), tn_hf.demo.SmallCNN (MNIST, 28x28) and a TT-LSTM
video classifier (8 frames of 57600 features -> LSTM(256) -> 10 classes). The device is CUDA
when present (CPU otherwise). Results are merged into benchmarks/results/speed_models.json (one
row per model, ratio, batch, mode) and rendered to speed_models.md with the environment.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plots  # noqa: E402
from _results import environment  # noqa: E402

import tn_hf  # noqa: E402
from tn_hf.demo import SmallCNN  # noqa: E402
from tn_hf.report import is_channels_last  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TIMM = ["resnet18", "resnet50", "convnext_tiny", "efficientnet_b0", "mobilenetv3_large_100",
        "vit_small_patch16_224"]
DEFAULT_RATIO = {"small_cnn": 8.0}


class VideoLSTM(nn.Module):
    """Frames (B, T, 57600) -> LSTM(256) -> last hidden state -> 10 classes (TT-LSTM paper scale)."""

    def __init__(self, features=57600, hidden=256, classes=10, steps=8):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)
        self.pretrained_cfg = {"input_size": (steps, features)}

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def build(name: str) -> nn.Module:
    if name == "small_cnn":
        m = SmallCNN()
        m.pretrained_cfg = {"input_size": (1, 28, 28)}  # input size for the planner's shape probe
        return m
    if name == "tt_lstm":
        return VideoLSTM()
    import timm
    return timm.create_model(name, pretrained=False)


def input_size(model) -> tuple:
    return tuple(model.pretrained_cfg["input_size"])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SAMPLE_SECONDS = 0.05  # each timed sample calls a fn this long at least (sub-millisecond calls jitter)


def alternate(fns, repeats, device, warmup=2) -> list[float]:
    """Median seconds per call of each fn, the fns called in turn within every repeat; a sample runs
    a fn ``n`` times in a row, ``n`` chosen after warm-up so that the slowest fn's sample lasts
    ``SAMPLE_SECONDS`` (1 for calls that long). ``alternate.fastest``: the minima; ``alternate.paired``:
    per fn, the median over repeats of its time over the first fn's time in the same repeat, the ratio
    least moved by load that comes and goes on a shared machine."""
    def timed(f, n):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        sync(device)
        return (time.perf_counter() - t0) / n

    for _ in range(warmup):
        for f in fns:
            f()
    sync(device)
    n = max(1, math.ceil(SAMPLE_SECONDS / max(timed(f, 1) for f in fns)))
    ts = [[] for _ in fns]
    for _ in range(repeats):
        for f, t in zip(fns, ts):
            t.append(timed(f, n))
    alternate.fastest = [min(t) for t in ts]
    alternate.paired = [statistics.median(a / b for a, b in zip(t, ts[0])) for t in ts]
    return [statistics.median(t) for t in ts]


def flops(model, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def eval_fn(model, x):
    def f():
        with torch.no_grad():
            model(x)
    return f


def train_fn(model, x):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def f():
        opt.zero_grad(set_to_none=True)
        y = model(x)
        y.float().square().mean().backward()
        opt.step()
    return f


class _Free(nn.Module):
    """Stands in for a target layer at the least cost it could have: writing a zero output of the
    layer's shape and memory format (the rest of the model then runs on it)."""

    def __init__(self, shape, dtype, device, channels_last):
        super().__init__()
        self.shape, self.dtype, self.device = shape, dtype, device
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, *args, **kwargs):
        return torch.empty(self.shape, dtype=self.dtype, device=self.device, memory_format=self.fmt).zero_()


def floor_model(dense, names, x):
    """A copy of ``dense`` whose target layers cost (almost) nothing: time(floor) / time(dense) bounds
    what any compression of those layers can reach (the rest of the model is not compressed)."""
    outs, hooks = {}, []
    for n in names:
        def hook(m, inp, o, n=n):
            o = o[0] if isinstance(o, tuple) else o
            cl = is_channels_last(o)
            outs[n] = (tuple(o.shape), o.dtype, o.device, cl)
        hooks.append(dense.get_submodule(n).register_forward_hook(hook))
    with torch.no_grad():
        dense(x)
    for h in hooks:
        h.remove()
    free = copy.deepcopy(dense)
    for n, (shape, dtype, device, cl) in outs.items():
        if isinstance(free.get_submodule(n), nn.LSTM):
            return None  # returns a tuple of states; not modelled
        free.set_submodule(n, _Free(shape, dtype, device, cl))
    return free


def _row(base, mode, batch, td, tt):
    return dict(base, mode=mode, batch=batch, ms_dense=td * 1e3, ms_tn=tt * 1e3, time_ratio=alternate.paired[1],
                fastest_ratio=alternate.fastest[1] / alternate.fastest[0])


def run_model(name, ratio, args, device):
    torch.manual_seed(0)
    dense = build(name).to(device).eval()
    cl = args.channels_last and any(p.dim() == 4 for p in dense.parameters())
    if cl:
        dense = dense.to(memory_format=torch.channels_last)  # before compress: the planner times channels-last
    suffix = ", channels_last" if cl else ""
    tn = copy.deepcopy(dense)
    t0 = time.perf_counter()
    cfg = {"benchmark": tn_hf.TNConfig(compression_ratio=ratio, allocation=args.allocation, plan_for_speed=True),
           "defaults": tn_hf.TNConfig(compression_ratio=ratio),
           "size-only": tn_hf.TNConfig(compression_ratio=ratio, plan_for_speed=False),
           "time": tn_hf.TNConfig(compression_ratio=ratio, allocation="time")}[args.config]
    if args.config != "benchmark":
        suffix += f", TNConfig {args.config}"
    report = tn_hf.compress(tn, cfg, progress=False)
    t_compress = time.perf_counter() - t0
    tn.eval()
    kept = [r["name"] for r in report.rows if r.get("kept_dense")]
    size = input_size(dense)

    def randn(b):
        x = torch.randn(b, *size, device=device)
        return x.contiguous(memory_format=torch.channels_last) if cl and x.dim() == 4 else x
    x1 = randn(1)
    base = {"model": name, "ratio": ratio, "params_dense": params(dense), "params_tn": params(tn),
            "flops_dense": flops(dense, x1), "flops_tn": flops(tn, x1),
            "targets": len(report.rows), "kept_dense": len(kept), "compress_s": round(t_compress, 1),
            "two_step_convs": sum(getattr(m, "kernel_mode", "own") == "in" for m in tn.modules()),
            "target_ratio": report.totals["target_ratio"]}
    rows = []
    for b in ([] if args.compile_only else args.batches):
        x = randn(b)
        reps = args.repeats or (15 if b == 1 else 7)
        free = floor_model(dense, [r["name"] for r in report.rows], x)
        fns = [eval_fn(dense, x), eval_fn(tn, x)] + ([eval_fn(free, x)] if free is not None else [])
        td, tt, *tf = alternate(fns, reps, device)
        rows.append(dict(_row(base, "eval" + suffix, b, td, tt), floor_ratio=alternate.paired[2] if tf else None))
        del free
        print(f"{name} {ratio}x eval{suffix} b{b}: dense {td * 1e3:.2f} ms, TN {tt * 1e3:.2f} ms "
              f"({alternate.paired[1]:.2f}x)", flush=True)
    if args.train_batch and not args.compile_only:
        b = args.train_batch
        x = randn(b)
        dense.train()
        tn.train()
        td, tt = alternate([train_fn(dense, x), train_fn(tn, x)], args.train_repeats, device, warmup=1)
        dense.eval()
        tn.eval()
        rows.append(_row(base, "train step" + suffix, b, td, tt))
        print(f"{name} {ratio}x train{suffix} b{b}: dense {td * 1e3:.2f} ms, TN {tt * 1e3:.2f} ms "
              f"({alternate.paired[1]:.2f}x)", flush=True)
    if name in args.compile:
        cd, ct = torch.compile(dense), torch.compile(tn)
        for b in args.batches:
            x = randn(b)
            reps = args.repeats or (15 if b == 1 else 7)
            td, tt = alternate([eval_fn(cd, x), eval_fn(ct, x)], reps, device, warmup=3)
            rows.append(_row(base, "eval, torch.compile" + suffix, b, td, tt))
            print(f"{name} {ratio}x compiled eval b{b}: dense {td * 1e3:.2f} ms, TN {tt * 1e3:.2f} ms "
                  f"({alternate.paired[1]:.2f}x)", flush=True)
    return rows, {"model": name, "ratio": ratio, "layout": "channels_last" if cl else "contiguous",
                  "report": report.to_dict()}


_TARGETS = {  # (model, ratio, batch): max eval time ratio, from the project's speed issues (the
    # deterministic default plan: resnet18 0.8 / 0.55; resnet34/50, convnext_tiny, vit_small, deit_tiny
    # 1.0 / 0.7; the MNIST CNN at 8x 0.7 at batch 32)
    **{(m, 3.0, 32): 0.7 for m in TIMM + ["tt_lstm", "resnet34", "deit_tiny_patch16_224"]},
    **{(m, 3.0, 1): 1.0 for m in TIMM + ["tt_lstm", "resnet34", "deit_tiny_patch16_224"]},
    ("resnet18", 3.0, 32): 0.55, ("resnet18", 3.0, 1): 0.8,
    ("small_cnn", 8.0, 32): 0.7, ("small_cnn", 8.0, 1): 1.0,
}
TARGETS = {(m, r, mode, b): v for (m, r, b), v in _TARGETS.items()
           for mode in ("eval", "eval, channels_last", "eval, TNConfig defaults", "eval, TNConfig time",
                        "eval, channels_last, TNConfig time")}


def _f2(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def render(data) -> str:
    env = data["env"]
    lines = ["# Whole-model speed: tn_hf compressed vs dense", "",
             f"torch {env.get('torch')}, {env.get('threads')} threads of {env.get('cores')} cores, "
             f"device {env.get('device')}"
             f"{', GPU ' + env['gpu'] if env.get('gpu') else ''}; timm {env.get('timm', '-')}. Random init; "
             "tn_hf.compress(TNConfig(compression_ratio=R, allocation=\"uniform\", plan_for_speed=True)): "
             "params budget, "
             "every target at ratio R (random weights have flat spectra, so the global allocation has nothing to "
             "go on), ranks chosen by measured time, layers not faster as TN kept dense and their budget moved "
             "to the others; each conv's layout (kernel_mode \"own\": 1x1 -> kxk -> 1x1, or \"in\": kxk -> 1x1, "
             "the \"two-step convs\") chosen by measured time, and whether its 1x1 stages run as batched matrix "
             "products over the NCHW maps (pointwise=\"gemm\") or by the conv kernel, also by measured time "
             "(the dense model's convs are the stock nn.Conv2d). Rows \"channels_last\": dense and TN models both "
             "converted with model.to(memory_format=torch.channels_last) before compress (the planner then "
             "times layers in that format) and fed channels-last inputs. Eval: no_grad, dense and TN timed "
             "alternately in one process, "
             "15 (batch 1) / 7 (batch 32) repeats, each repeat timing a run of calls at least "
             f"{SAMPLE_SECONDS * 1e3:g} ms long (so sub-millisecond models are timed over many calls); "
             "train step: forward + backward + SGD step. "
             "ms: medians; \"time TN/dense\" (and \"floor\"): the median over repeats of the TN time over the dense "
             "time of the same repeat, the ratio least moved by load that comes and goes on a shared machine; "
             "\"fastest\": ratio of the fastest repeats. "
             "FLOPs: whole model, one sample (torch.utils.flop_counter). Target: the bound set for that row's time "
             "ratio in the project's speed targets.", "",
             "| model | ratio | mode | batch | ms dense | ms TN | time TN/dense | target | fastest TN/dense "
             "| floor | params dense -> TN | GFLOPs dense -> TN | TN layers (two-step convs) / kept dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(TIMM + ["small_cnn", "tt_lstm"])}
    for r in sorted(data["rows"], key=lambda r: (order.get(r["model"], 99), r["ratio"], r["mode"], r["batch"])):
        tgt = TARGETS.get((r["model"], r["ratio"], r["mode"], r["batch"]))
        mark = "-" if tgt is None else f"<= {tgt} {'met' if r['time_ratio'] <= tgt else 'MISSED'}"
        lines.append(
            f"| {r['model']} | {r['ratio']:g} | {r['mode']} | {r['batch']} | {r['ms_dense']:.2f} | {r['ms_tn']:.2f} | "
            f"{r['time_ratio']:.2f} | {mark} | {_f2(r.get('fastest_ratio'))} | {_f2(r.get('floor_ratio'))} | "
            f"{r['params_dense'] / 1e6:.2f}M -> {r['params_tn'] / 1e6:.2f}M | "
            f"{r['flops_dense'] / 1e9:.3f} -> {r['flops_tn'] / 1e9:.3f} | "
            f"{r['targets'] - r['kept_dense']} ({r.get('two_step_convs', '-')}) / {r['kept_dense']} |")
    lstm = any(r["model"] == "tt_lstm" for r in data["rows"])
    lines += ["", ("FLOPs: torch.utils.flop_counter does not count the fused nn.LSTM kernel, so the dense tt_lstm "
                   "model shows 0 (its input projection alone is 2 x 8 x 57600 x 1024 = 0.94 GFLOP per sample). "
                   if lstm else "") +
              "\"floor\": time of the dense model with every target layer (compressed or kept dense) "
              "replaced by a stub that only writes a zero output of the layer's shape, over the dense time: the "
              "part of the model compression does not touch (BatchNorm, activations, pooling, depthwise convs, "
              "stem, head), a lower bound on any time ratio reachable by compressing the targets. "
              "\"kept dense\" layers are those the speed planner measured as not faster as TN (batch 32 ratio "
              ">= 0.9 or batch 1 ratio >= 1.0) or whose TN form would not be smaller.",
              "Rows \"TNConfig defaults\": `tn_hf.compress(model, TNConfig(compression_ratio=R))` as a user calls it "
              "(global allocation: ranks where the weight spectra need them, within the params budget and a FLOPs "
              "budget, params x output positions, at the same ratio; measured planning); \"TNConfig size-only\": "
              "the same with plan_for_speed=False (params budget only) "
              "(size alone decides, the default before measured planning was); \"TNConfig time\": "
              "`TNConfig(compression_ratio=R, allocation=\"time\")`, the same params budget spread over the layers "
              "by measured time (each layer timed at several sizes; the budget goes where it saves the most time).",
              "", "## Layers kept dense (reasons from the compression report)", ""]
    for rep in data.get("reports", []):
        kept = [(row["name"], row["kept_dense"]) for row in rep["report"]["rows"] if row.get("kept_dense")]
        if kept:
            lines.append(f"- {rep['model']} at {rep['ratio']:g}x ({rep.get('layout', 'contiguous')}, "
                         f"{rep.get('config', 'benchmark')} config): " + "; ".join(f"`{n}`: {w}" for n, w in kept[:6])
                         + (f"; ... ({len(kept) - 6} more)" if len(kept) > 6 else ""))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(TIMM + ["small_cnn", "tt_lstm"]))
    ap.add_argument("--ratios", default="", help="comma list; default 3 (small_cnn: 8)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-repeats", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=0)
    ap.add_argument("--compile", default="", help="comma list of models also timed under torch.compile")
    ap.add_argument("--compile-only", action="store_true", help="only the torch.compile timings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--allocation", default="uniform", choices=["uniform", "global"])
    ap.add_argument("--config", choices=("benchmark", "defaults", "size-only", "time"), default="benchmark",
                    help="benchmark: uniform allocation, measured planning; defaults: TNConfig(compression_ratio=R) "
                         "as a user calls it; size-only: the same with plan_for_speed=False (rows suffixed)")
    ap.add_argument("--channels-last", action="store_true",
                    help="dense and TN models in channels-last memory format (rows 'eval, channels_last')")
    ap.add_argument("--out", default=str(RESULTS / "speed_models.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.compile = [m for m in args.compile.split(",") if m]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"rows": [], "reports": []}
    data["env"] = environment(device)
    for name in [m for m in args.models.split(",") if m]:
        ratios = [float(r) for r in args.ratios.split(",") if r] or [DEFAULT_RATIO.get(name, 3.0)]
        for ratio in ratios:
            rows, rep = run_model(name, ratio, args, device)
            done = {(r["mode"], r["batch"]) for r in rows}
            data["rows"] = [r for r in data["rows"] if not (r["model"] == name and r["ratio"] == ratio
                                                            and (r["mode"], r["batch"]) in done)] + rows
            data["reports"] = [r for r in data["reports"] if not (r["model"] == name and r["ratio"] == ratio
                                                                  and r.get("layout", "contiguous") == rep["layout"]
                                                                  and r.get("config", "benchmark") == args.config)]
            rep["config"] = args.config
            data["reports"].append(rep)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, indent=1))
            out.with_suffix(".md").write_text(render(data))
    plots.draw(out, like="speed_models")
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
