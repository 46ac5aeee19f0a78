"""Plan for speed: per target, the TN form that is smaller *and* faster than the dense layer.

``targeting.select`` calls ``plan_for_speed`` for every config with a ``compression_ratio``.
Always: a target whose TN form has at least the dense layer's weight params, or more FLOPs at
the probed input shape, gets smaller ranks (the next param ratio of ``LATENCY_GRID`` that fixes
it) or, if none does, stays dense. With ``TNConfig(plan_for_speed=True)`` (the default) or
``budget="latency"`` the forms are also compared by *time*, as below, wherever the input shapes
are known; ``plan_for_speed=False`` keeps the size rule alone.

Where times come from (a ``Timer``):

* ``Estimator`` (``tn_hf.plan``, the default, deterministic): the reference cost model. Each form
  (and the dense layer) is built on the meta device and one eval forward is traced (``trace``:
  the kernels it runs, with their FLOPs, the bytes they read and write, and their smallest GEMM
  dimension); ``estimate_seconds`` prices each kernel as ``overhead + FLOPs x per_flop x (1 +
  small_dim / inner) + bytes x per_byte`` with the fixed ``COST_CONSTANTS`` of its kind (GEMM,
  NCHW conv, channels-last conv, other). Nothing is run or timed: the plan depends only on the
  weights, the config and the shapes, so every process, machine and thread count gets the same
  plan. The constants were fitted once to CPU eval forwards of dense and TN layers (see
  ``COST_CONSTANTS``); a target device that differs much is what ``tune`` is for.
* ``CostModel`` (``tn_hf.tune``, opt-in): measured eval times on the device (and dtype) the
  model will run on, dense and TN timed alternately (fastest of repeats after warm-up,
  ``measure_pair``, on inputs from a generator of its own), cached in ``$TN_HF_CACHE/cost.json``
  (default ``~/.cache/tn_hf``) keyed by the form's spec, the dense module, the input shape and
  format, device name, dtype, thread count, torch version and a hash of the layers' source. The
  cache is validated on read (bad entries are ignored with a warning) and kept in memory when it
  can't be written. Under torch.distributed process 0 measures and every process adopts its plan.

Cost. The cost of a form is its eval forward time (``torch.no_grad``, merged cores cached, see
``TNLayer.cached``) over that of the dense layer, at the input shape the layer sees in the model,
in the memory format it sees (channels-last when the model was converted with
``model.to(memory_format=torch.channels_last)`` before planning), at the timer's batch sizes
(``PLAN_BATCHES`` = (1, 32) by default). Input shapes and formats come from one probe forward
(``report.probe``: models that declare ``pretrained_cfg["input_size"]``, as timm models do, or
``TNConfig.input_size``). Where the input shape is unknown the size rule alone applies.

Candidates. With ``budget="params"`` / ``"flops"`` the rank allocation fixes each layer's
parameter budget ``P`` (its TN params at the allocated ranks). The candidates are the
allocated ranks and the same ranks with the internal ranks above 8 (16) rounded to multiples
of 8 (16), all down or one up and the rest down (``aligned_variants``), kept when their
params are in [``MIN_FILL * P``, ``P``]: kernels run markedly faster at aligned channel
counts (a 3x3 conv 96 -> 96 channels at 14x14 took half the time of 102 -> 102 here). The
tensorization is the layer class's default (TTLinear: the two-core low-rank form, the TT-matrix
layout of least FLOPs per parameter; TT conv: out-channel cores, kernel core, in-channel cores,
run as 1x1 -> kxk -> 1x1), and for TT/TR convs with ``TNConfig(kernel_mode="auto")`` also the
two-core layout ``kernel_mode="in"`` (run as kxk -> 1x1) at the same ``P``: one pass less over
the activations, which is what memory-bound layers (large maps, few channels) pay for. The
candidate of least mean time ratio over the planning batches wins; for convs in NCHW format the
winner is timed once more with its 1x1 stages run as batched matrix products
(``pointwise="gemm"``: no layout conversion; on CPU about 2-3x faster than the conv kernel for
maps of 28x28 and more at batch 32, slower for small maps) and that form is taken when faster
(channels-last inputs always take the conv kernel, which handles that format natively). The chosen layout and
pointwise kernel are part of the spec (checkpoints and ADMM's pinned ranks carry both,
``ADMMScheduler.compress_config`` the layout).

Keep dense. A target also stays dense when its best form is not faster: time ratio
>= ``KEEP_BELOW[b]`` at a planning batch b (0.9 at batch 32, 1.0 at batch 1), with one exception
(``_admit``): forms faster at batch 32 but slower at batch 1 are taken, most batch-32 time saved
per batch-1 time lost first, as long as the batch-1 time the other TN layers save pays for it
(seconds), so that the targets together are no slower at batch 1 than dense. The
parameters of layers kept dense leave the budget: the other targets are re-allocated at the ratio that keeps
the targets as a whole at ``compression_ratio`` (while possible), and planned again. Where the layers kept
dense would leave the others less than half their share (one large layer in a small model: the others
would go to over twice the ratio asked for, or the ratio could not be met at all), they instead take,
largest first, the largest form of their share or smaller, down to ``FLOOR_FACTOR`` x smaller than
their share, that is faster than dense (or faster at batch 32 with its batch-1 loss paid for by the
other TN layers, as in ``_admit``), or else the largest there faster at batch 32 (``_shrink_kept``; the
report row notes a batch-1 loss).

``allocation="time"`` (params budget): the budget itself is spread by time
(``_allocate_by_time``). Every target is timed at the param ratios of ``LATENCY_GRID`` up to
``TIME_SPAN`` x R (each ratio's best form as above), and the dense layer is a choice too; the
choices that fill the budget at the least total time are taken. Smaller forms are always faster, so
what this trades is where the parameters sit: layers whose time grows least per parameter (large
weights on small maps, as in the last stages of a CNN) get more of them, layers on large maps less,
and a layer may stay dense when that is the cheapest use of its share.

``budget="latency"``: ``compression_ratio`` R is a time ratio. For each target, over the param
ratios ``LATENCY_GRID`` (ascending, so descending size) the first whose best candidate runs at
<= 1/R of the dense time at batch 32 (and no slower at batch 1) is taken: the largest TN form
that is R times faster. If none reaches 1/R, the fastest candidate that passes the keep-dense
test is taken, else the layer stays dense.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from tqdm.auto import tqdm

from .decompositions import ranks_for_ratio, tn_params
from .decompositions.ranks import FLOOR_FACTOR
from .layers import layer_from_spec, registry
from .layers.base import normalize_ranks
from .report import probe

PLAN_BATCHES = (1, 32)  # the default plan's batch sizes (tune takes its own)
KEEP_BELOW = (1.0, 0.9)  # a TN form must run below this x dense: at the smallest batch, at the others
MIN_FILL = 0.85
ALIGN = (8, 16)
REALLOCATE_PASSES = 3
LATENCY_GRID = (1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
TIME_SPAN = 8    # allocation="time" compares, per target, the param ratios of LATENCY_GRID up to TIME_SPAN x R
MIN_SECONDS = 0.1       # total measured time per entry (repeats grow until reached)
_CACHE_VERSION = 2      # entries: [fastest TN seconds, fastest dense seconds]
MAX_CACHE_BYTES = 64 << 20
log = logging.getLogger("tn_hf.cost")


# ----------------------------------------------------------------------------- measured times (tune)
def cache_dir() -> Path:
    return Path(os.environ.get("TN_HF_CACHE") or Path.home() / ".cache" / "tn_hf")


@functools.lru_cache(maxsize=8)
def device_name(device: torch.device) -> str:
    """'<type>:<device name>' (keys the timing cache; tuned plans and benchmarks record it): the GPU's
    name for CUDA, the CPU model name for the CPU, the type alone for other accelerators."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type != "cpu":
        return device.type
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"cpu:{name}"


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """Hash of the TN layers' source: a measurement is stale once the forward code changes."""
    h = hashlib.sha1()
    for f in sorted((Path(__file__).parent / "layers").glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (accelerators run asynchronously; the CPU does not)."""
    if device.type != "cpu" and device.type != "meta":
        torch.accelerator.synchronize(device)


def _valid_entry(v) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0
                    for t in v))


class CostModel:
    """Measured eval times (TN form, dense layer) in seconds, cached on disk as JSON (``tune`` only).

    The cache is advice, never trusted: an unreadable file, another version or an entry that is not
    two finite positive seconds is ignored with a warning naming the file; a location that cannot be
    written (a file in the way, a read-only folder) keeps the times in memory, with a warning."""

    measured = True

    def __init__(self, path: str | Path | None = None, batches: tuple[int, ...] = PLAN_BATCHES, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.batches = tuple(batches)
        self.device = torch.device(device) if device is not None else None  # None: where each layer is
        self.dtype = dtype
        self.path = Path(path) if path is not None else cache_dir() / "cost.json"
        self.table: dict[str, tuple[float, float]] = {}
        self.dirty = False
        self.table = self._read()

    def _read(self) -> dict[str, tuple[float, float]]:
        try:
            if not self.path.is_file():
                return {}
            if self.path.stat().st_size > MAX_CACHE_BYTES:
                raise ValueError(f"larger than {MAX_CACHE_BYTES} bytes")
            data = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError) as e:
            log.warning("tn_hf: ignoring the timing cache %s (%s)", self.path, e)
            return {}
        if (not isinstance(data, dict) or data.get("version") != _CACHE_VERSION
                or not isinstance(data.get("times"), dict)):
            log.warning("tn_hf: ignoring the timing cache %s (not a version-%d cache)", self.path, _CACHE_VERSION)
            return {}
        good = {k: (float(v[0]), float(v[1])) for k, v in data["times"].items() if _valid_entry(v)}
        if len(good) < len(data["times"]):
            log.warning("tn_hf: ignoring %d bad entries of the timing cache %s", len(data["times"]) - len(good),
                        self.path)
        return good

    @staticmethod
    def key(what: dict, shape, device: torch.device, dtype: torch.dtype) -> str:
        env = {"device": device_name(torch.device(device)), "dtype": str(dtype), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "code": _code_version()}
        return json.dumps({"layer": what, "shape": list(shape), "env": env}, sort_keys=True)

    def pair(self, what: dict, build, dense: nn.Module, shape, device, dtype,
             channels_last: bool = False) -> tuple[float, float]:
        """(eval seconds of ``build()``, of ``dense``) at ``shape``, timed alternately (cached)."""
        key = {"tn": what, "dense": _dense_key(dense), **({"channels_last": True} if channels_last else {})}
        k = self.key(key, shape, device, dtype)
        if k not in self.table:
            p = next(dense.parameters(), None)
            if p is not None and (p.device != torch.device(device) or p.dtype != dtype):  # timed elsewhere
                dense = copy.deepcopy(dense).to(device=device, dtype=dtype)
            tn, dn = measure_pair([build(), dense], shape, device, dtype, channels_last=channels_last)
            self.table[k] = (tn, dn)
            self.dirty = True
        return self.table[k]

    def save(self) -> None:
        """Write the table, merged with what other processes wrote meanwhile (atomic replace); where
        the location can't be written, warn and keep working in memory."""
        if not self.dirty:
            return
        self.table = {**self._read(), **self.table}
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": _CACHE_VERSION,
                                       "times": {k: list(v) for k, v in self.table.items()}}))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("tn_hf: cannot write the timing cache %s (%s); the times stay in memory", self.path, e)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        self.dirty = False


