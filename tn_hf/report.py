"""CompressionReport: the one per-layer table (compress, model cards, ``tn-hf inspect``, recipes).

Rows: ``name, type, tn_type, dense_params, tn_params, ratio, ranks, rel_error, flops_dense,
flops_tn`` and, for a layer that did not reach the requested ratio or that the speed planner took
though slower than dense at batch 1, a ``note`` saying why.
Totals: over the compressed layers (``target_*``) and over the whole model (``model_*``: every
value the checkpoint stores, parameters and buffers, as ``tn-hf inspect`` reads them from the
safetensors header), plus the requested ratio. A report is built by ``compress`` (with errors and
FLOPs), from a live model (``from_model``) or from a checkpoint's specs and safetensors header (``from_checkpoint``, no
weights read).

FLOPs (the layers' own ``flops``/``dense_flops``, 2 per multiply-add): when the model declares a
default input size (timm ``pretrained_cfg["input_size"]``), one forward pass on a zero input with
hooks records each target's input shape and FLOPs are per sample (batch 1). Otherwise they are
per token/position for Linear and recurrent layers and unknown (None) for convs.
"""
from __future__ import annotations

import html
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .layers import layer_from_spec
from .layers.base import n_params

COLUMNS = ("name", "type", "tn_type", "dense_params", "tn_params", "ratio", "ranks", "rel_error",
           "flops_dense", "flops_tn")
# the rendered table's headers: one per column, then the footnote marks
HEADERS = ("layer", "type", "TN type", "params", "TN params", "ratio", "ranks", "error", "FLOPs", "TN FLOPs", "notes")
LINE_WIDTH = 120  # the terminal table's width, where the layer names allow


def _si(v: float) -> str:
    """A count with an SI suffix and 3 significant digits: 1.81G, 116M, 950."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def n_stored(model: nn.Module) -> int:
    """Values the checkpoint stores: every tensor of the state dict once (parameters and buffers)."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def ranks_of(spec: dict):
    subs = spec.get("weights")
    if isinstance(subs, dict):  # composite (recurrent) layers: ranks of each TN matrix
        return {k: v.get("ranks") for k, v in subs.items() if isinstance(v, dict)}
    return spec.get("ranks")


def layer_row(name: str, layer, spec: dict, dense_module: nn.Module | None = None, **extra) -> dict[str, Any]:
    """One table row for a TN layer (live or on the meta device); ``dense_module``: the module it
    replaces, whose parameters (bias included) are then the dense count."""
    dense = n_params(dense_module) if dense_module is not None else int(layer.dense_params())
    tn = n_params(layer)
    row = {"name": name, "type": type(dense_module).__name__ if dense_module is not None else layer.dense_type.__name__,
           "tn_type": type(layer).__name__,
           "dense_params": dense, "tn_params": tn, "ratio": dense / max(tn, 1), "ranks": ranks_of(spec),
           "rel_error": None, "flops_dense": None, "flops_tn": None}
    row.update(extra)
    return row


