"""TNConfig: one JSON-serialisable description of what to compress and how."""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

FORMATS = ("tt", "tr", "tucker", "bt")
LAYER_TYPES = ("linear", "conv", "lstm", "gru")
BUDGETS = ("auto", "params", "params+flops", "flops", "latency")
ALLOCATIONS = ("global", "uniform", "time")
CONV_LAYOUTS = ("own", "in")  # where a TT/TR conv's kernel mode sits (the layers' kernel_mode)
KERNEL_MODES = CONV_LAYOUTS + ("auto",)  # TNConfig.kernel_mode: a layout, or chosen by the planner


@dataclass
class TNConfig:
    """What to compress and how.

    Exactly one of ``ranks``, ``compression_ratio`` or ``rel_error`` chooses the ranks:

    * ``ranks``: an int (every internal rank), a list (the full rank list, incl. boundary
      ranks) or ``{module_name: int | list}``.
    * ``compression_ratio``: dense params / TN params over the targeted layers as a whole;
      ranks are allocated per layer (``allocation="global"``: layers whose singular spectra
      decay fast give more, within the ``budget``; ``"uniform"``: every layer at this ratio in
      params; ``"time"``: the parameter budget spread where it costs the least time by the cost
      model (``tn_hf.plan``; measured with ``tn_hf.tune``), each layer priced at several sizes -
      the fastest model of that size, blind to the weights; it needs the input size, see below).
    * ``rel_error``: per-layer relative Frobenius error bound of the decomposition
      (``max_rank`` caps the ranks; it applies to ``rel_error`` only).

    ``budget`` (with ``compression_ratio``; what the ratio divides): "auto" (default): with the
    global allocation and ``plan_for_speed``, "params+flops" where the input size is known and
    "params" where it is not (and for the other allocations); "params": dense / TN parameters
    only; "params+flops": parameters and FLOPs (params x output positions) both cut by the ratio
    at least (a parameter costs its share of both, so layers on large maps give more); "flops":
    parameters weighted by each layer's output positions; "latency": dense / TN eval time per layer
    (the ranks are chosen per layer by the cost model; see ``tn_hf.cost``). The FLOPs budgets and
    ``allocation="time"`` need the input size: timm models declare it; for others give
    ``TNConfig(input_size=...)`` or ``tn_hf.plan(model, config, input_size=...)``, else planning
    raises. With ``ranks`` or ``rel_error`` leave ``budget`` and ``allocation`` at their defaults.

    ``format="tucker"`` options: ``adaptive_reshape=True`` (with ``compression_ratio``) picks per
    layer the orders and balanced dimensions of the reshaped weight with the lowest Tucker error at
    that ratio (ADA-Tucker); ``shared_core=True`` (with ``ranks=int``) gives every Tucker layer the
    same order and core shape and ties one core across them (SCADA-Tucker). Tucker ranks at a
    ``compression_ratio`` come from the weights' mode spectra (``allocation="global"``: one budget
    over the Linear/Conv targets, ``"uniform"``: every layer at the ratio): ``budget`` "auto" or
    "params" and ``allocation`` "global" or "uniform" only, ``kernel_mode`` at its default.

    ``format="bt"`` (block-term: a sum of Tucker blocks) is planned like Tucker: ``ranks`` an int
    (2 blocks of that rank per mode) or ``[N, r_1..r_d]`` lists per module (N blocks), or a
    ``compression_ratio`` (2 blocks, ranks from the mode spectra). It is fitted at fixed ranks:
    ``rel_error`` is not available for it.

    With a ratio, a layer whose TN form would have more parameters or FLOPs than the dense
    layer stays dense (reported as "kept dense: <reason>"). ``plan_for_speed=True`` (default):
    where the input size is known, the ranks and conv layout are chosen by time (the reference
    cost model from the shapes; measured with ``tn_hf.tune``) among forms of the layer's size, and
    a layer whose TN form is not faster than dense stays dense too. ``plan_for_speed=False``: size
    alone decides (not with ``budget="latency"`` or ``allocation="time"``, which plan by time).

    ``kernel_mode`` (TT/TR convolutions with a kernel larger than 1): where the kernel mode sits.
    "own": a core of its own between the output- and input-channel cores (the ADMM-TT paper's
    layout; run as 1x1 -> kxk -> 1x1); "in": one mode with the input channels (two cores, run as
    kxk -> 1x1: fewer passes over the activations); "auto" (default): "own", and with measured
    planning the faster of the two at the layer's size; or ``{module name: "own" | "in"}``.
    Tucker and BT convs have one layout: leave it at "auto" for them.

    ``target_modules`` / ``exclude_modules`` take exact module names or regexes (a pattern
    matches when ``re.fullmatch`` does, or when the name equals it or ends with ``.pattern``).
    """

    quant_method = "tn_hf"  # not a field: lets transformers take a TNConfig as quantization_config

    format: str = "tt"
    ranks: int | list[int] | dict[str, Any] | None = None
    compression_ratio: float | None = None
    rel_error: float | None = None
    max_rank: int | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layer_types: list[str] = field(default_factory=lambda: ["linear", "conv", "lstm", "gru"])
    min_params: int = 4096
    skip_stem: bool = True
    skip_head: bool = True
    budget: str = "auto"
    allocation: str = "global"
    n_modes: int | None = None          # modes per channel side (None: chosen from the size)
    compress_hidden: bool = False      # recurrent layers: hidden-to-hidden in TN form too
    adaptive_reshape: bool = False     # tucker: ADA-Tucker's per-layer choice of order and dimensions
    shared_core: bool = False          # tucker: SCADA-Tucker's one core for all layers
    plan_for_speed: bool = True        # measured rank and layout choice; layers not faster as TN stay dense
    kernel_mode: str | dict[str, str] = "auto"  # TT/TR convs: "own", "in", "auto" or {module name: mode}
    input_size: list[int] | None = None  # one sample's input shape, for models that declare none (planning)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"TNConfig.format={self.format!r}: valid choices are {FORMATS}")
        chosen = [k for k in ("ranks", "compression_ratio", "rel_error") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(
                "TNConfig needs exactly one of ranks=, compression_ratio=, rel_error= "
                f"(got {chosen or 'none'})")
        if self.compression_ratio is not None and not self.compression_ratio > 1:
            raise ValueError(f"TNConfig.compression_ratio={self.compression_ratio}: must be > 1 "
                             "(dense params / compressed params)")
        if self.rel_error is not None and not 0 < self.rel_error < 1:
            raise ValueError(f"TNConfig.rel_error={self.rel_error}: must be in (0, 1)")
        if self.max_rank is not None and self.max_rank < 1:
            raise ValueError(f"TNConfig.max_rank={self.max_rank}: must be >= 1")
        if isinstance(self.ranks, int) and self.ranks < 1:
            raise ValueError(f"TNConfig.ranks={self.ranks}: ranks must be >= 1")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.exclude_modules, str):
            self.exclude_modules = [self.exclude_modules]
        if isinstance(self.layer_types, str):
            self.layer_types = [self.layer_types]
        self.layer_types = list(self.layer_types)
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise ValueError(f"TNConfig.layer_types has {bad}: valid choices are {LAYER_TYPES}")
        if self.budget not in BUDGETS:
            raise ValueError(f"TNConfig.budget={self.budget!r}: valid choices are {BUDGETS}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"TNConfig.allocation={self.allocation!r}: valid choices are {ALLOCATIONS}")
        for opt in ("adaptive_reshape", "shared_core"):
            if getattr(self, opt) and self.format != "tucker":
                raise ValueError(f"TNConfig.{opt}=True needs format='tucker' (got format={self.format!r})")
        if self.format == "bt" and self.rel_error is not None:
            raise ValueError("TNConfig(format='bt', rel_error=...): a block-term decomposition is fitted at fixed "
                             "ranks; give ranks= or compression_ratio= (rel_error is for 'tt', 'tr', 'tucker')")
        if self.adaptive_reshape and self.compression_ratio is None:
            raise ValueError("TNConfig.adaptive_reshape=True needs compression_ratio= (the budget it optimises for)")
        if self.shared_core and not isinstance(self.ranks, int):
            raise ValueError(f"TNConfig.shared_core=True needs one int rank (ranks=int, the core size per mode); "
                             f"got ranks={self.ranks!r}")
        modes = self.kernel_mode.values() if isinstance(self.kernel_mode, dict) else [self.kernel_mode]
        bad = [m for m in modes if m not in KERNEL_MODES or (isinstance(self.kernel_mode, dict) and m == "auto")]
        if bad:
            raise ValueError(f"TNConfig.kernel_mode={self.kernel_mode!r}: valid choices are {KERNEL_MODES} "
                             "(or {module name: 'own' | 'in'})")
        if self.input_size is not None:
            size = list(self.input_size) if isinstance(self.input_size, (list, tuple)) else None
            if not size or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
                raise ValueError(f"TNConfig.input_size={self.input_size!r}: one sample's input shape, a list of "
                                 "ints >= 1 without the batch dimension (e.g. [3, 224, 224])")
            self.input_size = size
        if self.n_modes is not None and self.n_modes < 1:
            raise ValueError(f"TNConfig.n_modes={self.n_modes}: must be >= 1")
        found = _conflicts(self)
        if found:
            raise ValueError(found[0][0])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TNConfig":
        """The config of ``to_dict``. Dicts written by earlier versions may combine options that had
        no effect there (e.g. ``budget`` with fixed ``ranks``, whose default was "params"): each such
        option is set to what those versions did, with a warning (silently for that old default)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"TNConfig.from_dict: unknown keys {unknown}; valid keys are {sorted(fields)}")
        d = dict(d)
        for _ in range(len(fields)):
            values = {n: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                      for n, f in fields.items()}
            found = _conflicts(SimpleNamespace(**{**values, **d}))
            message, name, value = found[0] if found else ("", None, None)
            if name is None:
                break
            if not (name == "budget" and d.get("budget") == "params" and d.get("compression_ratio") is None):
                warnings.warn(f"TNConfig.from_dict: {message}; reading {name}={value!r}", stacklevel=2)
            d[name] = value
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "TNConfig":
        return cls.from_dict(json.loads(s))


def _conflicts(c: Any) -> list[tuple[str, str | None, Any]]:
    """The options of config ``c`` that cannot act as written: (message, option, the value earlier
    versions acted on instead, or option None where they refused it too)."""
    out: list[tuple[str, str | None, Any]] = []
    given = "ranks=" if c.ranks is not None else "rel_error="
    tn = "format='tt' or 'tr'"
    spectral = c.format in ("tucker", "bt")
    types = list(c.layer_types) if isinstance(c.layer_types, (list, tuple)) else [c.layer_types]
    recurrent = [t for t in ("lstm", "gru") if t in types]
    if c.compression_ratio is None and c.budget != "auto":
        out.append((f"TNConfig(budget={c.budget!r}, {given}...): budget chooses what a compression_ratio= divides; "
                    f"with {given} it does nothing: leave budget at 'auto' or give compression_ratio=",
                    "budget", "auto"))
    if c.compression_ratio is None and c.allocation != "global":
        out.append((f"TNConfig(allocation={c.allocation!r}, {given}...): allocation spreads a compression_ratio= "
                    f"over the layers; with {given} it does nothing: leave allocation at 'global' or give "
                    "compression_ratio=", "allocation", "global"))
    if spectral and c.budget not in ("auto", "params"):
        out.append((f"TNConfig(format={c.format!r}, budget={c.budget!r}): {c.format} ranks come from the weights' "
                    f"mode spectra at a params ratio, not from time or FLOPs: valid budgets for it are 'auto', "
                    f"'params'; budget={c.budget!r} needs {tn}", "budget", "auto"))
    if spectral and c.allocation == "time":
        out.append((f"TNConfig(format={c.format!r}, allocation='time'): {c.format} ranks come from the weights' "
                    f"mode spectra: valid allocations for it are 'global', 'uniform'; 'time' needs {tn}",
                    "allocation", "uniform"))
    if spectral and c.kernel_mode != "auto":
        out.append((f"TNConfig(format={c.format!r}, kernel_mode={c.kernel_mode!r}): kernel_mode is the layout of "
                    f"TT/TR convolutions ({tn}); {c.format} convs have one: leave kernel_mode at 'auto'",
                    "kernel_mode", "auto"))
    if c.kernel_mode != "auto" and "conv" not in types:
        out.append((f"TNConfig(kernel_mode={c.kernel_mode!r}, layer_types={types}): kernel_mode is a "
                    "conv layout: add 'conv' to layer_types or leave kernel_mode at 'auto'", "kernel_mode", "auto"))
    if c.budget == "latency" and not c.plan_for_speed:
        out.append(("TNConfig(budget='latency', plan_for_speed=False): the latency budget plans by time, "
                    "plan_for_speed=False by size alone: use plan_for_speed=True, or a budget of 'auto', "
                    "'params', 'params+flops', 'flops'", "plan_for_speed", True))
    if c.budget == "latency" and c.allocation != "global":
        out.append((f"TNConfig(budget='latency', allocation={c.allocation!r}): with the latency budget each layer "
                    "takes its largest form that many times faster, nothing is allocated: leave allocation at "
                    "'global'", "allocation", "global"))
    if c.allocation == "time" and c.budget not in ("auto", "params"):
        out.append((f"TNConfig(allocation='time', budget={c.budget!r}): allocation='time' spends a parameter "
                    "budget: it needs budget='auto' or budget='params'", None, None))
    if c.allocation == "time" and not c.plan_for_speed:
        out.append(("TNConfig(allocation='time', plan_for_speed=False): the time allocation spreads the budget "
                    "by the cost model's times, plan_for_speed=False plans by size alone: use allocation="
                    "'global' or 'uniform', or plan_for_speed=True", "allocation", "uniform"))
    if c.allocation == "uniform" and c.budget in ("flops", "params+flops"):
        out.append((f"TNConfig(allocation='uniform', budget={c.budget!r}): the uniform allocation puts every "
                    "layer at the ratio in params: a FLOPs budget needs allocation='global'", "budget", "auto"))
    if c.max_rank is not None and c.rel_error is None:
        out.append((f"TNConfig(max_rank={c.max_rank}): max_rank caps the ranks that rel_error= chooses; with "
                    "ranks= or compression_ratio= give the ranks or the ratio alone", "max_rank", None))
    if c.compress_hidden and not recurrent:
        out.append((f"TNConfig(compress_hidden=True, layer_types={types}): compress_hidden applies "
                    "to recurrent layers: add 'lstm' or 'gru' to layer_types", "compress_hidden", False))
    return out
