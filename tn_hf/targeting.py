"""Which modules get compressed, and at which ranks: ``plan(model, config) -> Plan`` (a list of ``Target``).

Default skips (what users of peft/torchao expect), applied when ``target_modules`` is None:
the stem (timm ``pretrained_cfg["first_conv"]``; plain torch: the first conv), the head (timm
``pretrained_cfg["classifier"]``; transformers: the output embeddings and modules named
classifier/head/lm_head/score; plain torch: the last Linear) and modules below ``min_params``.
Always skipped (they can't be swapped safely): grouped/depthwise convs, modules whose
parameters are shared with another module (tied heads), ``model._keep_in_fp32_modules`` and
RWKV's ``attention.output`` / ``feed_forward.value`` when ``config.rescale_every > 0`` (RWKV
rescales those weights in place in eval mode, which a TN layer's rebuilt weight can't follow).
Every skip is logged (``logging`` at DEBUG, logger ``tn_hf.targeting``).

``plan`` is shared by ``compress`` and ``ADMMScheduler``, so both use the same ranks.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import sys
from dataclasses import dataclass
from typing import Any

from torch import nn

from ._version import __version__
from .config import TNConfig
from .cost import PLAN_BATCHES, CostModel, device_name, plan_for_speed
from .decompositions import allocate_ranks
from .layers import SUPPORTED_TYPES, layer_type, registry, tn_class_for
from .layers.base import TNLayer, keep_rng, n_params, normalize_ranks
from .layers.bt import plan_bt
from .layers.tucker import plan_tucker
from .plans import Plan, PlanError, as_plan_or_config
from .report import probe
from .serialization import interface_diff

logger = logging.getLogger(__name__)
_HEAD_NAMES = ("classifier", "head", "heads", "lm_head", "score")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


FORM_KEYS = ("kernel_mode", "pointwise")  # conv form options the plan may choose (layer constructor kwargs)
LAYOUT_KEYS = ("in_factors", "out_factors", *FORM_KEYS)  # a spec's tensorization and form (the ranks apart)


@dataclass
class Target:
    """One module to compress: its name, the module, the TN class replacing it and its spec (and
    what the speed planner has to say about its form, for the report)."""
    name: str
    module: nn.Module
    cls: type[TNLayer]
    spec: dict
    note: str | None = None


def as_config(config) -> TNConfig:
    if isinstance(config, TNConfig):
        return config
    if isinstance(config, dict):
        return TNConfig.from_dict(config)
    raise TypeError(f"config must be a TNConfig or a dict, got {type(config).__name__}")


def is_transformers(model) -> bool:
    tf = sys.modules.get("transformers")  # not imported -> can't be a transformers model
    return tf is not None and isinstance(model, tf.PreTrainedModel)


# ----------------------------------------------------------------------------- matching
def _matches_one(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def matches(name: str, pattern: str) -> bool:
    """peft-style: exact name, ``name`` ending with ``.pattern`` or ``re.fullmatch``; a pattern that
    matches a container (``"layer4"``) matches every module inside it."""
    parts = name.split(".")
    return any(_matches_one(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def _names(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [v for v in value if v]


# ----------------------------------------------------------------------------- skip rules
def _stem_and_head(model: nn.Module) -> tuple[str | None, set[str]]:
    """(stem module name, head module names) (see module docstring)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and ("first_conv" in cfg or "classifier" in cfg):  # timm
        stem = _names(cfg.get("first_conv"))
        return (stem[0] if stem else None), set(_names(cfg.get("classifier")))
    first_conv = next((n for n, m in model.named_modules() if isinstance(m, _CONVS)), None)
    if is_transformers(model):
        get_out = getattr(model, "get_output_embeddings", None)
        emb = get_out() if callable(get_out) else None
        heads = {n for n, m in model.named_modules()
                 if (emb is not None and m is emb) or n.split(".")[-1] in _HEAD_NAMES}
        return None, heads
    last_linear = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last_linear = name
    return first_conv, ({last_linear} if last_linear else set())


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


def always_skipped(model: nn.Module, name: str, module: nn.Module, shared: set[str]) -> str | None:
    """Why this module can never be swapped (None if it can)."""
    if isinstance(module, _CONVS) and module.groups != 1:
        return f"grouped conv (groups={module.groups})"
    if name in shared:
        return "its parameters are shared with another module (tied weights)"
    for k in getattr(model, "_keep_in_fp32_modules", None) or ():
        if re.search(rf"(^|\.){re.escape(k)}(\.|$)", name):
            return f"in model._keep_in_fp32_modules ({k})"
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) == "rwkv" and (getattr(cfg, "rescale_every", 0) or 0) > 0:
        if name.endswith("attention.output") or name.endswith("feed_forward.value"):
            return "RWKV rescales this weight in place (config.rescale_every > 0)"
    return None