def measure_pair(modules, shape, device, dtype, min_reps: int = 7, max_reps: int = 400, *,
                 channels_last: bool = False) -> list[float]:
    """Fastest seconds of ``m(x)`` for each module (eval, no_grad, x ~ N(0, 1) of ``shape`` drawn
    from a generator of its own (the caller's random streams are untouched), in channels-last
    memory format if asked), the modules timed in turn within each repeat so that machine load
    affects them alike; the minimum over repeats is the estimate least disturbed by other processes."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    if channels_last and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    was = [m.training for m in modules]
    times: list[list[float]] = [[] for _ in modules]
    try:
        with torch.no_grad():
            for m in modules:
                m.eval()
                for _ in range(2):
                    m(x)
            _sync(device)
            while len(times[0]) < min_reps or (sum(map(sum, times)) < MIN_SECONDS and len(times[0]) < max_reps):
                for m, ts in zip(modules, times):
                    t0 = time.perf_counter()
                    m(x)
                    _sync(device)
                    ts.append(time.perf_counter() - t0)
    finally:
        for m, w in zip(modules, was):
            m.train(w)
    return [min(ts) for ts in times]


# ----------------------------------------------------------------------------- estimated times (plan)
class Op(NamedTuple):
    """One kernel of a traced forward: its kind ("gemm", "conv" or "other"), FLOPs, bytes read and
    written, and its smallest GEMM dimension other than the batch/positions one (0 for "other")."""
    kind: str
    flops: float
    bytes: float
    inner: int


_GEMMS = {"mm", "addmm", "bmm", "baddbmm"}
_CONVS_OPS = {"convolution", "_convolution", "conv2d", "conv1d", "conv3d"}
_FREE = {"empty", "empty_like", "zeros", "zeros_like", "detach", "_to_copy", "lift_fresh"}


class _Trace(TorchDispatchMode):
    """Records the kernels a forward runs (on the meta device: shapes only, nothing computed)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if func.is_view or name in _FREE:
            return out
        tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in tensors + outs)
        if name in _GEMMS or name in _CONVS_OPS:
            flop = float(flop_registry[func._overloadpacket](*args, **kwargs, out_val=out))
            if name in _GEMMS:
                a, b = (args[1], args[2]) if name.startswith("add") or name == "baddbmm" else (args[0], args[1])
                inner = min(a.shape[-1], b.shape[-1], a.shape[-2])  # K, N, M: the small dims cost
                kind = "gemm"
            else:
                w = args[1]
                inner = min(w.shape[0], w.shape[1] * math.prod(w.shape[2:]))
                kind = "conv_cl" if _is_cl(args[0]) else "conv"
            self.ops.append(Op(kind, flop, moved, int(inner)))
        else:
            self.ops.append(Op("other", 0.0, moved, 0))
        return out


