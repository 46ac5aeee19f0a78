"""compress(model, config) / decompress(model) / apply_specs(model, specs): swap modules in place.

``compress`` decomposes the current weights of the planned targets (``targeting.plan``) and swaps
them for TN layers; half-precision weights are decomposed in float32 and cast back.
``decompress`` swaps every TN layer back to its plain torch module (export, ONNX).
``apply_specs`` swaps the modules named in a checkpoint's specs for *empty* TN layers on the meta
device (loading; ``serialization.load_weights`` allocates them after checking the file).

Integrations that keep extra state on the model (transformers' ``config.quantization_config``)
register callbacks in ``MODEL_HOOKS`` instead of being imported here: dependencies point down.
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Callable, TypeVar, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from . import decompositions as D
from .cost import kept_dense_row
from .decompositions import ranks_for_ratio
from .layers import is_unsupported_subclass, layer_from_spec, registry
from .layers.base import TNLayer, keep_rng
from .layers.tucker import tie_shared_cores
from .report import CompressionReport, flops, layer_row, n_stored, probe, rel_error
from .serialization import CheckpointError, check_specs
from .targeting import FORM_KEYS, is_transformers, leaf_specs, resolve

# "specs_changed": called with the model after compress / apply_specs; "decompressed": after decompress.
# Tucker's shared core (SCADA) is tied here: a no-op for models without one.
MODEL_HOOKS: dict[str, list[Callable[[nn.Module], None]]] = {"specs_changed": [tie_shared_cores], "decompressed": []}


def _run_hooks(event: str, model: nn.Module) -> None:
    for fn in MODEL_HOOKS[event]:
        fn(model)


def _decompose(t, config) -> TNLayer:
    """The TN layer for one target, decomposed from its current weights (float32 for half types)."""
    composite = t.cls.composite
    kw: dict[str, Any] = {"compress_hidden": config.compress_hidden} if composite else {}
    if config.rel_error is not None:
        kw.update(rel_error=config.rel_error, max_rank=config.max_rank, n_modes=config.n_modes)
    elif composite and all(w.get("ranks") is not None for w in t.spec.get("weights", {}).values()):
        kw.update(weight_specs=t.spec["weights"])  # every matrix at its planned ranks (ADMM's plan)
    elif composite and config.compression_ratio is not None:  # the speed planner may set a per-layer ratio
        kw.update(compression_ratio=t.spec.get("compression_ratio", config.compression_ratio), n_modes=config.n_modes)
    elif composite:  # one rank (int or list) for every matrix of the recurrent layer
        r = t.spec.get("ranks")
        kw.update(ranks=r if r is not None else config.ranks, n_modes=config.n_modes)
    else:  # planned ranks and factors
        kw.update(ranks=t.spec["ranks"], in_factors=t.spec.get("in_factors"), out_factors=t.spec.get("out_factors"))
    kw.update({k: t.spec[k] for k in FORM_KEYS if k in t.spec})  # the conv layout / 1x1 kernel the plan chose
    if getattr(t.cls, "pointwise_modes", None):
        kw.setdefault("pointwise", "conv")  # a spec without the key means the conv kernel (as layer_from_spec)
    p = next(t.module.parameters())
    src = t.module if p.dtype in (torch.float32, torch.float64) else copy.deepcopy(t.module).float()
    with torch.no_grad():
        layer = t.cls.from_dense(src, **kw)
    layer = layer.to(device=p.device, dtype=p.dtype)
    layer.train(t.module.training)
    return layer


@torch.no_grad()
def _refine(t, layer: TNLayer, init: dict) -> None:
    """Refit the TR / BT leaves of a fresh ``layer`` from ``init`` ({dense weight name: cores}, warm starts)
    and keep the refit where it fits the dense weight better than the cold decomposition it was built with."""
    composite = getattr(t.cls, "composite", False)
    weights = t.cls.dense_weights(t.module, t.spec)
    for wname, cores in init.items():
        leaf = getattr(layer, wname[len("weight_"):], None) if composite else layer
        if not isinstance(leaf, TNLayer) or leaf.format not in D.WARM_FORMATS or wname not in weights:
            continue
        if [tuple(c.shape) for c in cores] != [tuple(p.shape) for p in leaf.cores]:
            continue  # other ranks than the layer's (a rank-deficient weight): keep the cold cores
        x = leaf.tensorize(weights[wname].detach().float(), leaf._spec)
        warm = D.fit(x, leaf.ranks, leaf.format, init=[c.to(x.device).float() for c in cores])
        if (D.to_full(warm, leaf.format) - x).norm() < (leaf.full_tensor().float() - x).norm():
            leaf.load_cores(warm)


def _note(row: dict, layer, config) -> str | None:
    asked = config.compression_ratio
    if asked is None or row["ratio"] >= 0.9 * asked:
        return None
    if layer.composite and not config.compress_hidden:
        return (f"{row['ratio']:.2f}x, not {asked:g}x: its hidden-to-hidden weights stay dense "
                "(TNConfig(compress_hidden=True) compresses them too)")
    if config.allocation == "global":
        return f"{row['ratio']:.2f}x: the global allocation gave this layer more rank (its spectrum decays slowly)"
    return f"{row['ratio']:.2f}x, not {asked:g}x: ranks are capped by the tensor's shape"


def _subclass_hint(model) -> str:
    """Names the subclasses of supported types (e.g. timm's weight-standardized StdConv2d) in ``model``:
    their forward differs from the base class's, so they are never targets."""
    subs = sorted({type(m).__name__ for m in model.modules() if is_unsupported_subclass(m)})
    return (f"; {', '.join(subs)} subclass a supported type with a forward of their own (e.g. weight "
            "standardization) and are not compressed") if subs else ""


_MODEL_ATTRS = ("tn_hf_specs", "tn_hf_config", "tn_hf_report")


_F = TypeVar("_F", bound=Callable[..., Any])


def _all_or_nothing(fn: _F) -> _F:
    """Run ``fn(model, ...)``; on any failure (an exception, Ctrl-C) put back every submodule it swapped
    and the model's tn_hf attributes, so the model is as it was, then re-raise."""
    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args, **kwargs):
        children = [(m, dict(m._modules)) for m in model.modules()]
        attrs = {a: model.__dict__[a] for a in _MODEL_ATTRS if a in model.__dict__}
        try:
            return fn(model, *args, **kwargs)
        except BaseException:
            specs_before = attrs.get("tn_hf_specs")
            synced = model.__dict__.get("tn_hf_specs") is not specs_before  # the hooks may have run
            for m, kids in children:
                m._modules.clear()
                m._modules.update(kids)
            for a in _MODEL_ATTRS:
                model.__dict__.pop(a, None)
            model.__dict__.update(attrs)
            if synced and specs_before:
                _run_hooks("specs_changed", model)
            elif synced:
                _run_hooks("decompressed", model)
            raise
    return cast(_F, wrapper)