@dataclass
class CompressionReport:
    rows: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ builders
    @classmethod
    def build(cls, rows: list[dict], *, model_params_tn: int, requested_ratio: float | None = None,
              flops_per: str | None = None, **extra) -> "CompressionReport":
        """Totals from the rows: the model's dense size is its TN size minus what the targets saved."""
        td = sum(r["dense_params"] for r in rows)
        tt = sum(r["tn_params"] for r in rows)
        model_dense = model_params_tn - tt + td
        flops_known = bool(rows) and all(r.get("flops_dense") is not None for r in rows)
        totals = {"layers": len(rows), "target_params_dense": td, "target_params_tn": tt,
                  "target_ratio": td / max(tt, 1), "requested_ratio": requested_ratio,
                  "model_params_dense": model_dense, "model_params_tn": model_params_tn,
                  "model_ratio": model_dense / max(model_params_tn, 1),
                  "flops_dense": sum(r["flops_dense"] for r in rows) if flops_known else None,
                  "flops_tn": sum(r["flops_tn"] for r in rows) if flops_known else None,
                  "flops_per": flops_per, **extra}
        return cls(rows, totals)

    @classmethod
    def from_model(cls, model: nn.Module) -> "CompressionReport":
        """Rows rebuilt from ``model.tn_hf_specs`` and the live layers (no errors, no FLOPs)."""
        specs = getattr(model, "tn_hf_specs", None) or {}
        rows = [layer_row(n, model.get_submodule(n), s) for n, s in specs.items()]
        cfg = getattr(model, "tn_hf_config", None) or {}
        return cls.build(rows, model_params_tn=n_stored(model),
                         requested_ratio=cfg.get("compression_ratio"))

    @classmethod
    def from_checkpoint(cls, specs: dict, config: dict | None, header: dict,
                        saved: dict | None = None) -> "CompressionReport":
        """Rows from the specs (empty layers on the meta device) and sizes from the safetensors header.

        Model totals count every stored tensor (parameters and buffers). ``saved``: the report written
        with the checkpoint (tn_hf_report.json, as in the model card); when its rows match the specs'
        sizes, its measured columns (error, FLOPs, notes) and its layers kept dense are added."""
        rows = []
        for name, spec in specs.items():
            with torch.device("meta"):
                layer = layer_from_spec(spec)
            rows.append(layer_row(name, layer, spec))
        rows, flops_per = _with_saved(rows, saved)
        stored = sum(math.prod(shape) for _, shape in header.values())
        return cls.build(rows, model_params_tn=stored, requested_ratio=(config or {}).get("compression_ratio"),
                         flops_per=flops_per, format=(config or {}).get("format"))

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows], "totals": dict(self.totals)}

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionReport":
        return cls([dict(r) for r in d.get("rows", [])], dict(d.get("totals", {})))

    # ------------------------------------------------------------------ rendering
    @staticmethod
    def fmt(v, col: str = "") -> str:
        if v is None:
            return "-"
        if col == "ratio" or col.endswith("_ratio"):
            return f"{v:.2f}x"
        if col.startswith("flops") and isinstance(v, (int, float)) and not isinstance(v, bool):
            return _si(v)
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        if isinstance(v, list):
            return "-".join(str(x) for x in v)
        if isinstance(v, dict):
            return "; ".join(f"{k}: {CompressionReport.fmt(x)}" for k, x in v.items())
        return str(v)

    def _total_row(self) -> list[str]:
        t = self.totals
        asked = t.get("requested_ratio")
        label = "TOTAL (model)" + (f", asked {asked:g}x over targets" if asked else "")
        return [label, "", "", self.fmt(t.get("model_params_dense")), self.fmt(t.get("model_params_tn")),
                self.fmt(t.get("model_ratio"), "ratio"), "", "", self.fmt(t.get("flops_dense"), "flops_dense"),
                self.fmt(t.get("flops_tn"), "flops_tn"), ""]

    def footnotes(self) -> tuple[list[str], list[str]]:
        """(each row's footnote marks, e.g. ``"[1]"`` or ``""``; the footnote texts, numbered from 1).
        A layer kept dense points at its reason, a layer with a note at the note; a text that several
        layers share is one footnote."""
        texts: list[str] = []
        marks = []
        for r in self.rows:
            ids = []
            for text in (f"kept dense: {r['kept_dense']}" if r.get("kept_dense") else None, r.get("note")):
                if text:
                    if text not in texts:
                        texts.append(text)
                    ids.append(str(texts.index(text) + 1))
            marks.append(f"[{','.join(ids)}]" if ids else "")
        return marks, texts

    def table(self) -> list[list[str]]:
        """Header (``HEADERS``), one row per layer, the targets' total and the model's total (strings);
        the last column holds the footnote marks (a layer kept dense shows "dense" as its TN type)."""
        t = self.totals
        marks, _ = self.footnotes()
        rows = [list(HEADERS)]
        for r, mark in zip(self.rows, marks):
            cells = [self.fmt(r.get(c), c) for c in COLUMNS]
            if r.get("kept_dense"):
                cells[2] = "dense"
            rows.append(cells + [mark])
        rows.append(["TOTAL (compressed layers)", "", "", self.fmt(t.get("target_params_dense")),
                     self.fmt(t.get("target_params_tn")), self.fmt(t.get("target_ratio"), "ratio"),
                     "", "", "", "", ""])
        rows.append(self._total_row())
        return rows

    def notes(self) -> list[str]:
        """The footnotes, ``"[1] text"``, each once."""
        return [f"[{i}] {text}" for i, text in enumerate(self.footnotes()[1], 1)]

    def to_markdown(self) -> str:
        """The table and notes as Markdown; their text (module names, notes) is escaped
        (``markdown_text``), so a name like ``<script>`` stays text where the card is shown."""
        table = self.table()
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
        for i, row in enumerate(table[1:]):
            cells = [markdown_text(c).replace("|", "/") for c in row]
            if i < len(self.rows):
                cells[0] = f"`{cells[0]}`"
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines + [f"\n- {markdown_text(n)}" for n in self.notes()])

    def __str__(self) -> str:
        """The table for a terminal, at most ``LINE_WIDTH`` characters wide where the names allow:
        the totals' labels run over the empty type columns, and when the names make the lines too
        long each name gets a line of its own above its values. Footnotes follow the table."""
        table = self.table()
        n = len(self.rows)
        widths = [max(len(row[i]) for row in table) for i in range(len(HEADERS))]
        left = (0, 1, 2, len(HEADERS) - 1)  # text columns; the numbers are right-aligned

        def rest(row: list[str]) -> str:  # every column but the name
            return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths)) if i)

        span = widths[1] + widths[2] + 4  # the totals' labels run over the type columns, empty in them
        name_w = max([len(row[0]) for row in table[:n + 1]] + [len(row[0]) - span for row in table[n + 1:]])
        one_line = name_w + 2 + len(rest(table[0])) <= LINE_WIDTH
        lines = []
        for i, row in enumerate(table):
            if one_line and i <= n:
                lines.append(f"{row[0].ljust(name_w)}  {rest(row)}".rstrip())
            elif one_line:
                lines.append(f"{row[0].ljust(name_w + 2 + span)}{rest(row)[span:]}".rstrip())
            else:
                lines += [row[0], f"    {rest(row)}".rstrip()]
            if i in (0, n):
                lines.append("-" * min(LINE_WIDTH, max(len(line) for line in lines)))
        wrap = textwrap.TextWrapper(width=LINE_WIDTH, subsequent_indent="    ", break_on_hyphens=False)
        return "\n".join(lines + [w for note in self.notes() for w in wrap.wrap(note)])

    __repr__ = __str__


