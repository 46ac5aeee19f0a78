"""compress(model, config) / decompress(model): find target modules, swap them for TN layers.

``plan`` decides *what* is compressed and at which ranks; ``compress`` decomposes the current
weights of those modules and swaps them in place; ``decompress`` swaps every TN layer back to
its plain torch module (for export).

Default skips (what users of peft/torchao expect), applied when ``target_modules`` is None:
the stem (timm ``pretrained_cfg["first_conv"]``; plain torch: the first conv), the head (timm
``pretrained_cfg["classifier"]``; transformers: the output embeddings and modules named
classifier/head/lm_head/score; plain torch: the last Linear) and modules below ``min_params``.
Always skipped (they can't be swapped safely): grouped/depthwise convs, modules whose
parameters are shared with another module (tied heads), ``model._keep_in_fp32_modules`` and
RWKV's ``attention.output`` / ``feed_forward.value`` when ``config.rescale_every > 0`` (RWKV
rescales those weights in place in eval mode, which a TN layer's rebuilt weight can't follow).

FLOPs (the layers' own ``flops``/``dense_flops``, 2 per multiply-add): when the model declares
a default input size (timm ``pretrained_cfg["input_size"]``), one forward pass on a zero input
with hooks records each target's input shape, and FLOPs are per sample (batch 1). Otherwise
they are per token/position for Linear and recurrent layers and unknown (None) for convs.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import TNConfig

_DENSE_TYPES = {nn.Linear: "linear", nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv",
                nn.LSTM: "lstm", nn.GRU: "gru"}
_HEAD_NAMES = ("classifier", "head", "heads", "lm_head", "score")


@dataclass
class Target:
    name: str
    module: nn.Module
    cls: type
    spec: dict


# ----------------------------------------------------------------------------- helpers
def _as_config(config) -> TNConfig:
    if isinstance(config, TNConfig):
        return config
    if isinstance(config, dict):
        return TNConfig.from_dict(config)
    raise TypeError(f"config must be a TNConfig or a dict, got {type(config).__name__}")


def _layer_type(module: nn.Module) -> str | None:
    return _DENSE_TYPES.get(type(module))


def matches(name: str, pattern: str) -> bool:
    """peft-style: exact name, ``name`` ending with ``.pattern``, or ``re.fullmatch``."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _names(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [v for v in value if v]


def _stem_and_head(model: nn.Module) -> set[str]:
    """Module names of the stem and the classifier head (see module docstring)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and ("first_conv" in cfg or "classifier" in cfg):  # timm
        return set(_names(cfg.get("first_conv"))) | set(_names(cfg.get("classifier")))
    out: set[str] = set()
    if _is_transformers(model):
        get_out = getattr(model, "get_output_embeddings", None)
        emb = get_out() if callable(get_out) else None
        for name, mod in model.named_modules():
            if (emb is not None and mod is emb) or name.split(".")[-1] in _HEAD_NAMES:
                out.add(name)
        return out
    first_conv = last_linear = None
    for name, mod in model.named_modules():
        if first_conv is None and isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            first_conv = name
        if isinstance(mod, nn.Linear):
            last_linear = name
    return {n for n in (first_conv, last_linear) if n is not None}


def _is_transformers(model) -> bool:
    tf = sys.modules.get("transformers")  # not imported -> can't be a transformers model
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def _shared_modules(model: nn.Module) -> set[str]:
    """Names of modules holding a parameter that another module also holds (tied weights)."""
    owners: dict[int, set[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(name)
    shared = {n for names in owners.values() if len(names) > 1 for n in names}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for k, v in dict(tied).items():
        shared |= {k.rsplit(".", 1)[0], str(v).rsplit(".", 1)[0]}
    return shared


def _always_skipped(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """Why this module can never be swapped (None if it can)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups != 1:
        return f"grouped conv (groups={module.groups})"
    for k in getattr(model, "_keep_in_fp32_modules", None) or ():
        if re.search(rf"(^|\.){re.escape(k)}(\.|$)", name):
            return f"in model._keep_in_fp32_modules ({k})"
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) == "rwkv" and (getattr(cfg, "rescale_every", 0) or 0) > 0:
        if name.endswith("attention.output") or name.endswith("feed_forward.value"):
            return "RWKV rescales this weight in place (config.rescale_every > 0)"
    return None


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tn_modules():
    from . import layers
    return layers


