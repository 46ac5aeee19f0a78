"""ADMMTTCallback: ADMM-TT training inside transformers.Trainer (drives tn_hf.admm.ADMMScheduler).

Events used (transformers >= 4.46 / 5.x):
* on_train_begin: build the scheduler from the model; when resuming (state.global_step > 0)
  load ``admm_state.safetensors`` + ``admm_state.json`` from ``checkpoint-{global_step}``.
* on_pre_optimizer_step: proximal gradient (after unscale/clip; once per real step, so
  gradient accumulation is respected).
* on_step_end: count the step, Z/U update on schedule; on_epoch_end: per-epoch update.
* on_log: admm_primal / admm_dual / admm_rho into the logs (and the log_history entry).
* on_save: ADMM state next to the Trainer checkpoint.
* on_train_end (after load_best_model_at_end): decompose in place (compress_at_end), so
  ``trainer.save_model()`` writes the compressed model.
"""
from __future__ import annotations

import os

from transformers import TrainerCallback

from ..admm import STATE_TENSORS, ADMMScheduler


class ADMMTTCallback(TrainerCallback):
    def __init__(self, config, *, rho: float = 1e-3, update_every="epoch", rho_schedule=None,
                 compress_at_end: bool = True):
        self.config = config
        self.rho = rho
        self.update_every = update_every
        self.rho_schedule = rho_schedule
        self.compress_at_end = compress_at_end
        self.sched: ADMMScheduler | None = None
        self.report = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("ADMMTTCallback.on_train_begin: the Trainer passed no model")
        self.sched = ADMMScheduler(model, self.config, rho=self.rho, update_every=self.update_every,
                                   rho_schedule=self.rho_schedule)
        if state.global_step > 0:
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            resume = getattr(args, "resume_from_checkpoint", None)
            for d in (resume, ckpt):
                if d and os.path.isfile(os.path.join(d, STATE_TENSORS)):
                    self.sched.load(d)
                    break
            else:
                raise FileNotFoundError(f"ADMMTTCallback: resuming at step {state.global_step} but no "
                                        f"{STATE_TENSORS} in {ckpt}; the ADMM state can't be restored")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.sched.prox_grad_()

    def on_step_end(self, args, state, control, **kwargs):
        self.sched.step()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.sched.epoch_end()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.sched is None or logs is None:
            return
        r = self.sched.residuals()
        extra = {"admm_primal": r["primal"], "admm_dual": r["dual"], "admm_rho": r["rho"]}
        logs.update(extra)
        if state.log_history and isinstance(state.log_history[-1], dict):
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        if self.sched is None or not state.is_world_process_zero:
            return
        self.sched.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.compress_at_end and self.sched is not None and model is not None:
            self.report = self.sched.compress(model, progress=state.is_world_process_zero)
            model.tn_hf_report = self.report
