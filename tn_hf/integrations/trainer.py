"""ADMMTTCallback: ADMM-TT training inside transformers.Trainer (drives tn_hf.admm.ADMMScheduler).

Defaults: the scheduler's automatic schedule over the run's ``state.max_steps`` (prox W-step,
rho geometric from 1/T to 10, Z/U every T/50 steps); an explicit ``rho`` with
``update_every="epoch"`` gives the paper's per-epoch setting (gradient W-step, see tn_hf.admm).

Events used (transformers >= 4.46 / 5.x):
* on_train_begin: place this callback right after the Trainer's flow callback, so that the ADMM
  metrics it adds in on_log reach every ``report_to`` logger; build the scheduler from the model.
  When resuming (``state.global_step > 0``): the state comes from the checkpoint being resumed
  (the directory passed to ``train(resume_from_checkpoint=...)``; its ``trainer_state.json``
  names the state's tag, which must match), the ranks from that state, not from a new allocation.
* on_pre_optimizer_step: proximal gradient (``w_step="grad"``; after unscale/clip, once per real
  step, so gradient accumulation is respected).
* on_step_end: prox W-step, rho schedule and Z/U update on schedule (per-epoch updates happen at
  the epoch's last step, so a checkpoint saved there already holds them). When the Trainer is
  about to save, the ADMM state is written first, atomically, into the checkpoint folder: a
  checkpoint the Trainer completes (and keeps through ``save_total_limit`` rotation) always has it.
* on_log: admm_primal / admm_dual / admm_rho into the logs (and the log_history entry).
* on_save: writes the state if the pre-save hook did not (saves decided after evaluation).
* on_train_end (after load_best_model_at_end): decompose in place at the ADMM ranks
  (compress_at_end), so ``trainer.save_model()`` writes the compressed model; from then on it also
  writes the model card (README.md, compression.png) and tn_hf_report.json, as
  ``tn_hf.save_pretrained`` does (Trainer has no save event of its own: the running Trainer's
  ``save_model`` is wrapped).
"""
from __future__ import annotations

import functools
import math
import os
import sys
import uuid
from types import FrameType

from transformers import TrainerCallback

from ..admm import STATE_TENSORS, ADMMScheduler
from ..plans import as_plan_or_config

RECORD = "tn_hf_admm"  # key in TrainerState.stateful_callbacks: tag of the ADMM state of this checkpoint


def _frames(limit: int = 12):
    f: FrameType | None = sys._getframe(2)
    while f is not None and limit:
        yield f
        f, limit = f.f_back, limit - 1


def _calling_handler():
    """The Trainer's CallbackHandler dispatching the current event (None if not found)."""
    return next((f.f_locals["self"] for f in _frames() if type(f.f_locals.get("self")).__name__ == "CallbackHandler"),
                None)


def _calling_trainer():
    """The ``transformers.Trainer`` running the current event (None if not found)."""
    from transformers import Trainer
    return next((f.f_locals["self"] for f in _frames() if isinstance(f.f_locals.get("self"), Trainer)), None)


def _card_on_save_model(trainer) -> None:
    """Make ``trainer.save_model(dir)`` also write the model card (README.md, compression.png) and
    tn_hf_report.json, as ``tn_hf.save_pretrained`` does, once the model is TN-compressed."""
    save_model = trainer.save_model
    if getattr(save_model, "_tn_hf", False):
        return

    @functools.wraps(save_model)
    def with_card(output_dir: str | None = None, _internal_call: bool = False) -> None:
        save_model(output_dir, _internal_call)
        model = trainer.model
        if trainer.args.should_save and getattr(model, "tn_hf_specs", None):
            from ..cards import write_model_card
            from ..hub import _kind
            kind = _kind(model)
            write_model_card(model, output_dir or trainer.args.output_dir, report=getattr(model, "tn_hf_report", None),
                             library_name="pytorch" if kind == "torch" else kind)

    setattr(with_card, "_tn_hf", True)
    trainer.save_model = with_card


def _resume_argument():
    """``resume_from_checkpoint`` as resolved by the running ``Trainer.train`` (None if not found)."""
    for f in _frames():
        if f.f_code.co_name in ("_inner_training_loop", "train") and "resume_from_checkpoint" in f.f_locals:
            v = f.f_locals["resume_from_checkpoint"]
            return v if isinstance(v, str) else None
    return None


