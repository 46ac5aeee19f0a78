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

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .report import CompressionReport, markdown_text
from .serialization import CARD_MARKER

TEMPLATE = "model_card.md"
FIGURE = "compression.png"
FORMAT_LONG = {"tt": "Tensor-Train", "tr": "Tensor-Ring", "tucker": "Tucker", "bt": "Block-Term"}
FORMAT_TAG = {"tt": "tensor-train", "tr": "tensor-ring", "tucker": "tucker-decomposition",
              "bt": "block-term-decomposition"}
LIBRARIES = ("transformers", "timm", "pytorch")


def _as_report_dict(model, report) -> dict[str, Any]:
    if report is None:
        return CompressionReport.from_model(model).to_dict()
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if isinstance(report, dict) and "rows" in report:
        return report
    raise ValueError("write_model_card: report must be a CompressionReport or its to_dict(), "
                     f"got {type(report).__name__}")


# ----------------------------------------------------------------------------- figure
def plot_compression(rows: list[dict], path) -> Path:
    """Bar chart of dense vs TN params per layer (log scale) with the ratio on each bar."""
    fig = compression_figure(rows)
    import matplotlib.pyplot as plt
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compression_figure(rows: list[dict]) -> Any:
    """The figure of ``plot_compression``; its legend sits below the axes, clear of every bar."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    dense = [r.get("dense_params") or 0 for r in rows]
    tn = [r.get("tn_params") or 0 for r in rows]
    height = max(2.5, 0.35 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=(8, min(height, 40)), layout="constrained")
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
    fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


# ----------------------------------------------------------------------------- rendering
def _fmt_int(v) -> str:
    return CompressionReport.fmt(None if v is None else int(v))


def _fmt_ratio(v) -> str:
    return CompressionReport.fmt(v or None, "ratio")


def _format_of(model) -> str:
    cfg = getattr(model, "tn_hf_config", None) or {}
    fmt = cfg.get("format") if isinstance(cfg, dict) else None
    if fmt is None:
        specs = getattr(model, "tn_hf_specs", None) or {}
        fmts: set[str] = {s["format"] for s in specs.values() if isinstance(s, dict) and s.get("format") is not None}
        if not fmts:
            fmts = {"tr" if str(s.get("class", "")).startswith("TR") else "tt" for s in specs.values()}
        fmt = fmts.pop() if len(fmts) == 1 else "tt"
    return fmt


# class-name suffix of a transformers model -> Hub pipeline tag
_TASKS = (("ForVideoClassification", "video-classification"), ("ForImageClassification", "image-classification"),
          ("ForCausalLM", "text-generation"), ("ForSequenceClassification", "text-classification"),
          ("ForTokenClassification", "token-classification"), ("ForQuestionAnswering", "question-answering"),
          ("ForAudioClassification", "audio-classification"), ("ForSpeechSeq2Seq", "automatic-speech-recognition"))
METHODS = {"direct": "decomposed directly from the trained weights (TT/TR-SVD at the planned ranks)",
           "admm": "trained with ADMM towards low tensor-network rank, then decomposed at those ranks (ADMM-TT)"}


def pipeline_tag(model, library_name: str) -> str | None:
    """The Hub pipeline tag: timm models classify images; transformers by the class name."""
    if library_name == "timm":
        return "image-classification"
    name = type(model).__name__
    return next((tag for suffix, tag in _TASKS if name.endswith(suffix)), None)


def _load_snippet(library_name: str, source: str, model, on_hub: bool) -> tuple[str, str]:
    """(the ecosystem's own load code, the tn_hf.from_pretrained line) for ``source``: a Hub repo id
    (``on_hub``) or the folder the card was written to."""
    cls = type(model).__name__
    if library_name == "pytorch":
        line = f'model = tn_hf.from_pretrained("{source}", model_class={cls})'
        mixin = hasattr(type(model), "_hub_mixin_config")  # huggingface_hub's PyTorchModelHubMixin
        own = f'model = {cls}.from_pretrained("{source}")' if mixin else line
        return f"from {type(model).__module__} import {cls}  # the model's own class\n{own}", line
    any_loader = f'model = tn_hf.from_pretrained("{source}")'
    if library_name == "timm":
        prefix = "hf-hub:" if on_hub else "local-dir:"
        return f'import timm\nmodel = timm.create_model("{prefix}{source}", pretrained=True)', any_loader
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    name = archs[0] if archs else "AutoModel"
    return f'from transformers import {name}\nmodel = {name}.from_pretrained("{source}")', any_loader


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
                      metrics: dict | None = None, dataset: str | None = None, repo_id: str | None = None,
                      random_init: bool = False, local_path: str | None = None):
    """Return ``(ModelCard, report_dict)`` without writing anything. The load code names ``repo_id``
    or, before the model is on the Hub, ``local_path`` (``push_to_hub`` rewrites it; the report
    dict records it as ``card_source``)."""
    if library_name not in LIBRARIES:
        raise ValueError(f"write_model_card: library_name={library_name!r}; valid choices are {LIBRARIES}")
    rep = dict(_as_report_dict(model, report))
    rows, totals = rep["rows"], rep["totals"]
    source = repo_id or local_path or "."
    snippet, any_loader = _load_snippet(library_name, source, model, on_hub=repo_id is not None)
    rep["card_source"] = None if repo_id else source
    fmt = _format_of(model)
    values = _metric_entries(metrics, totals)
    name = repo_id.split("/")[-1] if repo_id else f"{type(model).__name__}-{fmt}"
    if base_model is None:  # transformers models loaded from a Hub id know it (timm ones cannot tell)
        base_model = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if base_model and (Path(base_model).exists() or "/" not in base_model):
            base_model = None  # local path / bare name: not a Hub id

    task = pipeline_tag(model, library_name)
    measured = {k: v for k, v in values.items() if k not in ("compression_ratio", "flops_reduction")}
    eval_results = None
    if dataset and measured:  # model-index holds results of the run, not the compression ratio
        eval_results = [EvalResult(task_type=task or "other", dataset_type=dataset, dataset_name=dataset,
                                   metric_type=k, metric_value=v) for k, v in measured.items()]
    data = ModelCardData(
        library_name=library_name if library_name != "pytorch" else None,
        pipeline_tag=task,
        base_model=base_model,
        tags=["tn_hf", FORMAT_TAG[fmt], "model-compression"] + (["pytorch"] if library_name == "pytorch" else []),
        datasets=[dataset] if dataset else None,
        metrics=sorted(measured) or None,
        model_name=name if eval_results else None,
        eval_results=eval_results,
        base_model_relation="quantized" if base_model else None,
        tn_hf={"format": fmt, "layers": len(rows), **values,
               "params_dense": totals.get("model_params_dense"), "params_tn": totals.get("model_params_tn")},
    )
    flops_row = ""
    if totals.get("flops_dense") and totals.get("flops_tn"):
        flops_row = (f"| compressed layers (FLOPs per {totals.get('flops_per', 'sample')}) | "
                     f"{_fmt_int(totals['flops_dense'])} | {_fmt_int(totals['flops_tn'])} | "
                     f"{_fmt_ratio(totals['flops_dense'] / totals['flops_tn'])} |")
    metrics_section = ""
    if measured:
        on = f" on `{markdown_text(dataset)}`" if dataset else ""
        metrics_section = f"\n## Results{on}\n\n" + "\n".join(f"- {markdown_text(k)}: {v:.4g}"
                                                                 for k, v in measured.items()) + "\n"
    if random_init:
        metrics_section += ("\n> **Random weights.** This checkpoint was compressed from randomly initialised "
                            "weights, not a trained model: it is for trying the format out, not for use.\n")
    layer_table = CompressionReport.from_dict(rep).to_markdown()
    cfg = getattr(model, "tn_hf_config", None)
    cfg_summary = ", ".join(f"{k}={v!r}" for k, v in (cfg or {}).items()
                            if k in ("format", "ranks", "compression_ratio", "rel_error", "max_rank") and v is not None)
    template = resources.files("tn_hf").joinpath("model_cards", TEMPLATE).read_text(encoding="utf-8")
    body = Template(template).substitute(
        title=f"{name} ({FORMAT_LONG[fmt]}-compressed)", method=METHODS[totals.get("method", "direct")],
        n_layers=len(rows), base_name=markdown_text(base_model or type(model).__name__),
        format_long=FORMAT_LONG[fmt],
        target_dense=_fmt_int(totals.get("target_params_dense")), target_tn=_fmt_int(totals.get("target_params_tn")),
        target_ratio=_fmt_ratio(totals.get("target_ratio")),
        model_dense=_fmt_int(totals.get("model_params_dense")), model_tn=_fmt_int(totals.get("model_params_tn")),
        model_ratio=_fmt_ratio(totals.get("model_ratio")), flops_row=flops_row, metrics_section=metrics_section,
        load_snippet=snippet,
        any_loader="" if any_loader in snippet else f"or, with tn_hf's own loader: `{any_loader}`.\n",
        layer_table=layer_table, config_summary=markdown_text(cfg_summary or "see config.json"))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{CARD_MARKER}\n\n{body}")
    return card, rep


def write_model_card(model, out_dir, *, report=None, library_name: str, base_model: str | None = None,
                     metrics: dict | None = None, dataset: str | None = None, repo_id: str | None = None,
                     random_init: bool = False, local_path: str | None = None):
    """Write ``README.md``, ``compression.png`` and ``tn_hf_report.json`` into ``out_dir``; return the
    ``ModelCard``. ``local_path``: how a reader names this folder (default ``out_dir``)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"write_model_card: {out} is not a directory")
    card, rep = render_model_card(model, report=report, library_name=library_name, base_model=base_model,
                                  metrics=metrics, dataset=dataset, repo_id=repo_id, random_init=random_init,
                                  local_path=local_path or str(out))
    plot_compression(rep["rows"], out / FIGURE)
    card.save(out / "README.md")
    (out / "tn_hf_report.json").write_text(json.dumps(rep, indent=2, default=str) + "\n", encoding="utf-8")
    return card