def _skip_reason(model, name, module, config: TNConfig, explicit, excluded, shared, stem, heads) -> str | None:
    if explicit and not any(matches(name, p) for p in explicit):
        return "not in target_modules"
    if any(matches(name, p) for p in excluded):
        return "in exclude_modules"
    why = always_skipped(model, name, module, shared)
    if why or explicit:
        return why
    if config.skip_stem and name == stem:
        return "the stem (skip_stem=True)"
    if config.skip_head and name in heads:
        return "the classifier head (skip_head=True)"
    if n_params(module) < config.min_params:
        return f"{n_params(module)} params < min_params={config.min_params}"
    return None


# ----------------------------------------------------------------------------- plan
def _with_inputs(config, input_size, example_inputs) -> TNConfig:
    """``config`` with ``input_size`` set from the arguments (``example_inputs``: a tuple holding one
    batched tensor, as torch.export takes; its shape without the batch dimension)."""
    config = as_config(config)
    if example_inputs is not None:
        xs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        if len(xs) != 1 or not hasattr(xs[0], "shape") or len(xs[0].shape) < 2:
            raise ValueError("example_inputs: a tuple holding one batched input tensor, (x,); for other inputs "
                             "give input_size= (one sample's shape)")
        input_size = list(xs[0].shape[1:])
    if input_size is not None:
        config = dataclasses.replace(config, input_size=[int(v) for v in input_size])
    return config


def plan(model: nn.Module, config, *, input_size=None, example_inputs=None) -> Plan:
    """The deterministic plan of ``compress(model, config)``: which modules become which TN layers at
    which ranks (allocated where the config allows) and which stay dense, and why. Decided by rules
    and the reference cost model from the layers' shapes (``tn_hf.cost``): the same plan in every
    process, on every machine, at any thread count. Nothing is timed; the caller's random streams
    are untouched. Save it (``plan.save(path)``) to reuse it, or measure with ``tune``.

    The speed planner needs the input size: timm models declare it; for others give ``input_size=``
    (one sample's shape, e.g. ``(1, 28, 28)``) or ``example_inputs=(x,)`` (as torch.export takes), or
    ``TNConfig(input_size=...)``; it is recorded in the plan's config."""
    config = _with_inputs(config, input_size, example_inputs)
    with keep_rng(model):
        targets, kept = select(model, config)
    return _as_plan(model, config, targets, kept)


def tune(model: nn.Module, config, *, device=None, batch_sizes=PLAN_BATCHES, dtype=None, cache=None,
         input_size=None, example_inputs=None) -> Plan:
    """Like ``plan``, with every candidate form timed on ``device`` (default: the model's) in ``dtype``
    (default: the model's) at ``batch_sizes``, instead of the reference cost model: the fastest plan
    for that machine, recorded in ``Plan.tuned``. Times are cached in ``cache`` (default
    ``$TN_HF_CACHE/cost.json``). Under torch.distributed process 0 measures and every process gets
    its plan. Needs ``compression_ratio=`` (fixed ranks leave nothing to choose); ``input_size`` /
    ``example_inputs`` as for ``plan``."""
    import torch

    config = _with_inputs(config, input_size, example_inputs)
    if config.compression_ratio is None:
        raise ValueError("tune: the planner chooses ranks and forms for a compression_ratio=; with ranks= or "
                         "rel_error= there is nothing to measure (use tn_hf.plan)")
    if not config.plan_for_speed:
        raise ValueError("tune: TNConfig(plan_for_speed=False) asks for size alone to decide; tune measures speed "
                         "(use tn_hf.plan, or plan_for_speed=True)")
    batches = tuple(sorted({int(b) for b in batch_sizes}))
    if not batches or batches[0] < 1:
        raise ValueError(f"tune: batch_sizes={batch_sizes!r}; valid: one or more ints >= 1")
    p = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    dtype = dtype if dtype is not None else (p.dtype if p is not None and p.is_floating_point() else torch.float32)
    timer = CostModel(cache, batches=batches, device=device, dtype=dtype)
    with keep_rng(model):
        targets, kept = select(model, config, timer=timer)
    tuned = {"device": device_name(device), "dtype": str(dtype).removeprefix("torch."), "batch_sizes": list(batches),
             "threads": torch.get_num_threads(), "torch": torch.__version__, "tn_hf": __version__}
    return _as_plan(model, config, targets, kept, tuned)