def _is_cl(x: torch.Tensor) -> bool:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def trace(module: nn.Module, shape, dtype=torch.float32, channels_last: bool = False) -> tuple[Op, ...]:
    """The kernels of one eval forward of ``module`` (a TN layer built on the meta device, or any
    module: its parameters are swapped for meta tensors) at input ``shape``, merged-core caches warm."""
    x = torch.empty(*shape, device="meta", dtype=dtype)
    if channels_last and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    meta = {k: torch.empty_like(v, device="meta") for k, v in
            [*module.named_parameters(), *module.named_buffers()] if v.device.type != "meta"}
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            run = (lambda: torch.func.functional_call(module, meta, (x,))) if meta else (lambda: module(x))
            run()  # fills the eval caches (merged cores): paid once, not per call
            with _Trace() as t:
                run()
    finally:
        module.train(was)
    return tuple(t.ops)


# The reference cost model: seconds of one kernel = overhead + FLOPs x per_flop x (1 + small_dim / inner)
# (slower per FLOP when a GEMM dimension is small) + bytes x per_byte, with the constants of its kind.
# Fitted once (non-negative least squares on relative error) to 510 pairs of eval forwards, dense and TN,
# of the planner's candidate forms for the targets of resnet18, vit_small, convnext_tiny and the demo
# CNN at batch 1 and 32 (fp32, one CPU thread, CPU time); on those pairs it orders TN against dense as
# measured in 95 % of cases, median error of the time ratio 15 %. "other" (copies, elementwise) is not
# separable in that data: nominal values. Fixed in the code so that a plan is the same everywhere;
# ``tune`` measures instead, on the device the model will run on.
COST_CONSTANTS: dict[str, dict[str, float]] = {
    "gemm": {"overhead": 3.45e-5, "per_flop": 1.28e-11, "small_dim": 16.1, "per_byte": 0.0},
    "conv": {"overhead": 3.2e-5, "per_flop": 1.32e-11, "small_dim": 14.6, "per_byte": 1.40e-10},
    "conv_cl": {"overhead": 0.0, "per_flop": 1.66e-11, "small_dim": 0.0, "per_byte": 1.47e-10},
    "other": {"overhead": 2e-6, "per_flop": 0.0, "small_dim": 0.0, "per_byte": 1e-10},
}

