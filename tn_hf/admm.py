"""ADMMScheduler: train the dense model towards low TT/TR rank (ADMM-TT, seeds/000).

Problem: minimise loss(W) subject to rank_TN(W_l) <= r_l for every target weight W_l.
Scaled augmented Lagrangian, per target ``l``::

    loss(W) + rho/2 * ||W_l - Z_l + U_l||^2

* W-step: ordinary optimizer steps on the loss plus the proximal gradient
  ``rho * (W - Z + U)`` (``prox_grad_()`` adds it to ``W.grad``; ``penalty()`` is the same
  term as a differentiable tensor for setups where the optimizer steps inside backward).
* Z-step (every ``update_every`` optimizer steps, or per epoch)::

      Z = detensorize(project(tensorize(W + U), ranks))      # tt_project / tr_project

* U-step: ``U += W - Z``.

The targets and their ranks come from ``tn_hf.targeting.plan(model, config)``, so the final
``compress`` decomposes at exactly the ranks ADMM trained for (``ADMMScheduler.compress``
pins them). Under DDP rank 0 computes Z and U and broadcasts them: every rank holds the same
state. ``state_dict()`` / ``load_state_dict()`` make it a checkpointable object for
``accelerator.register_for_checkpointing``; ``save(dir)`` / ``load(dir)`` write
``admm_state.safetensors`` + ``admm_state.json`` (used by the Trainer callback).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from .config import TNConfig

STATE_TENSORS = "admm_state.safetensors"
STATE_JSON = "admm_state.json"
_KINDS = ("Z", "U", "Zprev")


@dataclass
class _Slot:
    """One dense weight under an ADMM constraint."""
    name: str          # "<module name>" or "<module name>.<weight name>" (recurrent)
    target: str        # module name from plan()
    param: nn.Parameter
    cls: type          # class providing tensorize/detensorize for this weight
    spec: dict         # (leaf) spec of this weight
    ranks: list


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and \
            type(model).__name__ in ("DistributedDataParallel", "DataParallel", "OptimizedModule"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def _dist():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


def _check_schedule(rho_schedule):
    if rho_schedule is None or rho_schedule == "constant":
        return None
    if not isinstance(rho_schedule, dict) or rho_schedule.get("type") not in ("constant", "step", "adaptive"):
        raise ValueError(f"ADMMScheduler: rho_schedule={rho_schedule!r}; valid: None/'constant', "
                         "{'type': 'step', 'factor': f, 'milestones': [steps...]} or "
                         "{'type': 'adaptive', 'mu': 10, 'tau': 2}")
    s = dict(rho_schedule)
    if s["type"] == "constant":
        return None
    if s["type"] == "step":
        if "factor" not in s or "milestones" not in s:
            raise ValueError("ADMMScheduler: step rho_schedule needs 'factor' and 'milestones'")
        s["milestones"] = sorted(int(m) for m in s["milestones"])
    else:
        s.setdefault("mu", 10.0)
        s.setdefault("tau", 2.0)
        if s["tau"] <= 1 or s["mu"] <= 1:
            raise ValueError(f"ADMMScheduler: adaptive rho_schedule needs mu > 1 and tau > 1, got {s}")
    return s


class ADMMScheduler:
    """Z/U state, proximal gradient, projections and rho schedule for ADMM-TT training.

    Accelerate loop::

        loss.backward()
        if accelerator.sync_gradients:      # once per real optimizer step
            sched.prox_grad_()              # after unscale/clip
            optimizer.step(); sched.step()

    ``update_every``: an int (optimizer steps between Z/U updates) or ``"epoch"`` (call
    ``epoch_end()``; with ``steps_per_epoch`` given, ``step()`` does it itself).
    """

    def __init__(self, model: nn.Module, config, *, rho: float = 1e-3, update_every=100,
                 rho_schedule=None, steps_per_epoch: int | None = None, progress: bool = False):
        from .targeting import as_config as _as_config, plan
        config = _as_config(config)
        if config.rel_error is not None:
            raise ValueError("ADMMScheduler: TNConfig(rel_error=...) does not fix the ranks; ADMM needs "
                             "TNConfig(ranks=...) or TNConfig(compression_ratio=...)")
        if not rho > 0:
            raise ValueError(f"ADMMScheduler: rho={rho} must be > 0")
        if update_every != "epoch" and not (isinstance(update_every, int) and update_every >= 1):
            raise ValueError(f"ADMMScheduler: update_every={update_every!r}; valid: an int >= 1 or 'epoch'")
        self.model = _unwrap(model)
        self.config = config
        self.rho = float(rho)
        self.update_every = update_every
        self.rho_schedule = _check_schedule(rho_schedule)
        self.steps_per_epoch = steps_per_epoch
        self.steps = 0
        self.epochs = 0
        self.updates = 0
        self.update_seconds = 0.0
        self.slots: list[_Slot] = []
        for t in plan(self.model, config):
            self.slots.extend(self._slots_for(t))
        if not self.slots:
            raise ValueError(f"ADMMScheduler: no target in {type(self.model).__name__} for {config}")
        for s in self.slots:
            if _is_dtensor(s.param):
                raise ValueError(f"ADMMScheduler: {s.name} is a DTensor (FSDP2 / tensor parallel); ADMM needs "
                                 "full weights on every rank: use DDP, or gather the model (full_tensor()) "
                                 "before building the scheduler")
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self.Zprev: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for s in self.slots:
                self.U[s.name] = torch.zeros_like(s.param, dtype=torch.float32)
            self._project_all(first=True)

    # ------------------------------------------------------------------ targets
    def _slots_for(self, t) -> list[_Slot]:
        from .layers import registry
        from .decompositions import ranks_for_ratio
        from .layers.base import normalize_ranks
        weights = t.cls.dense_weights(t.module)
        if len(weights) == 1 and "weight" in weights:
            specs = {"weight": t.spec}
        else:
            specs = t.cls.weight_specs(t.spec)
        out = []
        for wname, w in weights.items():
            spec = specs[wname]
            cls = registry.get(spec.get("class"), t.cls)
            modes = tuple(cls.tensorize(w.detach(), spec).shape)
            if spec.get("ranks") is not None:
                ranks = normalize_ranks(spec["ranks"], modes, cls.format, f"{t.name}.{wname}")
            else:  # recurrent leaves at a ratio: what from_dense(compression_ratio=...) picks
                ranks = ranks_for_ratio(modes, self.config.compression_ratio, cls.format)
            name = t.name if len(weights) == 1 else f"{t.name}.{wname}"
            out.append(_Slot(name, t.name, w, cls, spec, list(ranks)))
        return out

    @property
    def ranks(self) -> dict[str, list[int]]:
        return {s.name: list(s.ranks) for s in self.slots}

    def _project(self, s: _Slot, x: torch.Tensor) -> torch.Tensor:
        from . import decompositions as D
        proj = D.tt_project if s.cls.format == "tt" else D.tr_project
        return s.cls.detensorize(proj(s.cls.tensorize(x, s.spec), s.ranks), s.spec).reshape(x.shape)

    def _project_all(self, first=False):
        """Z-step and U-step for every slot; rank 0 computes, then broadcasts."""
        t0 = time.perf_counter()
        dist = _dist()
        compute = dist is None or dist.get_rank() == 0
        for s in self.slots:
            W = s.param.detach().float()
            if compute:
                Z = self._project(s, W + self.U[s.name])
                U = self.U[s.name] if first else self.U[s.name] + W - Z
            else:
                Z, U = torch.empty_like(W), torch.empty_like(W)
            if dist is not None:
                dist.broadcast(Z, 0)
                dist.broadcast(U, 0)
            self.Zprev[s.name] = Z if first else self.Z[s.name]
            self.Z[s.name] = Z
            self.U[s.name] = U
        if not first:
            self.updates += 1
            self._adapt_rho()
        self.update_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ training hooks
    @torch.no_grad()
    def prox_grad_(self):
        """Add rho * (W - Z + U) to every target's .grad (once per real optimizer step)."""
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
        return 0.5 * self.rho * total

    def step(self):
        """Count one optimizer step; rho milestones; Z/U update when due."""
        self.steps += 1
        sch = self.rho_schedule
        if sch is not None and sch["type"] == "step" and self.steps in sch["milestones"]:
            self._set_rho(self.rho * float(sch["factor"]))
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
                "update_every": self.update_every, "ranks": self.ranks,
                "update_seconds": self.update_seconds}

    def load_state_dict(self, state: dict):
        meta = state["meta"]
        if meta.get("ranks") is not None and meta["ranks"] != self.ranks:
            raise ValueError(f"ADMMScheduler.load_state_dict: saved ranks {meta['ranks']} differ from "
                             f"this scheduler's {self.ranks} (different model or config)")
        for kind in _KINDS:
            own = getattr(self, kind)
            missing = set(own) - set(state[kind])
            if missing:
                raise ValueError(f"ADMMScheduler.load_state_dict: no {kind} for {sorted(missing)}")
            for k in own:
                own[k] = state[kind][k].to(device=own[k].device, dtype=torch.float32).clone()
        self.rho = float(meta["rho"])
        self.steps, self.epochs, self.updates = int(meta["steps"]), int(meta["epochs"]), int(meta["updates"])
        self.update_seconds = float(meta.get("update_seconds", 0.0))

    def save(self, directory: str):
        """Write admm_state.safetensors (Z, U, Zprev) + admm_state.json (rho, counters, ranks)."""
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        tensors = {f"{kind}.{k}": v.detach().cpu().contiguous()
                   for kind in _KINDS for k, v in getattr(self, kind).items()}
        save_file(tensors, os.path.join(directory, STATE_TENSORS))
        with open(os.path.join(directory, STATE_JSON), "w") as f:
            json.dump(self._meta(), f, indent=1)

    def load(self, directory: str):
        from safetensors.torch import load_file
        path = os.path.join(directory, STATE_TENSORS)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ADMMScheduler.load: no {STATE_TENSORS} in {directory}")
        flat = load_file(path)
        state = {kind: {} for kind in _KINDS}
        for key, v in flat.items():
            kind, _, name = key.partition(".")
            state[kind][name] = v
        with open(os.path.join(directory, STATE_JSON)) as f:
            state["meta"] = json.load(f)
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
        d.update(ranks=ranks, compression_ratio=None, rel_error=None, target_modules=list(ranks))
        return TNConfig.from_dict(d)

    def compress(self, model: nn.Module | None = None, *, progress: bool = True):
        """Decompose the targets in place at the ADMM ranks (tn_hf.compress); returns its report."""
        from .convert import compress
        return compress(_unwrap(model) if model is not None else self.model, self.compress_config(),
                        progress=progress)