def _number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _with_saved(rows: list[dict], saved: dict | None) -> tuple[list[dict], str | None]:
    """``rows`` (from a checkpoint's specs) with the measured columns of the saved report's rows of
    the same names, plus its rows of layers kept dense, and its FLOPs unit; ``rows`` unchanged when
    the saved report is not this checkpoint's (a layer missing or of another size)."""
    old = {r.get("name"): r for r in (saved or {}).get("rows") or [] if isinstance(r, dict)}
    if not old or any(old.get(r["name"], {}).get("tn_params") != r["tn_params"] for r in rows):
        return rows, None
    out = []
    for r in rows:
        prev = old[r["name"]]
        measured = {k: prev[k] for k in ("rel_error", "flops_dense", "flops_tn") if k in prev and _number(prev[k])}
        if isinstance(prev.get("note"), str):
            measured["note"] = prev["note"]
        out.append({**r, **measured})
    names = {r["name"] for r in rows}
    for r in old.values():
        n = r.get("dense_params")
        if (r.get("kept_dense") and isinstance(r.get("name"), str) and r["name"] not in names and isinstance(n, int)
                and r.get("tn_params") == n and all(_number(r.get(c)) for c in ("ratio", "flops_dense", "flops_tn"))):
            out.append({**{c: r.get(c) for c in COLUMNS}, "ranks": None, "kept_dense": str(r["kept_dense"])})
    per = ((saved or {}).get("totals") or {}).get("flops_per")
    return out, per if isinstance(per, str) else None


