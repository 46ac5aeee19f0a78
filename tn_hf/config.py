"""TNConfig: one JSON-serialisable description of what to compress and how."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("tt", "tr", "tucker")
LAYER_TYPES = ("linear", "conv", "lstm", "gru")
BUDGETS = ("params", "flops", "latency")
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
      decay fast give more, and with ``plan_for_speed`` (default) where the input size is known,
      the targets' FLOPs (params x output positions) are cut by the same ratio at least: a
      parameter costs its share of both budgets, so layers on large maps give more;
      ``"uniform"``: every layer at this ratio; ``"time"``: with measured
      planning, the same parameter budget spread where it costs the least measured time, each
      layer timed at several sizes - the fastest model of that size, blind to the weights;
      uniform where nothing can be timed).
    * ``rel_error``: per-layer relative Frobenius error bound of the decomposition
      (``max_rank`` caps the ranks).

    ``format="tucker"`` options: ``adaptive_reshape=True`` (with ``compression_ratio``) picks per
    layer the orders and balanced dimensions of the reshaped weight with the lowest Tucker error at
    that ratio (ADA-Tucker); ``shared_core=True`` (with ``ranks=int``) gives every Tucker layer the
    same order and core shape and ties one core across them (SCADA-Tucker). Tucker ranks at a
    ``compression_ratio`` come from the weights' mode spectra (``allocation="global"``: one budget
    over the Linear/Conv targets, ``"uniform"``: every layer at the ratio); ``budget="flops"`` is not
    used for Tucker.

    ``budget``: what ``compression_ratio`` divides - "params" (dense / TN parameters), "flops"
    (parameters weighted by each layer's output positions) or "latency" (dense / TN eval time
    per layer, measured on this machine; implies ``plan_for_speed``; see ``tn_hf.cost``).
    With a ratio, a layer whose TN form would have more parameters or FLOPs than the dense
    layer stays dense (reported as "kept dense: <reason>"). ``plan_for_speed=True`` (default):
    for models that declare their input size (timm's ``pretrained_cfg["input_size"]``), the
    ranks and conv layout are chosen by time measured on this machine among forms of the
    layer's size (cached per machine), and a layer whose TN form is not faster than dense stays
    dense too. ``plan_for_speed=False``: size alone decides (the same layers on every machine).

    ``kernel_mode`` (TT/TR convolutions with a kernel larger than 1): where the kernel mode sits.
    "own": a core of its own between the output- and input-channel cores (the ADMM-TT paper's
    layout; run as 1x1 -> kxk -> 1x1); "in": one mode with the input channels (two cores, run as
    kxk -> 1x1: fewer passes over the activations); "auto" (default): "own", and with measured
    planning the faster of the two at the layer's size; or ``{module name: "own" | "in"}``.

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
    budget: str = "params"
    allocation: str = "global"
    n_modes: int | None = None          # modes per channel side (None: chosen from the size)
    compress_hidden: bool = False      # recurrent layers: hidden-to-hidden in TN form too
    adaptive_reshape: bool = False     # tucker: ADA-Tucker's per-layer choice of order and dimensions
    shared_core: bool = False          # tucker: SCADA-Tucker's one core for all layers
    plan_for_speed: bool = True        # measured rank and layout choice; layers not faster as TN stay dense
    kernel_mode: str | dict[str, str] = "auto"  # TT/TR convs: "own", "in", "auto" or {module name: mode}

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
        if self.allocation == "time" and self.budget != "params":
            raise ValueError(f"TNConfig.allocation='time' spends a parameter budget: it needs budget='params' "
                             f"(got budget={self.budget!r})")
        for opt in ("adaptive_reshape", "shared_core"):
            if getattr(self, opt) and self.format != "tucker":
                raise ValueError(f"TNConfig.{opt}=True needs format='tucker' (got format={self.format!r})")
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
        if self.n_modes is not None and self.n_modes < 1:
            raise ValueError(f"TNConfig.n_modes={self.n_modes}: must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TNConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TNConfig.from_dict: unknown keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "TNConfig":
        return cls.from_dict(json.loads(s))