def estimate_seconds(ops) -> float:
    """The reference cost model's seconds for these kernels (``trace``)."""
    total = 0.0
    for op in ops:
        c = COST_CONSTANTS[op.kind]
        total += (c["overhead"] + op.flops * c["per_flop"] * (1 + c["small_dim"] / max(op.inner, 1))
                  + op.bytes * c["per_byte"])
    return total


class Timer(Protocol):
    """Where the planner's times come from: ``Estimator`` (the default plan) or ``CostModel`` (``tune``)."""
    measured: bool
    batches: tuple[int, ...]

    def pair(self, what: dict, build, dense: nn.Module, shape, device, dtype,
             channels_last: bool = False) -> tuple[float, float]: ...

    def save(self) -> None: ...


class Estimator:
    """Estimated eval times from the layers' shapes: deterministic (the default plan). The same
    interface as ``CostModel``; each form is traced on the meta device once per process."""
    measured = False

    def __init__(self, batches: tuple[int, ...] = PLAN_BATCHES) -> None:
        self.batches = tuple(batches)
        self._memo: dict[str, float] = {}

    def seconds(self, key: str, module_fn, shape, dtype, channels_last: bool) -> float:
        if key not in self._memo:
            self._memo[key] = estimate_seconds(trace(module_fn(), shape, dtype, channels_last))
        return self._memo[key]

    def pair(self, what: dict, build, dense: nn.Module, shape, device, dtype,
             channels_last: bool = False) -> tuple[float, float]:
        base = json.dumps({"shape": list(shape), "dtype": str(dtype), "cl": channels_last}, sort_keys=True)

        def meta_build():
            with torch.device("meta"):
                return layer_from_spec(what).to(dtype=dtype)
        tn = self.seconds(json.dumps(what, sort_keys=True) + base, meta_build, shape, dtype, channels_last)
        dn = self.seconds(json.dumps(_dense_key(dense), sort_keys=True) + base, lambda: dense, shape, dtype,
                          channels_last)
        return tn, dn

    def save(self) -> None:
        pass


# ----------------------------------------------------------------------------- candidates
def _leaf_specs(spec: dict) -> list[dict]:
    return list(spec["weights"].values()) if isinstance(spec.get("weights"), dict) else [spec]


def _with_ranks(cls, spec: dict, ranks) -> dict | None:
    """A copy of a leaf spec with these ranks, or None when they don't fit the modes."""
    try:
        r = normalize_ranks(list(ranks), cls._modes(spec), cls.format, cls.__name__)
    except ValueError:
        return None
    return dict(spec, ranks=r) if r == list(ranks) else None


def _params(spec: dict) -> int:
    return sum(tn_params(registry[s["class"]]._modes(s), s["ranks"]) for s in _leaf_specs(spec))