def markdown_text(text: str) -> str:
    """``text`` safe to place in a Markdown body: HTML special characters escaped, no backticks
    (which would end a code span)."""
    return html.escape(str(text), quote=False).replace("`", "'")


# ----------------------------------------------------------------------------- FLOPs
def _default_input(model, input_size=None) -> torch.Tensor | None:
    cfg = getattr(model, "pretrained_cfg", None)
    size = input_size or (cfg.get("input_size") if isinstance(cfg, dict) else None)
    if not size:
        return None
    p = next(model.parameters(), None)
    x = torch.zeros(1, *size, device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
    if any(is_channels_last(w) for w in model.parameters() if w.dim() == x.dim()):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


class Probed(NamedTuple):
    """What one named module sees in the probe forward (batch 1)."""
    shape: tuple          # input shape
    positions: int        # output positions per sample (spatial size for convs, tokens otherwise)
    channels_last: bool   # the input is a channels-last 4-d/5-d tensor (the model runs channels-last)


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-d/5-d tensor laid out channels-last (and not also plain contiguous)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def probe(model, names: list[str], input_size=None) -> dict[str, Probed]:
    """{name: Probed} from one forward on a zero input of batch 1 and ``input_size`` per sample (default:
    the model's declared ``pretrained_cfg["input_size"]``, as timm models have), in the model's memory
    format (channels-last when a 4-d/5-d weight of the model is, as after
    ``model.to(memory_format=torch.channels_last)``)."""
    x = _default_input(model, input_size)
    if x is None:
        return {}
    out: dict[str, Probed] = {}
    hooks = []
    for name in names:
        def hook(m, inp, o, name=name):
            o = o[0] if isinstance(o, tuple) else o
            if not (inp and torch.is_tensor(inp[0]) and torch.is_tensor(o)):
                return
            conv = isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            out[name] = Probed(tuple(inp[0].shape), int(math.prod(o.shape[2:]) if conv else o.numel() // o.shape[-1]),
                               is_channels_last(inp[0]))
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except Exception:  # noqa: BLE001 - FLOPs are informative only: fall back to per-position counts
        out = {}
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return out


def flops(module: nn.Module, tn_layer, probed) -> tuple[int | None, int | None]:
    """(dense, TN) FLOPs of one forward: per sample if probed, else per position (None for convs)."""
    if probed is not None:
        shape = probed[0]
    elif isinstance(module, nn.Linear):
        shape = (1, module.in_features)
    elif isinstance(module, (nn.LSTM, nn.GRU)):
        shape = (1, module.input_size)
    else:
        return None, None
    try:
        return int(tn_layer.dense_flops(shape)), int(tn_layer.flops(shape))
    except (AttributeError, TypeError, ValueError):
        return None, None


def rel_error(dense: dict[str, torch.Tensor], layer) -> float | None:
    """Relative Frobenius error of the rebuilt weights against the dense ones."""
    rebuilt = type(layer).dense_weights(layer.to_dense())
    num = den = 0.0
    for k, w in dense.items():
        if k in rebuilt:
            num += float((rebuilt[k].detach().double().cpu() - w.double().cpu()).pow(2).sum())
            den += float(w.double().pow(2).sum())
    return math.sqrt(num / den) if den > 0 else None