def _as_plan(model, config: TNConfig, targets: list[Target], kept: dict[str, str], tuned=None) -> Plan:
    return Plan(config, {t.name: t.spec for t in targets}, dict(kept),
                {t.name: t.note for t in targets if t.note}, type(model).__name__, tuned)


def resolve(model: nn.Module, plan_or_config) -> tuple[Plan, list[Target]]:
    """(the plan, its targets in ``model``) for a ``Plan`` (checked against the model: every target
    exists and its spec fits the module) or a config (planned now)."""
    value = as_plan_or_config(plan_or_config)
    p = value if isinstance(value, Plan) else plan(model, value)
    return p, targets_of(model, p)


def targets_of(model: nn.Module, p: Plan) -> list[Target]:
    """The plan's targets in ``model``, in model order; a PlanError names a target the model lacks or
    whose module the spec does not fit (a plan made for another model)."""
    modules = dict(model.named_modules())
    out = []
    for name, spec in p.specs.items():
        module = modules.get(name)
        if module is None:
            raise PlanError(f"plan (for {p.model or 'a model'}) targets {name!r}, which {type(model).__name__} does "
                            f"not have; some of its module names: {[n for n in modules if n][:20]}")
        cls = registry.get(str(spec.get("class")))
        try:
            expected = tn_class_for(module, p.config.format)
        except ValueError as e:
            raise PlanError(f"plan: module {name!r}: {e}") from None
        if cls is not expected:
            raise PlanError(f"plan: module {name!r} is a {type(module).__name__}: its TN class for format "
                            f"{p.config.format!r} is {expected.__name__}, the plan says {spec.get('class')!r}")
        where = f"plan: module {name!r} ({type(module).__name__}) does not fit its spec: "
        diff = interface_diff(spec, module)  # shapes, stride, padding, ...
        if diff:
            raise PlanError(where + ", ".join(f"{k}={a!r} in the plan, {b!r} in the model"
                                              for k, (a, b) in diff.items()))
        if not cls.composite:
            try:
                cls.dense_spec(module, **{k: spec[k] for k in LAYOUT_KEYS if k in spec})  # its layout fits too
            except (TypeError, ValueError) as e:
                raise PlanError(where + str(e)) from None
        out.append(Target(name, module, cls, spec, p.notes.get(name)))
    order = {n: i for i, n in enumerate(modules)}
    return sorted(out, key=lambda t: order[t.name])


def select(model: nn.Module, config: TNConfig, timer=None) -> tuple[list[Target], dict[str, str]]:
    """(the targets with their specs, {target kept dense: reason}) for ``config``; ``timer``: where the
    speed planner's times come from (None: the reference cost model, ``tn_hf.cost.Estimator``)."""
    rank_dict = config.ranks if isinstance(config.ranks, dict) else None
    explicit = _names(config.target_modules) or (list(rank_dict) if rank_dict else [])
    all_names = [n for n, _ in model.named_modules() if n]
    for pat in explicit:
        if not any(matches(n, pat) for n in all_names):
            cands = [n for n, m in model.named_modules() if layer_type(m)][:20]
            raise ValueError(f"target_modules pattern {pat!r} matches no module of "
                             f"{type(model).__name__}; some candidate module names: {cands}")
    excluded = _names(config.exclude_modules)
    shared = _shared_modules(model)
    stem, heads = _stem_and_head(model)

    targets = []
    for name, module in model.named_modules():
        ltype = layer_type(module)
        if ltype is None or ltype not in config.layer_types:
            continue
        why = _skip_reason(model, name, module, config, explicit, excluded, shared, stem, heads)
        if why:
            logger.debug("tn_hf: skipping %s (%s): %s", name, type(module).__name__, why)
            continue
        cls = tn_class_for(module, config.format)
        ranks = None
        if rank_dict is not None:
            key = next((k for k in rank_dict if matches(name, k)), None)
            if key is None:
                raise ValueError(f"TNConfig.ranks has no entry for target {name!r}; keys: {list(rank_dict)}")
            ranks = rank_dict[key]
        elif config.ranks is not None:
            ranks = config.ranks
        kw: dict[str, Any] = {"compress_hidden": config.compress_hidden} if cls.composite else {}
        if getattr(cls, "kernel_modes", None):
            kw["kernel_mode"] = kernel_mode_for(config, name)
        try:
            spec = cls.dense_spec(module, ranks=ranks, n_modes=config.n_modes, **kw)
            if ranks is not None:
                _normalize_spec_ranks(cls, spec)
        except ValueError as e:
            raise ValueError(f"module {name!r} ({type(module).__name__}): {e}") from None
        targets.append(Target(name, module, cls, spec))

    if explicit and not targets:
        types = sorted({type(m).__name__ for n, m in model.named_modules()
                        if any(_matches_one(n, p) for p in explicit)})
        raise ValueError(f"target_modules {explicit} match only modules of types {types}, none of which can be "
                         f"compressed; supported types: {list(SUPPORTED_TYPES)} (layer_types={config.layer_types})")
    if config.format in ("tucker", "bt"):  # ranks from the spectra (layers.tucker / layers.bt), no speed planner
        (plan_tucker if config.format == "tucker" else plan_bt)(targets, config)
    elif config.compression_ratio is not None and targets:
        probed = probe(model, [t.name for t in targets], config.input_size)  # feeds allocation and planner
        _check_sizes_known(model, config, probed)
        if config.budget != "latency":  # latency: the speed planner picks the ranks
            _allocate(model, targets, config, probed)
        # the speed planner keeps dense what is not smaller (or, measured, not faster)
        return plan_for_speed(model, targets, config, allocate=_allocate, probed=probed, timer=timer)
    return targets, {}


