"""ADMMScheduler: train the dense model towards low TT/TR rank (ADMM-TT, seeds/000).

Problem: minimise loss(W) subject to rank_TN(W_l) <= r_l for every target weight W_l.
Scaled augmented Lagrangian, per target ``l``::

    loss(W) + rho/2 * ||W_l - Z_l + U_l||^2

* W-step, two forms (``w_step``):

  - ``"prox"`` (default without an explicit ``rho``; forward-backward splitting): the optimizer takes its
    ordinary step on the loss, then ``step()`` applies the proximal operator of the penalty::

        W <- (W + rho * (Z - U)) / (1 + rho)

    Here ``rho`` is dimensionless (it is ``lr * rho`` of the gradient form): each step closes the
    fraction ``rho / (1 + rho)`` of the gap to ``Z - U``, whatever the optimizer, learning rate,
    gradient clipping or weight scale. One default therefore fits SGD, Adam, any model.
  - ``"grad"`` (the paper's form; the default when ``rho`` is given): ``prox_grad_()`` adds
    ``rho * (W - Z + U)`` to ``W.grad`` before the optimizer step (``penalty()`` is the same term as a
    differentiable tensor); ``rho`` is in the units of the loss gradient.

* Z-step (every ``update_every`` optimizer steps, or per epoch)::

      Z = detensorize(project(tensorize(W + U), ranks))      # tt_project / tucker_project

  TR and block-term have no closed-form fit, and a cold one moves even a tensor already in the set
  (TR-SVD by 20-50 % of its norm on the MNIST CNN's layers): their Z-step refits from the previous
  Z's cores (``decompositions.fit``: ALS / block sweeps, never worse than the start), and
  ``compress()`` starts the layers' fit from the last ones.

* U-step: ``U += W - Z`` (grad form; the prox form damps it to ``U += a (W - Z)`` with
  ``a = min(1, k rho / (1 + rho))``, the part of the gap its k steps since the last update
  closed, see ``_dual_step``). A change of rho rescales U so that the unscaled dual ``rho * U`` stays.

Default schedule (``total_steps`` known, e.g. the Trainer's ``max_steps``): rho grows
geometrically from ``1 / total_steps`` to ``10`` over the run (prox form), ``rho_t = rho_0 *
(rho_1 / rho_0) ** (t / T)``, and Z/U are updated every ``max(1, T // 50)`` steps. Early on the
loss dominates and the weights move towards the low-rank set slowly (the pull integrated over the
first half of the run is a few e-folds); in the last part every step closes most of the gap while
the loss keeps adapting the weights inside the low-rank set, so the run ends with a small primal
residual ``||W - Z|| / ||W||`` (about 1e-3 on the MNIST benchmark) and decomposing loses little.

The targets and their ranks come from a ``Plan``: the one passed in, or ``tn_hf.plan(model,
config)`` (deterministic). ``sched.plan`` is the plan at the ranks ADMM trains for, so
``sched.compress()``, the Trainer callback's ``compress_at_end`` and ``tn_hf.compress(model,
sched.plan)`` all decompose at exactly those ranks; nothing is stored on the model. Under DDP
rank 0 computes Z and U and broadcasts them: every rank holds the same state. ``state_dict()`` /
``load_state_dict()`` make it a checkpointable object for ``accelerator.register_for_checkpointing``;
``save(dir)`` / ``load(dir)`` write ``admm_state.safetensors`` (Z, U, Zprev; the counters, rho and
ranks in its metadata) atomically, plus a readable copy ``admm_state.json``.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

from . import decompositions as D
from .config import TNConfig
from .convert import compress
from .decompositions import ranks_for_ratio
from .layers import TNLayer, registry
from .layers.base import normalize_ranks
from .plans import as_plan_or_config
from .targeting import resolve

STATE_TENSORS = "admm_state.safetensors"
STATE_JSON = "admm_state.json"
_KINDS = ("Z", "U", "Zprev")
_TMP_PREFIX = ".admm_state.tmp-"


def _write_atomic(directory: str, name: str, data: bytes):
    """Write ``directory/name`` so that a crash leaves the old file or the new one, never a torn one."""
    tmp = os.path.join(directory, f"{_TMP_PREFIX}{os.getpid()}-{name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@dataclass
class _Slot:
    """One dense weight under an ADMM constraint."""
    name: str          # "<module name>" or "<module name>.<weight name>" (recurrent)
    target: str        # module name from plan()
    param: nn.Parameter
    cls: type[TNLayer] # class providing tensorize/detensorize for this weight
    spec: dict         # (leaf) spec of this weight
    ranks: list
    weight: str = "weight"  # the dense weight's name in its module (recurrent: "weight_ih_l0", ...)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / DeepSpeed / torch.compile wrappers (accelerate's unwrap)."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def _dist():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


W_STEPS = ("prox", "grad")
AUTO_UPDATES = 50          # Z/U updates over a run of known length (update_every=None)
AUTO_RHO_END = 10.0        # prox rho at the end of the automatic schedule (each step closes 10/11 of the gap)


def _check_schedule(rho_schedule):
    if rho_schedule is None or rho_schedule == "constant":
        return None
    valid = ("constant", "step", "adaptive", "geometric")
    if not isinstance(rho_schedule, dict) or rho_schedule.get("type") not in valid:
        raise ValueError(f"ADMMScheduler: rho_schedule={rho_schedule!r}; valid: None (automatic), 'constant', "
                         "{'type': 'geometric', 'start': a, 'end': b} (over total_steps), "
                         "{'type': 'step', 'factor': f, 'milestones': [steps...]} or "
                         "{'type': 'adaptive', 'mu': 10, 'tau': 2}")
    s = dict(rho_schedule)
    if s["type"] == "constant":
        return None
    if s["type"] == "step":
        if "factor" not in s or "milestones" not in s:
            raise ValueError("ADMMScheduler: step rho_schedule needs 'factor' and 'milestones'")
        s["milestones"] = sorted(int(m) for m in s["milestones"])
    elif s["type"] == "geometric":
        if not (float(s.get("start", 0)) > 0 and float(s.get("end", 0)) > 0):
            raise ValueError(f"ADMMScheduler: geometric rho_schedule needs 'start' > 0 and 'end' > 0, got {s}")
    else:
        s.setdefault("mu", 10.0)
        s.setdefault("tau", 2.0)
        if s["tau"] <= 1 or s["mu"] <= 1:
            raise ValueError(f"ADMMScheduler: adaptive rho_schedule needs mu > 1 and tau > 1, got {s}")
    return s


class ADMMScheduler:
    """Z/U state, W-step, projections and rho schedule for ADMM-TT training.

    Accelerate loop::

        sched = ADMMScheduler(model, cfg, total_steps=n_optimizer_steps)   # defaults: automatic
        ...
        loss.backward()
        if accelerator.sync_gradients:      # once per real optimizer step
            sched.prox_grad_()              # after unscale/clip (a no-op for w_step="prox")
            optimizer.step(); sched.step()  # prox W-step, rho schedule, Z/U on schedule

    ``total_steps``: optimizer steps of the whole run; enables the automatic rho schedule and Z/U
    cadence (see the module docstring). ``rho``: the (initial) penalty; given without a
    ``rho_schedule`` it stays constant. ``update_every``: an int (optimizer steps between Z/U
    updates) or ``"epoch"`` (call ``epoch_end()``; with ``steps_per_epoch`` given, ``step()`` does
    it itself). ``ranks``: ``{slot name: rank list}`` overriding the planned ranks (a resumed run).
    ``w_step``: ``"prox"`` or ``"grad"``; None picks ``"prox"`` unless an explicit ``rho`` is given
    (then ``"grad"``: rho in gradient units, as in the paper and earlier versions).
    """

    def __init__(self, model: nn.Module, config, *, total_steps: int | None = None, rho: float | None = None,
                 update_every=None, rho_schedule=None, w_step: str | None = None, steps_per_epoch: int | None = None,
                 ranks: dict | None = None, progress: bool = False):
        value = as_plan_or_config(config)
        if isinstance(value, TNConfig) and value.rel_error is not None:
            raise ValueError("ADMMScheduler: TNConfig(rel_error=...) does not fix the ranks; ADMM needs "
                             "TNConfig(ranks=...) or TNConfig(compression_ratio=...)")
        if w_step is None:  # an explicit rho keeps its meaning of earlier versions (gradient units)
            w_step = "grad" if rho is not None else "prox"
        if w_step not in W_STEPS:
            raise ValueError(f"ADMMScheduler: w_step={w_step!r}; valid: {W_STEPS}")
        if rho is not None and not rho > 0:
            raise ValueError(f"ADMMScheduler: rho={rho} must be > 0")
        if total_steps is not None and not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"ADMMScheduler: total_steps={total_steps!r}; valid: None or an int >= 1")
        if update_every is None:
            update_every = max(1, total_steps // AUTO_UPDATES) if total_steps else 20
        if update_every != "epoch" and not (isinstance(update_every, int) and update_every >= 1):
            raise ValueError(f"ADMMScheduler: update_every={update_every!r}; valid: None (automatic), "
                             "an int >= 1 or 'epoch'")
        if rho_schedule is None and rho is None and total_steps and w_step == "prox":
            rho_schedule = {"type": "geometric", "start": 1.0 / total_steps, "end": AUTO_RHO_END}
        self.rho_schedule = _check_schedule(rho_schedule)
        if self.rho_schedule is not None and self.rho_schedule["type"] == "geometric":
            if not total_steps:
                raise ValueError("ADMMScheduler: a geometric rho_schedule runs over total_steps; pass total_steps=")
            rho = float(self.rho_schedule["start"])
        if rho is None:
            rho = 1e-2 if w_step == "prox" else 1e-3
        self.model = _unwrap(model)
        self.rho = float(rho)
        self.w_step = w_step
        self.total_steps = total_steps
        self.update_every = update_every
        self.steps_per_epoch = steps_per_epoch
        self.progress = progress
        self.steps = 0
        self.epochs = 0
        self.updates = 0
        self.update_seconds = 0.0
        self.slots: list[_Slot] = []
        the_plan, targets = resolve(self.model, value)
        self.config = config = the_plan.config
        for t in targets:
            self.slots.extend(self._slots_for(t))
        if not self.slots:
            raise ValueError(f"ADMMScheduler: no target in {type(self.model).__name__} for {config}")
        if self.config.rel_error is not None:
            raise ValueError("ADMMScheduler: a plan for TNConfig(rel_error=...) does not fix the ranks; ADMM "
                             "needs one for ranks= or compression_ratio=")
        if ranks is not None:
            if set(ranks) != {s.name for s in self.slots}:
                raise ValueError(f"ADMMScheduler: ranks= names {sorted(ranks)}; this model's targets for "
                                 f"{config} are {sorted(s.name for s in self.slots)}")
            for s in self.slots:
                s.ranks = [int(r) for r in ranks[s.name]]
        for s in self.slots:
            if _is_dtensor(s.param):
                raise ValueError(f"ADMMScheduler: {s.name} is a DTensor (FSDP2 / tensor parallel); ADMM needs "
                                 "full weights on every rank: use DDP, or gather the model (full_tensor()) "
                                 "before building the scheduler")
        # the plan ADMM trains for; compress() decomposes at exactly these ranks and forms
        pinned: dict = {}
        for s in self.slots:  # recurrent targets: every matrix at its ranks (not the ratio's spectrum-based pick)
            if s.weight == "weight":
                pinned[s.target] = s.ranks
            else:
                pinned.setdefault(s.target, {})[s.weight] = s.ranks
        self.plan = the_plan.with_ranks(pinned)
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self.Zprev: dict[str, torch.Tensor] = {}
        self._warm: dict[str, list[torch.Tensor]] = {}  # TR / BT slots: the cores of the last Z (warm starts)
        with torch.no_grad():
            for s in self.slots:
                self.U[s.name] = torch.zeros_like(s.param, dtype=torch.float32)
            self._project_all(first=True)

    # ------------------------------------------------------------------ targets
    def _slots_for(self, t) -> list[_Slot]:
        weights = t.cls.dense_weights(t.module, t.spec)  # recurrent: every TN matrix of the spec (hidden too)
        specs = t.cls.weight_specs(t.spec)
        out = []
        for wname, w in weights.items():
            spec = specs[wname]
            cls = registry.get(spec.get("class"), t.cls)
            modes = tuple(cls.tensorize(w.detach(), spec).shape)
            if spec.get("ranks") is not None:
                ranks = normalize_ranks(spec["ranks"], modes, cls.format, f"{t.name}.{wname}")
            else:  # recurrent leaves at a ratio (the plan's for this layer): what from_dense picks
                ratio = t.spec.get("compression_ratio", self.config.compression_ratio)
                if ratio is None:
                    raise ValueError(f"ADMMScheduler: target {t.name!r} has neither ranks nor a ratio in its plan")
                ranks = ranks_for_ratio(modes, float(ratio), cls.format)
            name = t.name if len(weights) == 1 else f"{t.name}.{wname}"
            out.append(_Slot(name, t.name, w, cls, spec, list(ranks), wname))
        return out

    @property
    def ranks(self) -> dict[str, list[int]]:
        return {s.name: list(s.ranks) for s in self.slots}

    def _project(self, s: _Slot, x: torch.Tensor) -> torch.Tensor:
        t = s.cls.tensorize(x, s.spec)
        if s.cls.format in D.WARM_FORMATS:  # no closed-form fit: start from the last Z's cores (tr.py, bt.py)
            cores = D.fit(t, s.ranks, s.cls.format, init=self._warm.get(s.name))
            self._warm[s.name] = cores
            z = D.to_full(cores, s.cls.format)
        else:
            z = D.project(t, s.ranks, s.cls.format)
        return s.cls.detensorize(z, s.spec).reshape(x.shape)

    def _project_all(self, first=False):
        """Z-step and U-step for every slot; rank 0 computes, then broadcasts."""
        t0 = time.perf_counter()
        dist = _dist()
        compute = dist is None or dist.get_rank() == 0
        alpha = self._dual_step()
        slots = tqdm(self.slots, desc="ADMM projections", leave=False,
                     disable=not (first and self.progress and compute))
        for s in slots:
            W = s.param.detach().float()
            if compute:
                Z = self._project(s, W + self.U[s.name])
                U = self.U[s.name] if first else self.U[s.name] + alpha * (W - Z)
            else:
                Z, U = torch.empty_like(W), torch.empty_like(W)
            if dist is not None:
                dist.broadcast(Z, 0)
                dist.broadcast(U, 0)
                if s.cls.format in D.WARM_FORMATS:  # every rank decomposes from the same warm start
                    box: list = [self._warm.get(s.name) if compute else None]
                    dist.broadcast_object_list(box, 0)
                    self._warm[s.name] = [c.to(W.device) for c in box[0] or ()]
            self.Zprev[s.name] = Z.clone() if first else self.Z[s.name]
            self.Z[s.name] = Z
            self.U[s.name] = U
        self._last_update = self.steps
        if not first:
            self.updates += 1
            self._adapt_rho()
        self.update_seconds += time.perf_counter() - t0

    def _dual_step(self) -> float:
        """U-step size: 1 (ADMM) for the grad form; for the prox form min(1, k rho / (1 + rho)), the
        fraction of the gap the k prox steps since the last update closed, so the dual does not run
        ahead of a W-step that is far from exact (which would make W oscillate around Z)."""
        if self.w_step == "grad":
            return 1.0
        k = self.steps - getattr(self, "_last_update", 0)
        return min(1.0, k * self.rho / (1.0 + self.rho))

    # ------------------------------------------------------------------ training hooks
    @torch.no_grad()
    def prox_grad_(self):
        """Grad W-step: add rho * (W - Z + U) to every target's .grad (once per real optimizer step).

        A no-op for w_step="prox" (there ``step()`` applies the proximal operator)."""
        if self.w_step != "grad":
            return
        for s in self.slots:
            g = (s.param.detach().float() - self.Z[s.name] + self.U[s.name]).mul_(self.rho)
            if s.param.grad is None:
                s.param.grad = g.to(s.param.dtype)
            else:
                s.param.grad.add_(g.to(s.param.grad.dtype))

    def penalty(self) -> torch.Tensor:
        """rho/2 * sum ||W - Z + U||^2 (differentiable in W): add it to the loss instead of prox_grad_."""
        total = None
        for s in self.slots:
            term = (s.param.float() - self.Z[s.name] + self.U[s.name]).pow(2).sum()
            total = term if total is None else total + term
        assert total is not None  # the constructor requires one target at least
        return 0.5 * self.rho * total

    @torch.no_grad()
    def prox_(self):
        """Prox W-step: W <- (W + rho (Z - U)) / (1 + rho) for every target (w_step="prox")."""
        c = 1.0 / (1.0 + self.rho)
        for s in self.slots:
            W = s.param.detach()
            new = (W.float() + self.rho * (self.Z[s.name] - self.U[s.name])).mul_(c)
            W.copy_(new.to(W.dtype))

    def step(self):
        """After one optimizer step: prox W-step, rho schedule, Z/U update when due."""
        if self.w_step == "prox":
            self.prox_()
        self.steps += 1
        sch = self.rho_schedule
        if sch is not None and sch["type"] == "step" and self.steps in sch["milestones"]:
            self._set_rho(self.rho * float(sch["factor"]))
        elif sch is not None and sch["type"] == "geometric":
            assert self.total_steps  # the constructor requires it for a geometric schedule
            t = min(self.steps / self.total_steps, 1.0)
            self._set_rho(float(sch["start"]) * (float(sch["end"]) / float(sch["start"])) ** t)
        if self.update_every == "epoch":
            if self.steps_per_epoch and self.steps % self.steps_per_epoch == 0:
                self.epoch_end()
        elif self.steps % self.update_every == 0:
            self.update()

    def epoch_end(self):
        """Per-epoch Z/U update (update_every="epoch")."""
        self.epochs += 1
        if self.update_every == "epoch":
            self.update()

    @torch.no_grad()
    def update(self):
        """Z = project(W + U) at the target ranks; U += W - Z."""
        self._project_all()

    def _set_rho(self, new: float):
        """Change rho keeping the unscaled dual Y = rho * U fixed."""
        if new == self.rho:
            return
        scale = self.rho / new
        for k in self.U:
            self.U[k].mul_(scale)
        self.rho = float(new)

    def _adapt_rho(self):
        sch = self.rho_schedule
        if sch is None or sch["type"] != "adaptive":
            return
        r = self.residuals()
        mu, tau = float(sch["mu"]), float(sch["tau"])
        if r["primal"] > mu * r["dual"]:
            self._set_rho(self.rho * tau)
        elif r["dual"] > mu * r["primal"]:
            self._set_rho(self.rho / tau)

    # ------------------------------------------------------------------ monitoring
    @torch.no_grad()
    def residuals(self) -> dict:
        """Primal ||W - Z|| / ||W|| and dual rho ||Z - Z_prev|| / ||W||, per layer and overall."""
        layers, P, D, N = {}, 0.0, 0.0, 0.0
        for s in self.slots:
            W = s.param.detach().float()
            n2 = float(W.pow(2).sum())
            p2 = float((W - self.Z[s.name]).pow(2).sum())
            d2 = float((self.Z[s.name] - self.Zprev[s.name]).pow(2).sum()) * self.rho ** 2
            den = math.sqrt(n2) or 1.0
            layers[s.name] = {"primal": math.sqrt(p2) / den, "dual": math.sqrt(d2) / den}
            P, D, N = P + p2, D + d2, N + n2
        den = math.sqrt(N) or 1.0
        return {"primal": math.sqrt(P) / den, "dual": math.sqrt(D) / den, "rho": self.rho, "layers": layers}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"Z": {k: v.clone() for k, v in self.Z.items()},
                "U": {k: v.clone() for k, v in self.U.items()},
                "Zprev": {k: v.clone() for k, v in self.Zprev.items()},
                "meta": self._meta()}

    def _meta(self) -> dict:
        return {"rho": self.rho, "steps": self.steps, "epochs": self.epochs, "updates": self.updates,
                "update_every": self.update_every, "last_update": self._last_update, "w_step": self.w_step,
                "total_steps": self.total_steps,
                "ranks": self.ranks, "update_seconds": self.update_seconds}

    def load_state_dict(self, state: dict):
        """Restore what ``state_dict()`` returned. Everything is checked before anything changes (a
        ValueError names what does not fit): Z, U and Zprev hold exactly this scheduler's targets as
        finite float tensors of their weights' shapes; the saved ranks, ``w_step`` and ``update_every``
        are this scheduler's; rho is finite and > 0, the counters are ints >= 0."""
        where = "ADMMScheduler.load_state_dict"
        if not (isinstance(state, dict) and isinstance(state.get("meta"), dict)
                and all(isinstance(state.get(kind), dict) for kind in _KINDS)):
            raise ValueError(f"{where}: state must be a dict with {list(_KINDS)} (dicts of tensors) and 'meta' "
                             "(a dict), as state_dict() returns")
        meta = state["meta"]
        for key, own_value in (("ranks", self.ranks), ("w_step", self.w_step), ("update_every", self.update_every)):
            if key not in meta or meta[key] != own_value:
                raise ValueError(f"{where}: saved {key} {meta.get(key, '(missing)')!r} differ from this scheduler's "
                                 f"{own_value!r} (another model, config or schedule)")
        rho = meta.get("rho")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"{where}: saved rho={rho!r} must be a finite number > 0")
        counters = {k: meta.get(k, 0 if k == "update_seconds" else None)
                    for k in ("steps", "epochs", "updates", "update_seconds")}
        counters["last_update"] = meta.get("last_update", counters["steps"])
        bad = {k: v for k, v in counters.items()
               if isinstance(v, bool) or not isinstance(v, (int, float) if k == "update_seconds" else int)
               or not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"{where}: saved counters {bad} must be ints >= 0 (update_seconds: a float >= 0)")
        for kind in _KINDS:
            own, saved = getattr(self, kind), state[kind]
            missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
            if missing or unexpected:
                raise ValueError(f"{where}: {kind} has no entry for {missing} and unexpected entries {unexpected}")
            for k, v in saved.items():
                shape = tuple(own[k].shape)
                if not isinstance(v, torch.Tensor) or not v.is_floating_point() or tuple(v.shape) != shape:
                    raise ValueError(f"{where}: {kind}[{k!r}] must be a float tensor of shape {shape}, "
                                     f"got {type(v).__name__} {getattr(v, 'dtype', '')} "
                                     f"{tuple(getattr(v, 'shape', ()))}")
                if not bool(torch.isfinite(v).all()):
                    raise ValueError(f"{where}: {kind}[{k!r}] holds NaN/Inf values")
        for kind in _KINDS:
            own = getattr(self, kind)
            for k in own:
                own[k] = state[kind][k].to(device=own[k].device, dtype=torch.float32).clone()
        self.rho = float(rho)
        self.steps, self.epochs, self.updates = counters["steps"], counters["epochs"], counters["updates"]
        self.update_seconds = float(counters["update_seconds"])
        self._last_update = counters["last_update"]

    def save(self, directory: str, *, tag: str | None = None):
        """Write admm_state.safetensors (Z, U, Zprev; rho, counters, ranks and ``tag`` in its metadata)
        and the readable copy admm_state.json, each atomically (temp file, fsync, os.replace)."""
        os.makedirs(directory, exist_ok=True)
        for f in os.listdir(directory):  # temp files of an interrupted earlier save
            if f.startswith(_TMP_PREFIX):
                try:
                    os.remove(os.path.join(directory, f))
                except OSError:
                    pass
        meta = dict(self._meta(), tag=tag)
        tensors = {f"{kind}.{k}": v.detach().to("cpu", copy=True).contiguous()  # own storage each
                   for kind in _KINDS for k, v in getattr(self, kind).items()}
        _write_atomic(directory, STATE_TENSORS, save(tensors, metadata={"tn_hf_admm": json.dumps(meta)}))
        _write_atomic(directory, STATE_JSON, json.dumps(meta, indent=1).encode())

    @staticmethod
    def read_meta(directory: str) -> dict | None:
        """The saved rho, counters, ranks and tag of ``directory`` (None if it holds no ADMM state)."""
        path = os.path.join(directory, STATE_TENSORS)
        if not os.path.isfile(path):
            return None
        with safe_open(path, framework="pt") as f:
            meta = (f.metadata() or {}).get("tn_hf_admm")
        try:
            if meta is None:  # written before the metadata existed
                with open(os.path.join(directory, STATE_JSON)) as fh:
                    meta = fh.read()
            out = json.loads(meta)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"ADMMScheduler: the ADMM state in {directory} has unreadable metadata: "
                             f"{type(e).__name__}") from None
        if not isinstance(out, dict):
            raise ValueError(f"ADMMScheduler: the ADMM state in {directory} has metadata that is not an object")
        return out

    def load(self, directory: str):
        path = os.path.join(directory, STATE_TENSORS)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ADMMScheduler.load: no {STATE_TENSORS} in {directory}")
        flat = load_file(path)
        state: dict = {kind: {} for kind in _KINDS}
        for key, v in flat.items():
            kind, _, name = key.partition(".")
            if kind not in _KINDS:
                raise ValueError(f"ADMMScheduler.load: {path} holds {key!r}; its tensors are named "
                                 f"'<{'|'.join(_KINDS)}>.<target>'")
            state[kind][name] = v
        state["meta"] = self.read_meta(directory)
        self.load_state_dict(state)

    # ------------------------------------------------------------------ the end
    def compress_config(self) -> TNConfig:
        """The config that decomposes every target at exactly the ranks ADMM trained for."""
        ranks: dict[str, object] = {}
        for s in self.slots:
            if s.name == s.target:
                ranks[s.target] = list(s.ranks)
            else:  # recurrent: one int for all its matrices (largest internal rank)
                ranks[s.target] = max(ranks.get(s.target, 1), max(s.ranks[1:-1] or [1]))
        d = self.config.to_dict()
        d.update(ranks=ranks, compression_ratio=None, rel_error=None, max_rank=None, target_modules=list(ranks),
                 budget="auto", allocation="global")  # (fixed ranks: nothing to allocate)
        modes = {s.target: s.spec.get("kernel_mode", "own") for s in self.slots
                 if s.name == s.target and len(getattr(s.cls, "kernel_modes", ())) > 1}
        if modes:  # the conv layouts the plan chose
            d.update(kernel_mode=modes)
        return TNConfig.from_dict(d)

    def compress(self, model: nn.Module | None = None, *, progress: bool = True):
        """Decompose the targets in place at the ranks ADMM trained for: ``tn_hf.compress(model,
        sched.plan)``; returns its report."""
        model = _unwrap(model) if model is not None else self.model
        init: dict[str, dict[str, list[torch.Tensor]]] = {}
        for s in self.slots:  # TR / BT: the fit starts from the last Z's cores (W ~ Z at the end of ADMM)
            if s.name in self._warm:
                init.setdefault(s.target, {})[s.weight] = self._warm[s.name]
        return compress(model, self.plan, progress=progress, method="admm", init=init or None)