# ----------------------------------------------------------------------------- plan
def plan(model: nn.Module, config) -> list[Target]:
    """Which modules get which TN class, with spec (ranks allocated where the config allows)."""
    config = _as_config(config)
    L = _tn_modules()
    all_names = [n for n, _ in model.named_modules() if n]
    rank_dict = config.ranks if isinstance(config.ranks, dict) else None
    explicit = _names(config.target_modules) or (list(rank_dict) if rank_dict else [])
    for pat in explicit:
        if not any(matches(n, pat) for n in all_names):
            cands = [n for n, m in model.named_modules() if _layer_type(m)][:20]
            raise ValueError(f"target_modules pattern {pat!r} matches no module of "
                             f"{type(model).__name__}; some candidate module names: {cands}")
    excluded = _names(config.exclude_modules)
    shared = _shared_modules(model)
    stem_head = _stem_and_head(model) if (config.skip_stem or config.skip_head) else set()
    if stem_head and not (config.skip_stem and config.skip_head):  # keep only the requested half
        first = next((n for n, m in model.named_modules()
                      if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
        stem_head = {n for n in stem_head if (n == first) == config.skip_stem}

    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        ltype = _layer_type(module)
        if ltype is None or ltype not in config.layer_types:
            continue
        if explicit and not any(matches(name, p) for p in explicit):
            continue
        if any(matches(name, p) for p in excluded):
            continue
        if name in shared or _always_skipped(model, name, module):
            continue
        if not explicit and (name in stem_head or _n_params(module) < config.min_params):
            continue
        chosen.append((name, module))

    targets = []
    for name, module in chosen:
        cls = L.tn_class_for(module, config.format)
        ranks = None
        if rank_dict is not None:
            key = next((k for k in rank_dict if matches(name, k)), None)
            if key is None:
                raise ValueError(f"TNConfig.ranks has no entry for target {name!r}; keys: {list(rank_dict)}")
            ranks = rank_dict[key]
        elif config.ranks is not None:
            ranks = config.ranks
        kw = {"compress_hidden": config.compress_hidden} if getattr(cls, "composite", False) else {}
        spec = cls.dense_spec(module, ranks=ranks, n_modes=config.n_modes, **kw)
        if ranks is not None:
            _normalize_spec_ranks(cls, spec)
        targets.append(Target(name, module, cls, spec))

    if config.compression_ratio is not None and targets:
        if config.budget != "latency":  # latency: the speed planner picks the ranks
            _allocate(model, targets, config)
        from .cost import plan_for_speed  # keeps dense what is not smaller (and faster); see tn_hf.cost
        targets = plan_for_speed(model, targets, config)
    return targets


def _leaf_specs(cls, spec: dict) -> dict[str, dict]:
    """{dense weight name: leaf spec}; a leaf layer's own spec is its only entry ("weight")."""
    return cls.weight_specs(spec) if getattr(cls, "composite", False) else {"weight": spec}


def _normalize_spec_ranks(cls, spec: dict) -> None:
    """Int ranks -> full rank lists in every leaf spec (what ADMM and the layers use)."""
    from .layers import registry
    from .layers.base import normalize_ranks
    for leaf in _leaf_specs(cls, spec).values():
        r = leaf.get("ranks")
        if r is not None and not isinstance(r, list):
            lcls = registry[leaf["class"]]
            leaf["ranks"] = normalize_ranks(r, lcls._modes(leaf), lcls.format, leaf["class"])


def _allocate(model, targets: list[Target], config: TNConfig) -> None:
    """Joint rank allocation (decompositions.allocate_ranks) over the tensorized weights."""
    from .decompositions import allocate_ranks
    tensors, fpp = {}, {}
    positions = _positions(model, [t.name for t in targets]) if config.budget == "flops" else {}
    for t in targets:
        if getattr(t.cls, "composite", False):  # recurrent: every matrix at the requested ratio (from_dense)
            continue
        weights = t.cls.dense_weights(t.module)
        (w,) = weights.values()
        tensors[t.name] = t.cls.tensorize(w.detach().float().cpu(), t.spec)
        fpp[t.name] = float(positions.get(t.name) or 1)
    if not tensors:
        return
    ranks = allocate_ranks(tensors, format=config.format, compression_ratio=config.compression_ratio,
                           budget=config.budget, flops_per_param=fpp if config.budget == "flops" else None,
                           allocation=config.allocation)
    for t in targets:
        if t.name in ranks:
            t.spec = dict(t.spec, ranks=list(ranks[t.name]))


# ----------------------------------------------------------------------------- FLOPs
def _default_input(model) -> torch.Tensor | None:
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if not size:
        return None
    p = next(model.parameters(), None)
    return torch.zeros(1, *size, device=p.device if p is not None else "cpu",
                       dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)


def _probe(model, names: list[str]) -> dict[str, tuple[tuple, int]]:
    """{name: (input shape, output positions per sample)} from one forward on a zero input."""
    x = _default_input(model)
    if x is None:
        return {}
    out: dict[str, tuple[tuple, int]] = {}
    hooks = []
    for name in names:
        mod = model.get_submodule(name)

        def hook(m, inp, o, name=name):
            o = o[0] if isinstance(o, tuple) else o
            if not (inp and torch.is_tensor(inp[0]) and torch.is_tensor(o)):
                return
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                pos = int(math.prod(o.shape[2:]))
            else:
                pos = int(o.numel() // o.shape[-1])
            out[name] = (tuple(inp[0].shape), pos)
        hooks.append(mod.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except Exception:  # FLOPs are informative only: fall back to per-position counts
        out = {}
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return out


def _positions(model, names: list[str]) -> dict[str, int]:
    return {k: v[1] for k, v in _probe(model, names).items()}


def _flops(module: nn.Module, tn_layer, probed) -> tuple[int | None, int | None]:
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


# ----------------------------------------------------------------------------- report
@dataclass
class CompressionReport:
    rows: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)

    _COLS = ("name", "type", "dense_params", "tn_params", "ratio", "ranks", "rel_error",
             "flops_dense", "flops_tn")

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows], "totals": dict(self.totals)}

    @staticmethod
    def _fmt(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            return "-".join(str(x) for x in v)
        if isinstance(v, dict):
            return "; ".join(f"{k}: {CompressionReport._fmt(x)}" for k, x in v.items())
        return str(v)

    def __str__(self) -> str:
        table = [list(self._COLS)]
        for r in self.rows:
            table.append([f"kept dense: {r['kept_dense']}" if c == "ranks" and r.get("kept_dense")
                          else self._fmt(r.get(c)) for c in self._COLS])
        t = self.totals
        table.append(["TOTAL (model)", "", self._fmt(t.get("model_params_dense")),
                      self._fmt(t.get("model_params_tn")), self._fmt(t.get("model_ratio")), "", "",
                      self._fmt(t.get("flops_dense")), self._fmt(t.get("flops_tn"))])
        widths = [max(len(row[i]) for row in table) for i in range(len(self._COLS))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in table]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(lines)

    __repr__ = __str__


# ----------------------------------------------------------------------------- swap
def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _rel_error(dense: dict[str, torch.Tensor], layer) -> float | None:
    try:
        rebuilt = type(layer).dense_weights(layer.to_dense())
    except Exception:
        return None
    num = den = 0.0
    for k, w in dense.items():
        if k in rebuilt:
            num += float((rebuilt[k].detach().double().cpu() - w.double().cpu()).pow(2).sum())
            den += float(w.double().pow(2).sum())
    return math.sqrt(num / den) if den > 0 else None


def compress(model: nn.Module, config, *, progress: bool = True) -> CompressionReport:
    """Swap the planned targets of ``model`` in place for TN layers decomposed from their weights."""
    from tqdm.auto import tqdm
    config = _as_config(config)
    model.__dict__.pop("tn_hf_kept_dense", None)
    targets = plan(model, config)
    kept = model.__dict__.pop("tn_hf_kept_dense", None) or {}  # {name: reason} from the speed planner
    if not targets and not kept:
        raise ValueError(f"compress: no module of {type(model).__name__} is a target for {config} "
                         "(all too small, skipped by default, or excluded)")
    model_params_dense = _n_params(model)
    probed = _probe(model, [t.name for t in targets] + list(kept))
    specs = dict(getattr(model, "tn_hf_specs", None) or {})
    rows = []
    for t in tqdm(targets, desc="tn_hf compress", disable=not progress):
        dense = {k: v.detach().clone() for k, v in t.cls.dense_weights(t.module).items()}
        dense_params = _n_params(t.module)
        composite = getattr(t.cls, "composite", False)
        kw: dict[str, Any] = {"compress_hidden": config.compress_hidden} if composite else {}
        if config.rel_error is not None:
            kw.update(rel_error=config.rel_error, max_rank=config.max_rank, n_modes=config.n_modes)
        elif composite and config.compression_ratio is not None:  # the planner may set a per-layer ratio
            kw.update(compression_ratio=t.spec.get("compression_ratio", config.compression_ratio),
                      n_modes=config.n_modes)
        elif composite:  # one rank (int or list) for every matrix of the recurrent layer
            r = t.spec.get("ranks")
            kw.update(ranks=r if r is not None else config.ranks, n_modes=config.n_modes)
        else:  # planned ranks and factors
            kw.update(ranks=t.spec["ranks"], in_factors=t.spec.get("in_factors"),
                      out_factors=t.spec.get("out_factors"))
        with torch.no_grad():
            layer = t.cls.from_dense(t.module, **kw)
        p = next(t.module.parameters())
        layer = layer.to(device=p.device, dtype=p.dtype)
        layer.train(t.module.training)
        set_module(model, t.name, layer)
        specs[t.name] = layer.spec()
        fd, ft = _flops(t.module, layer, probed.get(t.name))
        tn_params = _n_params(layer)
        rows.append({"name": t.name, "type": type(t.module).__name__, "tn_type": type(layer).__name__,
                     "dense_params": dense_params, "tn_params": tn_params,
                     "ratio": dense_params / max(tn_params, 1),
                     "ranks": _ranks_of(specs[t.name]), "rel_error": _rel_error(dense, layer),
                     "flops_dense": fd, "flops_tn": ft})
    from .cost import kept_dense_row
    rows += [kept_dense_row(model, name, why, probed.get(name)) for name, why in kept.items()]
    model.tn_hf_specs = specs
    model.tn_hf_config = config.to_dict()
    if _is_transformers(model):
        from .integrations.transformers import attach_quantization_config
        attach_quantization_config(model)
    model_params_tn = _n_params(model)
    td = sum(r["dense_params"] for r in rows)
    tt = sum(r["tn_params"] for r in rows)
    flops_known = all(r["flops_dense"] is not None for r in rows)
    totals = {"layers": len(rows), "target_params_dense": td, "target_params_tn": tt,
              "target_ratio": td / max(tt, 1), "model_params_dense": model_params_dense,
              "model_params_tn": model_params_tn,
              "model_ratio": model_params_dense / max(model_params_tn, 1),
              "flops_dense": sum(r["flops_dense"] for r in rows) if flops_known else None,
              "flops_tn": sum(r["flops_tn"] for r in rows) if flops_known else None,
              "flops_per": "sample" if probed else "position"}
    report = CompressionReport(rows, totals)
    model.tn_hf_report = report  # used by save_pretrained's model card
    return report


def _ranks_of(spec: dict):
    subs = spec.get("weights")
    if isinstance(subs, dict):  # composite (recurrent) layers: ranks of each TN matrix
        return {k: v.get("ranks") for k, v in subs.items() if isinstance(v, dict)}
    return spec.get("ranks")


def apply_specs(model: nn.Module, specs: dict[str, dict]) -> nn.Module:
    """Swap the modules named in ``specs`` for empty TN layers built from the specs (for loading).

    New layers take the device/dtype of the module they replace (meta stays meta)."""
    from .layers import layer_from_spec
    names = dict(model.named_modules())
    for name, spec in specs.items():
        if name not in names:
            raise ValueError(f"TN spec names module {name!r}, which {type(model).__name__} does not have; "
                             f"some module names: {[n for n in names if n][:20]}")
        old = names[name]
        try:
            p = next(old.parameters())
            device, dtype = p.device, p.dtype
        except StopIteration:
            device, dtype = torch.device("cpu"), torch.get_default_dtype()
        with torch.device(device):
            try:
                layer = layer_from_spec(spec)
            except (KeyError, ValueError) as e:
                raise ValueError(f"module {name!r}: cannot build TN layer from spec "
                                 f"(class {spec.get('class')!r}): {e}") from e
        if dtype.is_floating_point:
            layer = layer.to(dtype=dtype)
        layer.train(old.training)
        set_module(model, name, layer)
    model.tn_hf_specs = dict(specs)
    return model


def decompress(model: nn.Module) -> nn.Module:
    """Replace every TN layer by its plain torch module (rebuilt weights); drops the TN metadata."""
    from .layers.base import TNLayer
    names = [n for n, m in model.named_modules() if isinstance(m, TNLayer)]
    top = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    for name in top:
        layer = model.get_submodule(name)
        with torch.no_grad():
            dense = layer.to_dense()
        dense.train(layer.training)
        set_module(model, name, dense)
    for attr in ("tn_hf_specs", "tn_hf_config", "tn_hf_report"):
        if attr in model.__dict__:
            delattr(model, attr)
    if _is_transformers(model):
        from .integrations.transformers import detach_quantization_config
        detach_quantization_config(model)
    return model