def kernel_mode_for(config: TNConfig, name: str) -> str:
    """The conv layout a target starts from: config.kernel_mode for it ("auto" starts as "own";
    measured planning may switch it, tn_hf.cost)."""
    mode = config.kernel_mode
    if isinstance(mode, dict):
        mode = next((m for k, m in mode.items() if matches(name, k)), "own")
    return "own" if mode == "auto" else mode


def leaf_specs(cls, spec: dict) -> dict[str, dict]:
    """{dense weight name: leaf spec}; a leaf layer's own spec is its only entry ("weight")."""
    return cls.weight_specs(spec) if cls.composite else {"weight": spec}


def _normalize_spec_ranks(cls, spec: dict) -> None:
    """Int ranks -> full rank lists in every leaf spec (what ADMM and the layers use)."""
    for leaf in leaf_specs(cls, spec).values():
        r = leaf.get("ranks")
        if r is not None and not isinstance(r, list):
            lcls = registry[leaf["class"]]
            leaf["ranks"] = normalize_ranks(r, lcls._modes(leaf), lcls.format, leaf["class"])


def _check_sizes_known(model: nn.Module, config: TNConfig, probed: dict) -> None:
    """The FLOPs budgets and the time allocation need the targets' input shapes (``probed`` empty:
    the model's input size is unknown, or its probe forward failed)."""
    need = (("allocation='time'", "allocation='global' / 'uniform'") if config.allocation == "time" else
            (f"budget={config.budget!r}", "budget='auto' / 'params'") if config.budget in ("flops", "params+flops")
            else None)
    if need and not probed:
        raise ValueError(f"TNConfig({need[0]}) needs the input size of {type(model).__name__}, which declares none "
                         "(or its forward on a zero input of that size failed): give one sample's shape, "
                         "TNConfig(input_size=[3, 224, 224]) or tn_hf.plan(model, config, input_size=...) / "
                         f"example_inputs=(x,), or use {need[1]}")


def _allocate(model, targets: list[Target], config: TNConfig, probed: dict) -> None:
    """Joint rank allocation (decompositions.allocate_ranks) over the tensorized weights; ``probed``
    (``report.probe``) gives the output positions the FLOPs budgets count. ``budget="auto"``:
    "params+flops" for the global allocation planning for speed where every weight's input shape is
    known, else "params"."""
    allocation = "uniform" if config.allocation == "time" else config.allocation
    tensors, fpp = {}, {}
    for t in targets:
        if t.cls.composite:  # recurrent: every matrix at the requested ratio (from_dense)
            continue
        (w,) = t.cls.dense_weights(t.module).values()
        tensors[t.name] = t.cls.tensorize(w.detach().float().cpu(), t.spec)
        fpp[t.name] = float(probed[t.name].positions if t.name in probed else 1)
    if not tensors:
        return
    budget = config.budget
    if budget == "auto":
        speed = allocation == "global" and config.plan_for_speed and all(n in probed for n in tensors)
        budget = "params+flops" if speed else "params"
    assert config.compression_ratio is not None  # (allocation runs for a ratio only)
    ranks = allocate_ranks(tensors, format=config.format, compression_ratio=config.compression_ratio,
                           budget=budget, flops_per_param=fpp if budget != "params" else None,
                           allocation=allocation)
    for t in targets:
        if t.name in ranks:
            t.spec = dict(t.spec, ranks=list(ranks[t.name]))