def _keeping_rng(fn):
    """``fn(model, ...)`` with the caller's random streams saved and restored (``layers.base.keep_rng``)."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kw):
        with keep_rng(model):
            return fn(model, *args, **kw)
    return wrapper


def _stage_bar(stage: str, progress: bool) -> tqdm:
    """A progress bar shown from the start of ``compress``: the stage's name and the time spent in it
    until the per-layer count begins."""
    return tqdm(total=None, desc=f"tn_hf compress: {stage}", disable=not progress, unit="layer",
                bar_format="{desc} ({elapsed})")


@_all_or_nothing
@_keeping_rng
def compress(model: nn.Module, config, *, progress: bool = True, method: str = "direct",
             init: dict | None = None) -> CompressionReport:
    """Swap the planned targets of ``model`` in place for TN layers decomposed from their weights.

    Args:
        model: any ``nn.Module`` (timm, transformers, plain torch); changed in place.
        config: a ``Plan`` (``tn_hf.plan`` / ``tn_hf.tune``, or ``Plan.load``), or a ``TNConfig`` (or
            its dict), planned first with ``tn_hf.plan``: the same modules and ranks everywhere.
        progress: show a progress bar.
        method: how the weights were prepared, for the report and the model card: "direct"
            (plain decomposition) or "admm" (``ADMMScheduler.compress`` passes it).
        init: ``{target: {dense weight name: cores}}``, starting points for the TR / BT fits, which have
            no closed form (``ADMMScheduler`` passes the cores of its last Z-step): the refit from them
            replaces the cold decomposition where it fits the weight better.
    Returns:
        the ``CompressionReport`` (also kept as ``model.tn_hf_report`` for the model card).

    All or nothing: if any target fails (or the call is interrupted), every module swapped so far
    is put back and the model is as it was before the call.
    """
    bar = _stage_bar("planning", progress)  # from the start: says what runs before the first layer is done
    the_plan, targets = resolve(model, config)
    config, kept = the_plan.config, the_plan.kept_dense  # kept: {name: reason}, left dense by the planner
    if not targets and not kept:
        bar.close()
        raise ValueError(f"compress: no module of {type(model).__name__} is a target for {config} "
                         "(all too small, skipped by default, or excluded)" + _subclass_hint(model))
    bar.set_description_str("tn_hf compress: probing input shapes")
    probed = probe(model, [t.name for t in targets] + list(kept), config.input_size)
    specs = dict(getattr(model, "tn_hf_specs", None) or {})
    rows = []
    bar.bar_format = None
    bar.set_description_str("tn_hf compress: decomposing", refresh=False)
    bar.reset(total=len(targets))
    for t in targets:
        bar.set_postfix_str(t.name, refresh=False)
        dense = {k: v.detach().clone() for k, v in t.cls.dense_weights(t.module).items()}
        try:
            layer = _decompose(t, config)
            if init and t.name in init:
                _refine(t, layer, init[t.name])
        except ValueError as e:
            raise ValueError(f"module {t.name!r} ({type(t.module).__name__}): {e}") from None
        model.set_submodule(t.name, layer)
        specs[t.name] = layer.spec()
        fd, ft = flops(t.module, layer, probed.get(t.name))
        row = layer_row(t.name, layer, specs[t.name], t.module, rel_error=rel_error(dense, layer), flops_dense=fd,
                        flops_tn=ft)
        note = "; ".join(n for n in (t.note, _note(row, layer, config)) if n)
        if note:
            row["note"] = note
        rows.append(row)
        bar.update(1)
    bar.close()
    rows += [kept_dense_row(model, name, why, probed.get(name)) for name, why in kept.items()]
    setattr(model, "tn_hf_specs", specs)  # plain attributes (nn.Module.__setattr__ is typed for tensors/modules)
    setattr(model, "tn_hf_config", config.to_dict())
    _run_hooks("specs_changed", model)
    report = CompressionReport.build(rows, model_params_tn=n_stored(model), requested_ratio=config.compression_ratio,
                                     flops_per="sample" if probed else "position", method=method)
    setattr(model, "tn_hf_report", report)  # used by save_pretrained's model card
    return report


def preview(model: nn.Module, config) -> CompressionReport:
    """The per-layer plan of ``compress`` (params, ranks, FLOPs) without decomposing anything.

    Layers are built on the meta device from the planned specs; recurrent layers planned at a ratio
    get the ranks ``from_dense`` would pick."""
    the_plan, targets = resolve(model, config)
    config, kept = the_plan.config, the_plan.kept_dense
    if config.rel_error is not None:
        raise ValueError("preview: TNConfig(rel_error=...) fixes the ranks only when decomposing; "
                         "use ranks= or compression_ratio=")
    probed = probe(model, [t.name for t in targets] + list(kept), config.input_size)
    rows = []
    for t in targets:
        spec = copy.deepcopy(t.spec)
        for leaf in leaf_specs(t.cls, spec).values():  # recurrent at a ratio: what from_dense picks
            if leaf.get("ranks") is None:
                lcls = registry[leaf["class"]]
                ratio = t.spec.get("compression_ratio", config.compression_ratio)
                leaf["ranks"] = ranks_for_ratio(lcls._modes(leaf), ratio, lcls.format)
        with torch.device("meta"):
            layer = layer_from_spec(spec)
        fd, ft = flops(t.module, layer, probed.get(t.name))
        row = layer_row(t.name, layer, spec, t.module, flops_dense=fd, flops_tn=ft)
        if t.note:
            row["note"] = t.note
        rows.append(row)
    rows += [kept_dense_row(model, name, why, probed.get(name)) for name, why in kept.items()]
    return CompressionReport.build(rows, model_params_tn=n_stored(model) - sum(r["dense_params"] - r["tn_params"]
                                                                                for r in rows),
                                   requested_ratio=config.compression_ratio,
                                   flops_per="sample" if probed else "position", dry_run=True)


def apply_specs(model: nn.Module, specs: dict[str, dict], *, where: str = "checkpoint") -> nn.Module:
    """Swap the modules named in ``specs`` for empty TN layers on the meta device (for loading).

    The specs are checked first (``serialization.check_specs``); the new layers take the dtype of
    the module they replace and are allocated by ``serialization.load_weights`` (or transformers)."""
    check_specs(model, specs, where)
    for name, spec in specs.items():
        old = model.get_submodule(name)
        dtype = next((p.dtype for p in old.parameters()), None)
        try:
            with torch.device("meta"):
                layer = layer_from_spec(spec)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise CheckpointError(f"{where}: module {name!r}: cannot build TN layer from spec "
                                  f"(class {spec.get('class')!r}): {e}") from e
        if dtype is not None and dtype.is_floating_point:
            layer = layer.to(dtype=dtype)
        layer.train(old.training)
        model.set_submodule(name, layer)
    setattr(model, "tn_hf_specs", dict(specs))
    _run_hooks("specs_changed", model)
    return model


def decompress(model: nn.Module) -> nn.Module:
    """Replace every TN layer by its plain torch module (rebuilt weights); drops the TN metadata."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, TNLayer)}
    top = [n for n in layers if not any(n.startswith(o + ".") for o in layers if o != n)]
    for name in top:
        layer = layers[name]
        with torch.no_grad():
            dense = layer.to_dense()
        dense.train(layer.training)
        model.set_submodule(name, dense)
    for attr in ("tn_hf_specs", "tn_hf_config", "tn_hf_report"):
        if attr in model.__dict__:
            delattr(model, attr)
    _run_hooks("decompressed", model)
    return model


__all__ = ["compress", "preview", "decompress", "apply_specs", "is_transformers", "MODEL_HOOKS"]
