"""What a recipe writes: ``<output-dir>/metrics.json`` and ``<output-dir>/model`` (the compressed
checkpoint via ``tn_hf.save_pretrained``: config.json + model.safetensors + model card with the
run's accuracy), optionally pushed to the Hub."""
from __future__ import annotations

import json
import os
from pathlib import Path

import tn_hf


def write_json(path, obj) -> None:
    """Write ``obj`` as JSON, atomically (a crash leaves the previous file or none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


def compression_metrics(report) -> dict:
    """metrics.json entries from the ``tn_hf.CompressionReport`` of the decomposition."""
    t = report.totals
    return {"compression": report.to_dict(), "params_dense": t["model_params_dense"],
            "params_compressed": t["model_params_tn"], "model_compression_ratio": t["model_ratio"]}


def save_run(model, out_dir, metrics: dict, *, report=None, push_to_hub: str | None = None) -> Path:
    """Save the compressed model to ``out_dir/model`` (card: accuracy on the run's test set) and
    ``metrics`` to ``out_dir/metrics.json``; push the model when ``push_to_hub`` names a repo."""
    out = Path(out_dir)
    final = metrics["final"]
    card_metrics = {"accuracy": final["top1"], **({"top5_accuracy": final["top5"]} if "top5" in final else {})}
    tn_hf.save_pretrained(model, out / "model", model_args=getattr(model, "model_args", None), report=report,
                          metrics=card_metrics, base_model=metrics.get("base_model"), dataset=metrics["dataset"])
    write_json(out / "metrics.json", metrics)
    if push_to_hub:
        print(f"pushed to {tn_hf.push_to_hub(model, push_to_hub)}")
    return out / "model"
