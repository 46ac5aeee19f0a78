"""Every tn_hf path on a CUDA GPU, in one command.

    python benchmarks/gpu_check.py [--repeats 20] [--out benchmarks/results/gpu.md]
    python benchmarks/gpu_check.py --device cpu --smoke --out /tmp/gpu_smoke.md   # the same steps, tiny, on CPU

For timm resnet18 and vit_small_patch16_224 (pretrained=False) and a small VideoMAE
(transformers VideoMAEForVideoClassification from a small VideoMAEConfig), on the device:
  1. compress at the defaults, TNConfig(compression_ratio=3) (the deterministic plan);
  2. tn_hf.tune(model, cfg, device=..., batch_sizes=(1, 32), dtype=torch.float16) and compress with
     the tuned plan;
  3. a few transformers Trainer steps with tn_hf.ADMMTTCallback(cfg) under bf16 autocast
     (TrainingArguments(bf16=True)), which compresses the model at the end;
  4. tn_hf.save_pretrained / tn_hf.from_pretrained of the compressed model: outputs equal;
  5. eval latency of dense, compressed (default plan) and compressed (tuned plan) at batch 1 and 32
     in fp16 and bf16: median over --repeats of the mean time per call, device synchronised around
     each repeat (torch.accelerator.synchronize + perf_counter).
Writes a markdown table with the device name and torch version (and the same data as JSON next to
it) to benchmarks/results/gpu.md. Without CUDA it exits with status 2, unless given
``--device cpu --smoke``: tiny models (timm test_resnet / test_vit, a 2-layer VideoMAE), batch 1
and 2, fp32 and bf16, written only where --out says. The exit status is 1 when a check fails.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, environment, write  # noqa: E402

import tn_hf  # noqa: E402

DEFAULT_OUT = RESULTS / "gpu.md"
CFG = tn_hf.TNConfig(compression_ratio=3)
NUM_LABELS = 4


# ----------------------------------------------------------------------------- models
def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm
        return timm.create_model(name, pretrained=False, num_classes=NUM_LABELS, **kw)
    return build


def _videomae(smoke: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import VideoMAEConfig, VideoMAEForVideoClassification
        size = dict(image_size=32, num_frames=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=256) if smoke else \
            dict(image_size=112, num_frames=8, hidden_size=384, num_hidden_layers=4, num_attention_heads=6,
                 intermediate_size=1536)
        return VideoMAEForVideoClassification(VideoMAEConfig(patch_size=16, tubelet_size=2, num_labels=NUM_LABELS,
                                                             **size))
    return build


def models(smoke: bool) -> dict[str, Callable[[], nn.Module]]:
    if smoke:
        return {"test_resnet": _timm("test_resnet"), "test_vit": _timm("test_vit"), "videomae": _videomae(True)}
    return {"resnet18": _timm("resnet18"), "vit_small_patch16_224": _timm("vit_small_patch16_224"),
            "videomae": _videomae(False)}


def is_video(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "num_frames")


def example(model: nn.Module, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An input batch for ``model`` (seeded: every variant of a model sees the same numbers)."""
    g = torch.Generator().manual_seed(batch)
    if is_video(model):
        c = model.config
        shape: tuple[int, ...] = (batch, c.num_frames, c.num_channels, c.image_size, c.image_size)
    else:
        shape = (batch, *model.pretrained_cfg["input_size"])
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x) if not is_video(model) else model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out


# ----------------------------------------------------------------------------- steps
def sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


@torch.inference_mode()
def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int, calls: int) -> float:
    """Median over ``repeats`` of the mean milliseconds per call (``calls`` calls per repeat)."""
    for _ in range(3):
        logits(model, x)
    samples = []
    for _ in range(repeats):
        sync(x.device)
        t0 = time.perf_counter()
        for _ in range(calls):
            logits(model, x)
        sync(x.device)
        samples.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(samples)


class _Clips(torch.utils.data.Dataset):
    def __init__(self, model: nn.Module, n: int):
        self.x = example(model, n, torch.device("cpu"), torch.float32)
        self.y = torch.arange(n) % NUM_LABELS
        self.key = "pixel_values" if is_video(model) else "x"

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {self.key: self.x[i], "labels": self.y[i]}


def train_steps(model: nn.Module, device: torch.device, steps: int, batch: int, out_dir: str) -> dict:
    """``steps`` Trainer steps with ADMMTTCallback(CFG) under bf16 autocast; the callback compresses
    the model at the end. Returns the last loss and the compressed model's ratio."""
    from transformers import Trainer, TrainingArguments

    def loss_fn(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        out = outputs.logits if hasattr(outputs, "logits") else outputs
        return nn.functional.cross_entropy(out.float(), labels)

    cb = tn_hf.ADMMTTCallback(CFG, progress=False)
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=1e-4, bf16=True, use_cpu=device.type == "cpu", report_to=[],
                             disable_tqdm=True, logging_steps=1, save_strategy="no", remove_unused_columns=False,
                             dataloader_pin_memory=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Clips(model, steps * batch), callbacks=[cb],
                      compute_loss_func=None if is_video(model) else loss_fn)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"loss": losses[-1] if losses else float("nan"), "ratio": ratio(cb.report)}


