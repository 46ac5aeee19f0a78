"""``Plan``: what ``compress`` will do to a model, as a value (JSON you can save, read, diff and reuse).

A plan holds the config it was made for, one spec per target (TN class, tensorization, ranks, conv
layout), the targets left dense with the reason, per-target notes for the report, and how it was
made: ``tuned`` is None for the deterministic plan (``tn_hf.plan``: rules and the reference cost
model computed from shapes, the same on every machine) and a record of the device, dtype, batch
sizes, thread count and versions for a measured one (``tn_hf.tune``).

``compress(model, plan)``, ``ADMMScheduler(model, plan)``, ``ADMMTTCallback(plan)`` and the CLI's
``--plan FILE`` take a plan; each of them also takes a ``TNConfig`` and then plans it first.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TNConfig

PLAN_VERSION = 1
MAX_PLAN_BYTES = 16 << 20
_KEYS = ("plan_version", "model", "config", "specs", "kept_dense", "notes", "tuned")


class PlanError(ValueError):
    """A plan file or value that is malformed, of another version, or made for another model."""


@dataclass
class Plan:
    """What ``compress`` does to a model (see the module docstring). Build one with ``tn_hf.plan`` or
    ``tn_hf.tune``; ``save`` / ``Plan.load`` round-trip it through JSON exactly."""

    config: TNConfig
    specs: dict[str, dict] = field(default_factory=dict)        # target module name -> TN layer spec
    kept_dense: dict[str, str] = field(default_factory=dict)    # target left dense -> reason
    notes: dict[str, str] = field(default_factory=dict)         # target -> the planner's note (report)
    model: str = ""                                             # class name of the model planned for
    tuned: dict[str, Any] | None = None                         # None: reference cost model; else measured on

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {"plan_version": PLAN_VERSION, "model": self.model, "config": self.config.to_dict(),
                "specs": self.specs, "kept_dense": self.kept_dense, "notes": self.notes, "tuned": self.tuned}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Any, where: str = "plan") -> Plan:
        if not isinstance(d, dict):
            raise PlanError(f"{where}: a plan is a JSON object with keys {list(_KEYS)}")
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise PlanError(f"{where}: unknown keys {unknown}; valid keys are {list(_KEYS)}")
        version = d.get("plan_version")
        if version != PLAN_VERSION:
            raise PlanError(f"{where}: plan_version {version!r}; this tn_hf reads version {PLAN_VERSION}")
        try:
            config = TNConfig.from_dict(d.get("config"))  # type: ignore[arg-type]  # not a dict: TypeError below
        except (TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"{where}: bad 'config': {e}") from None
        specs, kept, notes = d.get("specs"), d.get("kept_dense") or {}, d.get("notes") or {}
        if not isinstance(specs, dict) or not all(isinstance(k, str) and isinstance(v, dict) and isinstance(
                v.get("class"), str) for k, v in specs.items()):
            raise PlanError(f"{where}: 'specs' must map module names to layer specs (objects with a 'class')")
        for what, m in (("kept_dense", kept), ("notes", notes)):
            if not isinstance(m, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
                raise PlanError(f"{where}: {what!r} must map module names to strings")
        tuned = d.get("tuned")
        if tuned is not None and not isinstance(tuned, dict):
            raise PlanError(f"{where}: 'tuned' must be null or an object")
        model = d.get("model", "")
        if not isinstance(model, str):
            raise PlanError(f"{where}: 'model' must be a string")
        return cls(config, dict(specs), dict(kept), dict(notes), model, tuned)

    @classmethod
    def from_json(cls, s: str, where: str = "plan") -> Plan:
        try:
            d = json.loads(s)
        except (ValueError, RecursionError) as e:
            raise PlanError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
        return cls.from_dict(d, where)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON (to a temporary file in the same folder, then renamed: never half-written)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no plan file at {path}")
        size = path.stat().st_size
        if size > MAX_PLAN_BYTES:
            raise PlanError(f"{path}: {size} bytes; a plan is at most {MAX_PLAN_BYTES} bytes")
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))

    # ------------------------------------------------------------------ derived
    def with_ranks(self, ranks: dict) -> Plan:
        """A copy whose targets take these ranks: ``{target name: rank list}``, or for a recurrent target
        ``{target name: {matrix name: rank list}}`` (its matrices are then decomposed at exactly those
        ranks instead of at the plan's ratio)."""
        specs = {}
        for n, s in self.specs.items():
            r = ranks.get(n)
            if isinstance(r, dict):
                s = copy.deepcopy(s)
                for w, rr in r.items():
                    s["weights"][w]["ranks"] = list(rr)
            elif r is not None:
                s = dict(s, ranks=list(r))
            specs[n] = dict(s)
        return dataclasses.replace(self, specs=specs)

    def summary(self) -> str:
        how = "reference cost model" if self.tuned is None else \
            f"tuned on {self.tuned.get('device')} ({self.tuned.get('dtype')}, batches {self.tuned.get('batch_sizes')})"
        return (f"Plan for {self.model or 'a model'}: {len(self.specs)} TN targets, "
                f"{len(self.kept_dense)} kept dense; {how}")


def as_plan_or_config(value) -> Plan | TNConfig:
    """A ``Plan`` as it is; a ``TNConfig`` or its dict as a ``TNConfig``; anything else is a TypeError."""
    if isinstance(value, (Plan, TNConfig)):
        return value
    if isinstance(value, dict):
        return TNConfig.from_dict(value)
    raise TypeError(f"expected a tn_hf.Plan, a TNConfig or its dict, got {type(value).__name__}")