def aligned_variants(cls, spec: dict) -> list[dict]:
    """``spec`` and copies whose internal ranks above a (a in ALIGN) are multiples of a: all rounded
    down, or one rounded up and the others down; kept when their params are within
    [MIN_FILL, 1] x the original's."""
    out, seen = [spec], {tuple(spec["ranks"])}
    p0 = _params(spec)
    r = spec["ranks"]
    for a in ALIGN:
        idx = [k for k in range(1, len(r) - 1) if r[k] > a]
        for up in [None] + idx:
            new = list(r)
            for k in idx:
                new[k] = -(-r[k] // a) * a if k == up else r[k] - r[k] % a
            if cls.format == "tr" and r[0] > a:  # the ring rank, rounded down
                new[0] = new[-1] = r[0] - r[0] % a
            s = _with_ranks(cls, spec, new)
            if s is not None and tuple(s["ranks"]) not in seen and MIN_FILL * p0 <= _params(s) <= p0:
                out.append(s)
                seen.add(tuple(s["ranks"]))
    return out


def spec_at_ratio(cls, spec: dict, q: float) -> dict:
    """The spec with every TN matrix at parameter ratio q (decompositions.ranks_for_ratio)."""
    spec = copy.deepcopy(spec)
    for leaf in _leaf_specs(spec):
        lcls = registry[leaf["class"]]
        leaf["ranks"] = ranks_for_ratio(lcls._modes(leaf), q, lcls.format)
    if getattr(cls, "composite", False):
        spec["compression_ratio"] = float(q)
    return spec


# ----------------------------------------------------------------------------- shapes
def _batch_dim(module: nn.Module) -> int:
    if isinstance(module, (nn.LSTM, nn.GRU)) and not module.batch_first:
        return 1
    return 0


def plan_shapes(module: nn.Module, probed_shape, batches=PLAN_BATCHES) -> dict[int, tuple] | None:
    """{batch: input shape} for the planning ``batches``, from the probed (batch-1) input shape."""
    if probed_shape is None:
        return None
    bd = _batch_dim(module)
    shape = list(probed_shape)
    if len(shape) <= bd:
        return None
    return {b: tuple(shape[:bd] + [b] + shape[bd + 1:]) for b in batches}


def _dense_key(module: nn.Module) -> dict:
    return {"dense": type(module).__name__, "repr": repr(module)}


# ----------------------------------------------------------------------------- planner
class _Eval:
    """Measured times (and ratios TN / dense) of candidates, for one target at its planning shapes."""

    def __init__(self, cm: Timer, target, shapes, channels_last: bool = False):
        self.cm, self.t, self.shapes, self.channels_last = cm, target, shapes, channels_last
        p = next(target.module.parameters())
        self.device = getattr(cm, "device", None) or p.device
        self.dtype = getattr(cm, "dtype", None) or p.dtype

    def ratios(self, spec: dict) -> dict[int, float]:
        return {b: t / d for b, (t, d) in self.times(spec).items()}

    def times(self, spec: dict) -> dict[int, tuple[float, float]]:
        """{batch: (TN seconds, dense seconds)}."""

        def build():
            with torch.device(self.device):
                return layer_from_spec(spec).to(dtype=self.dtype)
        return {b: self.cm.pair(spec, build, self.t.module, s, self.device, self.dtype, self.channels_last)
                for b, s in self.shapes.items()}


def _flops(spec, shape) -> tuple[int, int] | None:
    """(dense, TN) FLOPs of one forward at ``shape`` (layer built on the meta device)."""
    try:
        with torch.device("meta"):
            layer = layer_from_spec(spec)
        return int(layer.dense_flops(shape)), int(layer.flops(shape))
    except (AttributeError, TypeError, ValueError, NotImplementedError, RuntimeError):
        return None


def _keep_below(batch: int, batches) -> float:
    return KEEP_BELOW[0] if batch == min(batches) else KEEP_BELOW[1]


def _score(r: dict[int, float]) -> float:
    return sum(r.values()) / len(r)


def _passes(r: dict[int, float]) -> bool:
    return all(v < _keep_below(b, r) for b, v in r.items())


def _fmt_ratios(r: dict[int, float]) -> str:
    return ", ".join(f"{v:.2f}x dense time at batch {b}" for b, v in sorted(r.items(), reverse=True))


def _dense_params(cls, module, spec: dict | None = None) -> int:
    """Weight parameters of the dense module a target replaces: for a recurrent layer, of the matrices
    its ``spec`` puts in TN form (hidden-to-hidden too with ``compress_hidden``)."""
    return sum(w.numel() for w in cls.dense_weights(module, spec).values())


def _may_switch_layout(t, config) -> bool:
    """Measured planning compares both conv layouts (``TNConfig.kernel_mode``) for "auto" targets."""
    return (config.kernel_mode == "auto" and "in" in getattr(t.cls, "kernel_modes", ())
            and t.spec.get("kernel_mode", "own") == "own")


def _check_size(cls, spec, module, shape) -> str | None:
    """Why this TN form is not smaller than dense (params or FLOPs), or None."""
    dense_params = _dense_params(cls, module, spec)
    tn = _params(spec)
    if tn >= dense_params:
        return f"TN form not smaller ({tn} >= {dense_params} weight params)"
    if shape is not None:
        f = _flops(spec, shape)
        if f is not None and f[1] >= f[0]:
            return f"TN form needs more FLOPs ({f[1]} >= {f[0]} per sample)"
    return None


def _choose(ev: _Eval | None, cls, candidates: list[dict], module, shape1):
    """(best spec, its ratios or None, reason it is rejected or None)."""
    ok = [(s, _check_size(cls, s, module, shape1)) for s in candidates]
    fine = [s for s, why in ok if why is None]
    if not fine:
        return None, None, ok[0][1]
    if ev is None:  # shapes unknown: FLOPs/params decide, the first (largest) candidate wins
        return fine[0], None, None
    scored = sorted(((_score(r), i, s, r) for i, s in enumerate(fine) for r in [ev.ratios(s)]),
                    key=lambda z: (z[0], z[1]))
    _, _, best, r = scored[0]
    if ev.channels_last and best.get("pointwise") == "gemm":  # channels-last inputs take the conv kernel
        best = {k: v for k, v in best.items() if k != "pointwise"}   # anyway: the spec says so
    elif "gemm" in getattr(cls, "pointwise_modes", ()) and not ev.channels_last:  # the other 1x1 kernel
        alt = {k: v for k, v in best.items() if k != "pointwise"} if best.get("pointwise") == "gemm" \
            else dict(best, pointwise="gemm")
        r_alt = ev.ratios(alt)
        if _score(r_alt) < _score(r):
            best, r = alt, r_alt
    return best, r, (None if _passes(r) else f"TN not faster ({_fmt_ratios(r)}; best TN form: "
                                             f"{_params(best)} params, ranks {_ranks_str(best)})")


def _ranks_str(spec: dict) -> str:
    return "; ".join("-".join(str(v) for v in s["ranks"]) for s in _leaf_specs(spec))


def plan_for_speed(model: nn.Module, targets: list, config, *, allocate, probed=None,
                   progress: bool = False, timer: Timer | None = None) -> tuple[list, dict[str, str]]:
    """Refine ``targets`` (from ``targeting.plan``, whose rank allocation is ``allocate``) for speed;
    ``probed``: the targets' ``report.probe`` (probed here when not given).

    Returns (the targets that get a TN form, {name: reason} for the others, which stay dense and
    are listed in compress's report). With a params/flops budget, the parameters of layers kept dense are taken out of
    the budget: the remaining targets are re-allocated at the ratio that keeps the total over
    all targets at ``compression_ratio`` (when that is still possible), then planned again.
    See the module docstring for the cost model and the rules."""
    want = config.plan_for_speed or config.budget == "latency"
    timer = timer if timer is not None else Estimator()
    measured = want and (not timer.measured or _rank() == 0)  # tune: process 0 times, the others adopt its plan
    if probed is None:
        probed = probe(model, [t.name for t in targets], config.input_size)
    cm = timer
    kept: dict[str, str] = {}
    try:
        if config.allocation == "time" and measured:
            out = _allocate_by_time(cm, targets, config, probed, kept, progress)
        else:
            out = _plan_targets(cm, targets, config, config.compression_ratio, probed, kept, progress, measured)
        size = {t.name: _dense_params(t.cls, t.module, t.spec) for t in targets}
        total, goal = sum(size.values()), config.compression_ratio
        shrunk: list = []  # layers not faster at their allocated size, given a smaller form that is

        def left(extra=()):  # the budget the layers in `out` share
            return total / goal - sum(size[n] for n in kept) - sum(_params(t.spec) for t in [*shrunk, *extra])
        for _ in range(REALLOCATE_PASSES if config.budget != "latency" and config.allocation != "time" else 0):
            rest = sum(size[t.name] for t in out)
            taken = _shrink_kept(cm, targets, kept, config, probed,
                                 lambda new, rest=rest: left(new) < rest / (2 * goal), out + shrunk) if measured else []
            shrunk += taken  # (when the layers kept dense crowd the others out)
            budget = left()
            if not out or budget <= 0 or (rest / budget <= goal * 1.01 and not taken):
                break
            ratio, n_kept = rest / budget, len(kept)
            allocate(model, out, dataclasses.replace(config, compression_ratio=ratio), probed)
            out = _plan_targets(cm, out, config, ratio, probed, kept, progress, measured)
            if len(kept) == n_kept:
                break
        out = _in_order(targets, out + shrunk)
    finally:
        cm.save()
    if want and timer.measured:  # measured times differ between processes; estimates don't
        out, kept = _agree(targets, out, kept)
    return out, kept


def _in_order(targets, chosen) -> list:
    """``chosen`` (a subset of ``targets``) in the targets' order."""
    order = {t.name: i for i, t in enumerate(targets)}
    return sorted(chosen, key=lambda t: order[t.name])


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _agree(targets, out, kept):
    """Under torch.distributed every process takes process 0's plan (timings differ between
    processes; the model structure must not)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return out, kept
    box = [({t.name: t.spec for t in out}, kept)]
    dist.broadcast_object_list(box, src=0)
    specs, kept = box[0]
    chosen = []
    for t in targets:
        if t.name in specs:
            t.spec = specs[t.name]
            chosen.append(t)
    return chosen, kept


def _evaluator(cm, t, probed, measured: bool):
    """(the target's _Eval, or None where its input shape is unknown or nothing is timed; its batch-1 shape)."""
    seen = probed.get(t.name)
    shapes = plan_shapes(t.module, seen.shape if seen else None, cm.batches)
    ev = _Eval(cm, t, shapes, bool(seen and seen.channels_last)) if (shapes and measured) else None
    return ev, (shapes[1] if shapes else None)


def _candidates(t, config, ev: _Eval | None, ratio: float, q: float | None = None) -> list[dict]:
    """The forms compared for one target: its allocated spec (or every matrix at param ratio ``q``),
    its aligned-rank variants and, when timed and allowed, the other conv layout at the same size."""
    composite = getattr(t.cls, "composite", False)
    base = spec_at_ratio(t.cls, t.spec, q if q is not None else ratio) if (composite or q is not None) else t.spec
    if composite:
        return [base]
    out = aligned_variants(t.cls, base)
    if ev is not None and _may_switch_layout(t, config):  # the other conv layout, same size
        alt = t.cls.dense_spec(t.module, kernel_mode="in", n_modes=config.n_modes)
        q = _dense_params(t.cls, t.module, t.spec) / _params(base)
        out += aligned_variants(t.cls, spec_at_ratio(t.cls, alt, q))
    return out


def _plan_targets(cm, targets, config, ratio, probed, kept, progress, measured) -> list:
    latency = config.budget == "latency"
    out = []
    saved: dict[str, dict] = {}  # name -> {batch: (TN, dense seconds)} of the TN forms taken
    slower_at_1: list = []  # (target, spec, TN/dense seconds per batch): faster at batch 32 only
    for t in tqdm(targets, desc="tn_hf plan", disable=not progress):
        t.note = None
        composite = getattr(t.cls, "composite", False)
        ev, shape1 = _evaluator(cm, t, probed, measured)

        def cands(q=None, t=t, ev=ev):
            return _candidates(t, config, ev, ratio, q)

        if not latency:
            spec, r, why = _choose(ev, t.cls, cands(), t.module, shape1)
        elif ev is None:  # no shapes to time: FLOPs stand in for time
            spec, r, why = _choose(None, t.cls, cands(ratio), t.module, shape1)
        else:
            spec, r, why = _latency(ev, t, cands, ratio, shape1)
        if why is not None and ev is None:  # size rule only: smaller ranks until the TN form is smaller
            dense = _dense_params(t.cls, t.module, t.spec)
            now = ratio if composite else dense / max(1, _params(cands()[0]))
            for q in (q for q in LATENCY_GRID if q > now):
                s2 = cands(q)[0]
                if _check_size(t.cls, s2, t.module, shape1) is None:
                    spec, why = s2, None
                    break
        log.info("%s: %s", t.name, why or f"TN {_ranks_str(spec)}, {_params(spec)} params"
                 + (f", {_fmt_ratios(r)}" if r else ""))
        if why is not None:
            kept[t.name] = why
            if ev is not None and r is not None and r[max(r)] < _keep_below(max(r), r):
                slower_at_1.append((t, spec, ev.times(spec)))
            continue
        t.spec = spec
        out.append(t)
        if ev is not None and r is not None:
            saved[t.name] = ev.times(spec)
    return _admit(targets, out, saved, slower_at_1, kept)


def _shrink_kept(cm, targets, kept, config, probed, short, chosen) -> list:
    """Layers kept dense because their allocated form is not faster, largest first, while ``short(taken)``
    (their dense size leaves the other targets too small a budget): each takes the largest form of at
    most 1/``compression_ratio`` of its size, and at least 1/(``FLOOR_FACTOR`` x that) (no rank-1
    wrecks), that is faster than dense, or faster at the largest planning batch with its loss at the
    smallest paid for by what the TN layers ``chosen`` (and those taken before it) save there, as
    ``_admit`` does; where none is, the largest there faster at the largest batch (the ratio asked
    for outweighs a small-batch loss; the report says so). Returns the layers taken."""
    small, large = min(cm.batches), max(cm.batches)
    evs = [(t, _evaluator(cm, t, probed, True)[0]) for t in chosen]
    credit = _saved_at(small, [ev.times(t.spec) for t, ev in evs if ev is not None])  # (cached times)
    taken: list = []
    goal = config.compression_ratio
    for t in sorted((t for t in targets if t.name in kept), key=lambda t: -_dense_params(t.cls, t.module, t.spec)):
        if not short(taken):
            break
        ev, shape1 = _evaluator(cm, t, probed, True)
        found = fallback = None  # (spec, note, seconds saved at the smallest batch)
        for q in ([goal] + [q for q in LATENCY_GRID if goal < q <= FLOOR_FACTOR * goal]) if ev is not None else []:
            spec, r, why = _choose(ev, t.cls, _candidates(t, config, ev, q, q), t.module, shape1)
            if r is None or r.get(large, 1.0) >= _keep_below(large, r):
                continue
            tn, dense = ev.times(spec)[small]
            if why is None or dense - tn + credit >= 0:
                found = (spec, None if why is None else _paid_note(small, tn / dense), dense - tn)
                break
            fallback = fallback or (spec, f"slower than dense at batch {small} ({_fmt_ratios(r)}), taken "
                                          "because kept dense it would leave the other targets too small a "
                                          "budget", dense - tn)
        found = found or fallback
        if found is not None:
            t.spec, t.note, saved = found
            credit += saved
            log.info("%s: TN %s, %d params (kept dense, it left the other targets too small a budget%s)",
                     t.name, _ranks_str(t.spec), _params(t.spec), f"; {t.note}" if t.note else "")
            kept.pop(t.name)
            taken.append(t)
    return taken


def _allocate_by_time(cm, targets, config, probed, kept, progress) -> list:
    """``allocation="time"``: the params budget (the targets as a whole at ``compression_ratio``) goes
    where it saves the most time. Each timed target's choices: the best form (``_choose``)
    at every param ratio of ``LATENCY_GRID`` up to ``TIME_SPAN`` x the ratio asked for, where that
    form passes the keep-dense test, and the dense layer. A choice costs its seconds at each planning
    batch over the dense targets' total at that batch, summed over the batches. Smaller forms are
    faster, so the budget is spent, not saved: one multiplier ``lam`` values parameters, every
    target takes the choice of least ``cost - lam * params / budget``, ``lam`` the largest
    (bisection) whose choices fit the budget; what is left under it goes to the upgrades of least
    time per parameter. Targets whose input shape is unknown keep the uniform ratio, and their size
    counts."""
    budget = sum(_dense_params(t.cls, t.module, t.spec) for t in targets) / config.compression_ratio
    untimed = [t for t in targets if _evaluator(cm, t, probed, True)[0] is None]
    fixed = _plan_targets(cm, untimed, config, config.compression_ratio, probed, kept, False, False)
    budget -= sum(_params(t.spec) for t in fixed) + sum(_dense_params(t.cls, t.module, t.spec) for t in untimed
                                                       if t.name in kept)
    options: dict[str, list] = {}  # name -> [(params, {batch: seconds}, spec or None for dense)]
    skip = {t.name for t in untimed}
    for t in tqdm([t for t in targets if t.name not in skip], desc="tn_hf plan (timing sizes)", disable=not progress):
        ev, shape1 = _evaluator(cm, t, probed, True)
        found, first_why = [], None
        for q in (q for q in LATENCY_GRID if q <= TIME_SPAN * config.compression_ratio):
            spec, r, why = _choose(ev, t.cls, _candidates(t, config, ev, q, q), t.module, shape1)
            if why is None:
                found.append((spec, r))
            first_why = first_why or why
        if not found:
            kept[t.name] = first_why or "TN not faster at any size"
            budget -= _dense_params(t.cls, t.module, t.spec)
            continue
        dense_s = {b: d for b, (_, d) in ev.times(found[0][0]).items()}
        options[t.name] = [(_params(spec), {b: r[b] * dense_s[b] for b in r}, spec) for spec, r in found] \
            + [(_dense_params(t.cls, t.module, t.spec), dense_s, None)]
    if not options:
        return fixed
    total = {b: sum(o[-1][1][b] for o in options.values()) for b in cm.batches}
    scale = max(budget, 1.0)

    def cost(c):
        return sum(c[1][b] / total[b] for b in total)

    def pick(lam):  # parameters are capacity the budget allows: worth lam each
        return {n: min(o, key=lambda c: cost(c) - lam * c[0] / scale) for n, o in options.items()}

    def size(choice):
        return sum(c[0] for c in choice.values())
    lo, hi = 0.0, 1.0
    while size(pick(hi)) <= budget and hi < 1e6:
        lo, hi = hi, hi * 4
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if size(pick(mid)) <= budget else (lo, mid)
    choice = pick(lo)
    while True:  # the discrete gap left under the budget: the upgrade that costs least time per param
        room = budget - size(choice)
        ups = [((cost(c) - cost(choice[n])) / (c[0] - choice[n][0]), n, c) for n, o in options.items()
               for c in o if 0 < c[0] - choice[n][0] <= room]
        if not ups:
            break
        _, n, c = min(ups, key=lambda u: u[0])
        choice[n] = c
    out = list(fixed)
    for t in targets:
        if t.name not in choice:
            continue
        spec = choice[t.name][2]
        if spec is None:
            kept[t.name] = "the time allocation spends the params budget where it saves more time"
            continue
        log.info("%s: TN %s, %d params (time allocation)", t.name, _ranks_str(spec), _params(spec))
        t.spec = spec
        out.append(t)
    return _in_order(targets, out)


def _admit(targets, out, saved, slower_at_1, kept) -> list:
    """Also take the TN forms faster at batch 32 but slower at batch 1, most batch-32 time saved per
    batch-1 time lost first, while the batch-1 time the chosen TN layers save in all covers what
    these lose: the targets as a whole stay no slower than dense at batch 1."""
    if not slower_at_1:
        return _in_order(targets, out)
    batches = slower_at_1[0][2]
    small, large = min(batches), max(batches)
    credit = _saved_at(small, saved.values())

    def gain(z):  # batch-32 seconds saved per batch-1 second lost
        times = z[2]
        return (times[large][1] - times[large][0]) / max(times[small][0] - times[small][1], 1e-12)
    for t, spec, times in sorted(slower_at_1, key=gain, reverse=True):
        loss = times[small][0] - times[small][1]
        if loss > credit:
            continue
        credit -= loss
        t.spec = spec
        t.note = _paid_note(small, times[small][0] / times[small][1])
        kept.pop(t.name, None)
        out.append(t)
        log.info("%s: TN %s (slower at batch %d, paid for by the other layers)", t.name, _ranks_str(spec), small)
    return _in_order(targets, out)


def _saved_at(batch: int, times) -> float:
    """Seconds saved at ``batch`` by TN forms with these {batch: (TN, dense seconds)} times."""
    return sum(t[batch][1] - t[batch][0] for t in times)


def _paid_note(batch: int, ratio: float) -> str:
    """The report's note on a form taken though slower than dense at ``batch`` (time ratio ``ratio``)."""
    return f"slower than dense at batch {batch} ({ratio:.2f}x), paid for by the other TN layers' batch-{batch} savings"


def _latency(ev: _Eval, t, cands, ratio: float, shape1):
    """Largest TN form (ascending param ratio) whose batch-32 time is <= dense / ratio."""
    batches = tuple(ev.shapes)
    goal = {b: (1.0 / ratio if b == max(batches) else _keep_below(b, batches)) for b in batches}
    best = None  # fastest passing candidate seen, the fallback
    first_why = None
    for q in LATENCY_GRID:
        spec, r, why = _choose(ev, t.cls, cands(q), t.module, shape1)
        if spec is None:
            first_why = first_why or why
            continue
        if why is None and (best is None or _score(r) < _score(best[1])):
            best = (spec, r)
        if all(r[b] <= g for b, g in goal.items()):
            return spec, r, None
    if best is not None:
        return best[0], best[1], None
    return None, None, first_why or "TN not faster at any size in the latency grid"


def kept_dense_row(model: nn.Module, name: str, reason: str, probed=None) -> dict:
    """compress report row of a target kept dense: ratio 1, tn_type "kept dense: <reason>".

    FLOPs as elsewhere in the report: per sample when probed (2 x output positions x weight
    entries), per position for Linear/recurrent layers otherwise, unknown for convs."""
    module = model.get_submodule(name)
    n = sum(p.numel() for p in module.parameters())
    w = sum(p.numel() for k, p in module.named_parameters() if k.startswith("weight"))
    pos = probed[1] if probed is not None else (None if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
                                                else 1)
    flops = None if pos is None else 2 * pos * w
    return {"name": name, "type": type(module).__name__, "tn_type": f"kept dense: {reason}", "dense_params": n,
            "tn_params": n, "ratio": 1.0, "ranks": None, "rel_error": 0.0, "flops_dense": flops,
            "flops_tn": flops, "kept_dense": reason}