def reload_equal(model: nn.Module, device: torch.device, out_dir: str) -> bool:
    """save_pretrained, from_pretrained, and the same logits (exactly) on the device."""
    model.eval()
    tn_hf.save_pretrained(model, out_dir)
    loaded = tn_hf.from_pretrained(out_dir).to(device).eval()
    x = example(model, 2, device, torch.float32)
    with torch.no_grad():
        return torch.equal(logits(model, x), logits(loaded, x))


def ratio(report: Any) -> float | None:
    """The compressed model's size ratio (whole model, dense params / stored params)."""
    return report.totals.get("model_ratio") if report is not None else None


def check_model(name: str, build: Callable[[], nn.Module], device: torch.device, *, smoke: bool, repeats: int,
                work: str) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    dense = build().to(device).eval()
    summary: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in dense.parameters())}
    default = copy.deepcopy(dense)
    t0 = time.perf_counter()
    summary["default_ratio"] = ratio(tn_hf.compress(default, CFG, progress=False))
    summary["compress_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = (1, 2) if smoke else (1, 32)
    plan = tn_hf.tune(dense, CFG, device=device, batch_sizes=batches,
                      dtype=torch.float32 if smoke else torch.float16)
    summary["tune_s"] = time.perf_counter() - t0
    tuned = copy.deepcopy(dense)
    summary["tuned_ratio"] = ratio(tn_hf.compress(tuned, plan, progress=False))
    summary["tuned_on"] = (plan.tuned or {}).get("device")
    trained = build().to(device)
    summary.update({f"train_{k}": v for k, v in train_steps(trained, device, 2 if smoke else 4, 2 if smoke else 8,
                                                             f"{work}/{name}-train").items()})
    summary["reload_equal"] = reload_equal(default, device, f"{work}/{name}-saved")
    rows = []
    dtypes = (torch.float32, torch.bfloat16) if smoke else (torch.float16, torch.bfloat16)
    for dtype in dtypes:
        variants = {v: copy.deepcopy(m).to(dtype).eval() for v, m in
                    (("dense", dense), ("default plan", default), ("tuned plan", tuned))}
        for b in batches:
            x = example(dense, b, device, dtype)
            ms = {v: latency_ms(m, x, repeats, 1 if smoke else 10) for v, m in variants.items()}
            rows.append({"model": name, "dtype": str(dtype).removeprefix("torch."), "batch": b,
                         **{f"{v} ms": t for v, t in ms.items()},
                         "default x": ms["default plan"] / ms["dense"], "tuned x": ms["tuned plan"] / ms["dense"]})
    return rows, summary


# ----------------------------------------------------------------------------- report
def render(rows: list[dict], summaries: list[dict], env: dict) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, bool) or v is None:
            return str(v)
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    def table(items: list[dict]) -> list[str]:
        if not items:
            return []
        keys = list(dict.fromkeys(k for r in items for k in r))
        return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                *["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in items]]

    head = [f"# tn_hf on {env['device']}", "",
            f"torch {env['torch']}, tn_hf {env['tn_hf']}, TNConfig(compression_ratio=3); eval latency: median of "
            "repeats, ms per call; `x`: compressed / dense.", ""]
    return "\n".join(head + table(rows) + ["", "## Checks", ""] + table(summaries)) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu with --smoke")
    ap.add_argument("--smoke", action="store_true", help="tiny models and batches: checks the script itself")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"markdown file to write (default {DEFAULT_OUT.relative_to(RESULTS.parents[1])} on CUDA; "
                         "smoke runs write only here)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--models", default=None, help="comma-separated subset of the models")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.smoke:
        print(f"gpu_check: needs a CUDA device (got --device {args.device}); for a check of the script itself "
              "run: python benchmarks/gpu_check.py --device cpu --smoke", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a CUDA machine, or "
              "check the script with: python benchmarks/gpu_check.py --device cpu --smoke", file=sys.stderr)
        return 2
    out = args.out if args.out is not None or args.smoke else DEFAULT_OUT
    if out is not None and out.suffix != ".md":
        print(f"gpu_check: --out {out} must be a .md file (the JSON data goes next to it)", file=sys.stderr)
        return 2
    if args.smoke and out is not None and out.resolve() == DEFAULT_OUT.resolve():
        print(f"gpu_check: smoke results never go to {DEFAULT_OUT}; give another --out", file=sys.stderr)
        return 2
    chosen = models(args.smoke)
    if args.models:
        unknown = sorted(set(args.models.split(",")) - set(chosen))
        if unknown:
            print(f"gpu_check: unknown models {unknown}; valid: {sorted(chosen)}", file=sys.stderr)
            return 2
        chosen = {k: v for k, v in chosen.items() if k in args.models.split(",")}
    rows, summaries, failed = [], [], False
    with tempfile.TemporaryDirectory() as work:
        for name, build in chosen.items():
            print(f"gpu_check: {name}", flush=True)
            try:
                r, s = check_model(name, build, device, smoke=args.smoke, repeats=args.repeats, work=work)
            except Exception:  # noqa: BLE001 - one failing model is reported, the others still run
                traceback.print_exc()
                r, s = [], {"model": name, "error": traceback.format_exc(limit=1).strip().splitlines()[-1]}
            rows += r
            summaries.append(s)
            failed |= "error" in s or not s.get("reload_equal") or not math.isfinite(s.get("train_loss", math.nan))
    env = environment(device)
    md = render(rows, summaries, env)
    print(md)
    if out is not None:
        write(out.stem, {"device_environment": env, "rows": rows, "checks": summaries}, md, out.parent)
        print(f"gpu_check: wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