class ADMMTTCallback(TrainerCallback):
    def __init__(self, config, *, rho: float | None = None, update_every=None, rho_schedule=None,
                 w_step: str | None = None, compress_at_end: bool = True, progress: bool | None = None):
        """``config``: a ``tn_hf.Plan`` (trained for and decomposed at exactly its ranks) or a ``TNConfig``
        (planned with ``tn_hf.plan`` when training begins); the other arguments go to ``ADMMScheduler``."""
        self.config = as_plan_or_config(config)
        self.rho = rho
        self.update_every = update_every
        self.rho_schedule = rho_schedule
        self.w_step = w_step
        self.compress_at_end = compress_at_end
        self.progress = progress
        self.sched: ADMMScheduler | None = None
        self.report = None
        self._saved_step = None

    # ------------------------------------------------------------------ set-up
    def _move_after_flow(self):
        handler = _calling_handler()
        cbs = getattr(handler, "callbacks", None)
        if not isinstance(cbs, list) or self not in cbs:
            return
        rest = [c for c in cbs if c is not self]
        flow = [i for i, c in enumerate(rest) if type(c).__name__ == "DefaultFlowCallback"]
        at = flow[0] + 1 if flow else 0
        handler.callbacks = rest[:at] + [self] + rest[at:]  # a new list: the running loop is unaffected

    def _resume_dir(self, args, state) -> str:
        record = (state.stateful_callbacks or {}).get(RECORD) if isinstance(state.stateful_callbacks, dict) else None
        cands = [_resume_argument(), getattr(args, "resume_from_checkpoint", None),
                 os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        seen = []
        for d in cands:
            if not d or d in seen:
                continue
            seen.append(d)
            meta = ADMMScheduler.read_meta(d)
            if meta is None or int(meta["steps"]) != state.global_step:
                continue
            if isinstance(record, dict) and record.get("tag") is not None and meta.get("tag") != record["tag"]:
                continue  # another run's state
            return d
        raise FileNotFoundError(f"ADMMTTCallback: resuming at step {state.global_step} but none of {seen} holds "
                                f"this checkpoint's ADMM state ({STATE_TENSORS} of step {state.global_step}"
                                + (f", tag {record.get('tag')}" if isinstance(record, dict) else "")
                                + "); the ADMM state can't be restored")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("ADMMTTCallback.on_train_begin: the Trainer passed no model")
        self._move_after_flow()
        progress = self.progress if self.progress is not None else \
            (not args.disable_tqdm and state.is_world_process_zero)
        src, ranks = None, None
        if state.global_step > 0:
            src = self._resume_dir(args, state)
            meta = ADMMScheduler.read_meta(src)
            assert meta is not None  # _resume_dir returns a folder whose ADMM state it read
            ranks = meta["ranks"]
        self.sched = ADMMScheduler(model, self.config, total_steps=state.max_steps or None, rho=self.rho,
                                   update_every=self.update_every, rho_schedule=self.rho_schedule,
                                   w_step=self.w_step, ranks=ranks, progress=progress)
        if src is not None:
            self.sched.load(src)
        self._saved_step = None

    # ------------------------------------------------------------------ training
    def _running(self) -> ADMMScheduler:
        if self.sched is None:
            raise RuntimeError("ADMMTTCallback: a training event came before on_train_begin (no ADMM state yet)")
        return self.sched

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._running().prox_grad_()

    def on_step_end(self, args, state, control, **kwargs):
        sched = self._running()
        sched.step()
        if state.epoch is not None and float(state.epoch).is_integer() and sched.epochs < int(state.epoch):
            sched.epoch_end()  # the epoch's last step: per-epoch update before any save of this step
        if control.should_save:
            self._save(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        sched = self._running()
        if sched.epochs < math.ceil(state.epoch or 0):  # an epoch cut short by max_steps
            sched.epoch_end()
        if control.should_save:
            self._save(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.sched is None or logs is None:
            return
        r = self.sched.residuals()
        extra = {"admm_primal": r["primal"], "admm_dual": r["dual"], "admm_rho": r["rho"]}
        logs.update(extra)
        if state.log_history and isinstance(state.log_history[-1], dict):
            state.log_history[-1].update(extra)

    def _save(self, args, state):
        if self.sched is None or self._saved_step == state.global_step:
            return
        self._saved_step = state.global_step
        tag = uuid.uuid4().hex
        if isinstance(state.stateful_callbacks, dict):  # saved in this checkpoint's trainer_state.json
            state.stateful_callbacks[RECORD] = {"tag": tag, "step": state.global_step}
        if state.is_world_process_zero:
            self.sched.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), tag=tag)

    def on_save(self, args, state, control, **kwargs):
        self._save(args, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.compress_at_end and self.sched is not None and model is not None:
            progress = self.progress if self.progress is not None else \
                (not args.disable_tqdm and state.is_world_process_zero)
            self.report = self.sched.compress(model, progress=progress)
            model.tn_hf_report = self.report
            trainer = _calling_trainer()
            if trainer is not None:
                _card_on_save_model(trainer)
