"""Model cards for TN-compressed checkpoints: README.md (YAML metadata + body) and compression.png.

The body comes from the packaged template ``tn_hf/model_cards/model_card.md`` (``string.Template``
placeholders); the metadata is rendered with huggingface_hub's ``ModelCardData``.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from torch import nn

TEMPLATE = "model_card.md"
FIGURE = "compression.png"
FORMAT_LONG = {"tt": "Tensor-Train", "tr": "Tensor-Ring"}
FORMAT_TAG = {"tt": "tensor-train", "tr": "tensor-ring"}
LIBRARIES = ("transformers", "timm", "pytorch")


# ----------------------------------------------------------------------------- report rows
def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dense_params(layer, spec: dict) -> int | None:
    fn = getattr(layer, "dense_params", None)
    if callable(fn):
        try:
            return int(fn())
        except Exception:  # noqa: BLE001 - a layer that cannot tell: leave the cell empty
            return None
    return None


def report_from_model(model: nn.Module) -> dict[str, Any]:
    """``CompressionReport.to_dict()``-like rows/totals rebuilt from ``model.tn_hf_specs`` and the layers."""
    specs = getattr(model, "tn_hf_specs", None) or {}
    rows = []
    for name, spec in specs.items():
        layer = model.get_submodule(name)
        dense_type = getattr(layer, "dense_type", None)
        dense = _dense_params(layer, spec)
        tn = _n_params(layer)
        ranks = spec.get("ranks")
        if ranks is None and isinstance(spec.get("weights"), dict):
            ranks = {k: v.get("ranks") for k, v in spec["weights"].items() if isinstance(v, dict)}
        rows.append({"name": name, "type": getattr(dense_type, "__name__", "?"), "tn_type": type(layer).__name__,
                     "dense_params": dense, "tn_params": tn, "ratio": dense / tn if dense and tn else None,
                     "ranks": ranks, "rel_error": None, "flops_dense": None, "flops_tn": None})
    td = sum(r["dense_params"] or 0 for r in rows)
    tt = sum(r["tn_params"] for r in rows)
    model_tn = _n_params(model)
    model_dense = model_tn - tt + td
    return {"rows": rows, "totals": {
        "layers": len(rows), "target_params_dense": td, "target_params_tn": tt, "target_ratio": td / max(tt, 1),
        "model_params_dense": model_dense, "model_params_tn": model_tn, "model_ratio": model_dense / max(model_tn, 1),
        "flops_dense": None, "flops_tn": None}}


def _as_report_dict(model, report) -> dict[str, Any]:
    if report is None:
        return report_from_model(model)
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if isinstance(report, dict) and "rows" in report:
        return report
    raise ValueError(f"write_model_card: report must be a CompressionReport or its to_dict(), got {type(report).__name__}")


# ----------------------------------------------------------------------------- figure
def plot_compression(rows: list[dict], path) -> Path:
    """Bar chart of dense vs TN params per layer (log scale) with the ratio on each bar."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    dense = [r.get("dense_params") or 0 for r in rows]
    tn = [r.get("tn_params") or 0 for r in rows]
    height = max(2.5, 0.35 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(8, min(height, 40)))
    y = list(range(len(rows)))
    ax.barh([i + 0.2 for i in y], dense, height=0.4, label="dense", color="#9aa5b1")
    ax.barh([i - 0.2 for i in y], tn, height=0.4, label="tensor network", color="#d9480f")
    for i, (d, t) in enumerate(zip(dense, tn)):
        if d and t:
            ax.text(max(d, t) * 1.15, i, f"{d / t:.1f}x", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    if any(dense) or any(tn):
        ax.set_xscale("log")
        ax.set_xlim(right=max(dense + tn) * 4)
    ax.set_xlabel("parameters (log scale)")
    ax.set_title("Per-layer compression")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- rendering
def _fmt_int(v) -> str:
    return "-" if v is None else f"{int(v):,}"


def _fmt_ratio(v) -> str:
    return "-" if not v else f"{v:.2f}x"


def _fmt_ranks(r) -> str:
    if r is None:
        return "-"
    if isinstance(r, dict):
        return "; ".join(f"{k}: {_fmt_ranks(v)}" for k, v in r.items())
    if isinstance(r, int):
        return str(r)
    return "-".join(str(x) for x in r)


def _format_of(model) -> str:
    cfg = getattr(model, "tn_hf_config", None) or {}
    fmt = cfg.get("format") if isinstance(cfg, dict) else None
    if fmt is None:
        specs = getattr(model, "tn_hf_specs", None) or {}
        fmts = {s.get("format") for s in specs.values() if isinstance(s, dict)} - {None}
        if not fmts:
            fmts = {"tr" if str(s.get("class", "")).startswith("TR") else "tt" for s in specs.values()}
        fmt = fmts.pop() if len(fmts) == 1 else "tt"
    return fmt


def _load_snippet(library_name: str, repo_id: str, model) -> str:
    if library_name == "timm":
        return f'import timm\nmodel = timm.create_model("hf-hub:{repo_id}", pretrained=True)'
    if library_name == "transformers":
        archs = getattr(getattr(model, "config", None), "architectures", None) or []
        cls = archs[0] if archs else "AutoModel"
        return f'from transformers import {cls}\nmodel = {cls}.from_pretrained("{repo_id}")'
    return f'model = tn_hf.from_pretrained("{repo_id}")'


def _metric_entries(metrics: dict | None, totals: dict) -> dict[str, float]:
    out = {}
    if totals.get("model_ratio"):
        out["compression_ratio"] = round(float(totals["model_ratio"]), 4)
    if totals.get("flops_dense") and totals.get("flops_tn"):
        out["flops_reduction"] = round(totals["flops_dense"] / totals["flops_tn"], 4)
    for k, v in (metrics or {}).items():
        if not isinstance(v, (int, float)):
            raise ValueError(f"write_model_card: metric {k!r} must be a number, got {v!r}")
        out[k] = float(v)
    return out


def render_model_card(model, *, report=None, library_name: str, base_model: str | None = None,
                      metrics: dict | None = None, dataset: str | None = None, repo_id: str | None = None):
    """Return ``(ModelCard, report_dict)`` without writing anything."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if library_name not in LIBRARIES:
        raise ValueError(f"write_model_card: library_name={library_name!r}; valid choices are {LIBRARIES}")
    rep = _as_report_dict(model, report)
    rows, totals = rep["rows"], rep["totals"]
    fmt = _format_of(model)
    values = _metric_entries(metrics, totals)
    name = repo_id.split("/")[-1] if repo_id else f"{type(model).__name__}-{fmt}"
    if base_model is None:  # transformers models loaded from a Hub id know it (timm ones cannot tell)
        base_model = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if base_model and (Path(base_model).exists() or "/" not in base_model):
            base_model = None  # local path / bare name: not a Hub id

    eval_results = None
    if dataset and values:
        task = "image-classification" if library_name == "timm" else "other"
        eval_results = [EvalResult(task_type=task, dataset_type=dataset, dataset_name=dataset, metric_type=k, metric_value=v)
                        for k, v in values.items()]
    data = ModelCardData(
        library_name=library_name if library_name != "pytorch" else None,
        base_model=base_model,
        tags=["tn_hf", FORMAT_TAG[fmt], "model-compression"] + (["pytorch"] if library_name == "pytorch" else []),
        datasets=[dataset] if dataset else None,
        metrics=sorted(values) or None,
        model_name=name if eval_results else None,
        eval_results=eval_results,
        **({"base_model_relation": "quantized"} if base_model else {}),
        tn_hf={"format": fmt, "layers": len(rows), **values,
               "params_dense": totals.get("model_params_dense"), "params_tn": totals.get("model_params_tn")},
    )
    flops_row = ""
    if totals.get("flops_dense") and totals.get("flops_tn"):
        flops_row = (f"| compressed layers (FLOPs per {totals.get('flops_per', 'sample')}) | "
                     f"{_fmt_int(totals['flops_dense'])} | {_fmt_int(totals['flops_tn'])} | "
                     f"{_fmt_ratio(totals['flops_dense'] / totals['flops_tn'])} |")
    extra = {k: v for k, v in values.items() if k not in ("compression_ratio", "flops_reduction")}
    metrics_section = ""
    if extra:
        on = f" on `{dataset}`" if dataset else ""
        metrics_section = f"\n## Results{on}\n\n" + "\n".join(f"- {k}: {v:.4g}" for k, v in extra.items()) + "\n"
    layer_rows = "\n".join(
        f"| `{r['name']}` | {r.get('type', '-')} | {r.get('tn_type', '-')} | {_fmt_int(r.get('dense_params'))} | "
        f"{_fmt_int(r.get('tn_params'))} | {_fmt_ratio(r.get('ratio'))} | {_fmt_ranks(r.get('ranks'))} | "
        f"{'-' if r.get('rel_error') is None else format(r['rel_error'], '.3g')} |" for r in rows)
    cfg = getattr(model, "tn_hf_config", None)
    cfg_summary = ", ".join(f"{k}={v!r}" for k, v in (cfg or {}).items()
                            if k in ("format", "ranks", "compression_ratio", "rel_error", "max_rank") and v is not None)
    template = resources.files("tn_hf").joinpath("model_cards", TEMPLATE).read_text(encoding="utf-8")
    body = Template(template).substitute(
        title=f"{name} ({FORMAT_LONG[fmt]}-compressed)",
        n_layers=len(rows), base_name=base_model or type(model).__name__, format_long=FORMAT_LONG[fmt],
        target_dense=_fmt_int(totals.get("target_params_dense")), target_tn=_fmt_int(totals.get("target_params_tn")),
        target_ratio=_fmt_ratio(totals.get("target_ratio")),
        model_dense=_fmt_int(totals.get("model_params_dense")), model_tn=_fmt_int(totals.get("model_params_tn")),
        model_ratio=_fmt_ratio(totals.get("model_ratio")), flops_row=flops_row, metrics_section=metrics_section,
        load_snippet=_load_snippet(library_name, repo_id or "ORG/NAME", model), repo_id=repo_id or "ORG/NAME",
        layer_rows=layer_rows, config_summary=cfg_summary or "see config.json")
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return card, rep


def write_model_card(model, out_dir, *, report=None, library_name: str, base_model: str | None = None,
                     metrics: dict | None = None, dataset: str | None = None, repo_id: str | None = None):
    """Write ``README.md`` and ``compression.png`` into ``out_dir``; return the ``ModelCard``."""
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"write_model_card: {out} is not a directory")
    card, rep = render_model_card(model, report=report, library_name=library_name, base_model=base_model,
                                  metrics=metrics, dataset=dataset, repo_id=repo_id)
    plot_compression(rep["rows"], out / FIGURE)
    card.save(out / "README.md")
    (out / "tn_hf_report.json").write_text(json.dumps(rep, indent=2, default=str) + "\n", encoding="utf-8")
    return card
