"""The Accelerate training run of the recipes, one method per phase.

``Run(args, train, test, ...)`` holds the Accelerator, the data loaders and the metrics; a
recipe's ``main()`` calls the phases in order::

    run.warm_start(model)              # dense: --checkpoint, or --dense-epochs of SGD
    sched = run.admm(model, cfg)       # ADMM-regularised SGD (tn_hf.ADMMScheduler)
    report = run.decompose(model, sched)   # TT/TR layers at the ranks ADMM trained for
    run.finetune(model)                # SGD on the cores
    run.evaluate(model)                # final top-1/top-5/loss
    run.save(model, report)            # metrics.json + model/ (+ --push-to-hub)

ADMM (Yin et al., CVPR 2021) minimises ``loss(W) + rho/2 ||W - Z + U||^2`` over the dense
weights W by SGD (the proximal gradient ``rho (W - Z + U)`` is added before each optimizer step),
with ``Z = Proj_rank(W + U)`` and ``U <- U + W - Z`` every ``--update-every`` steps or epoch.
Every training phase uses SGD with momentum and a cosine learning rate over the phase; under DDP
the phases re-wrap the same module, so all processes hold identical weights and ADMM state.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

import tn_hf

from .output import compression_metrics, save_run, write_json


def train_steps(accelerator, model, loader, optimizer, *, n_steps: int, desc: str, sched=None,
                start_step: int = 0, on_step=None) -> float:
    """SGD for ``n_steps`` optimizer steps (counting from ``start_step``, resumable mid-epoch).

    With an ADMM scheduler: ``if sync_gradients: sched.prox_grad_(); optimizer.step(); sched.step()``
    and ``sched.epoch_end()`` after each pass over the data. Returns the mean loss of the last 50 steps.
    """
    total = max(n_steps, 1)  # cosine decay over the phase, resumable at start_step
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s + start_step, total) / total)))
    step, losses = start_step, []
    bar = tqdm(total=n_steps, initial=start_step, desc=desc, disable=not accelerator.is_local_main_process)
    model.train()
    skip = (start_step * accelerator.gradient_accumulation_steps) % max(len(loader), 1)
    while step < n_steps:
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for x, y in batches:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients and sched is not None:
                    sched.prox_grad_()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if sched is not None:
                sched.step()
            lr_sched.step()
            step += 1
            losses = (losses + [loss.item()])[-50:]
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_step is not None:
                on_step(step)
            if step >= n_steps:
                break
        else:
            if sched is not None:
                sched.epoch_end()
    bar.close()
    return sum(losses) / max(len(losses), 1)


def top_k_hits(logits: torch.Tensor, labels: torch.Tensor, k: int = 5):
    """Boolean ``(top-1 hit, top-k hit)`` per sample."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return top[:, 0] == labels, (top == labels[:, None]).any(1)


@torch.no_grad()
def accuracy(accelerator, model, loader, *, max_batches: int | None = None) -> dict:
    """Top-1 / top-5 accuracy and mean loss over the (gathered, de-duplicated) test set."""
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with accelerator.autocast():
            logits = model(x)
        logits, y = accelerator.gather_for_metrics((logits, y))
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        hit1, hit5 = top_k_hits(logits, y)
        correct1 += hit1.sum().item()
        correct5 += hit5.sum().item()
        total += len(y)
    model.train()
    total = max(total, 1)
    return {"top1": correct1 / total, "top5": correct5 / total, "loss": loss_sum / total, "n": total}


class Run:
    """One recipe run: Accelerator, loaders, metrics (``run.metrics``, written by ``save``).

    Args:
        args: the parsed flags of ``_lib.flags.make_parser``.
        train, test: map-style datasets of ``(input, label)``.
        recipe: recipe name (metrics.json).
        model_name: architecture name (metrics.json).
        base_model: Hub id of the starting weights, or None (model card).
    """

    def __init__(self, args, train, test, *, recipe: str, model_name: str, base_model: str | None = None):
        self.args, self.t0 = args, time.time()
        self.accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum)
        set_seed(args.seed)
        loader = lambda ds, train: torch.utils.data.DataLoader(  # noqa: E731
            ds, batch_size=args.batch_size, shuffle=train, num_workers=args.num_workers, drop_last=train)
        self.train_loader, self.test_loader = self.accelerator.prepare(loader(train, True), loader(test, False))
        self.metrics = {"recipe": recipe, "dataset": args.dataset, "model": model_name, "base_model": base_model,
                        "world_size": self.accelerator.num_processes, "rho": args.rho,
                        "update_every": args.update_every, "phases": {}}
        self.print = self.accelerator.print
        self.print(f"{recipe}: {model_name} on {args.dataset}, {self.accelerator.num_processes} process(es) on "
                   f"{self.accelerator.device}; output in {args.output_dir}")

    # ------------------------------------------------------------------ helpers
    def _sgd(self, model, lr):
        a = self.args
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=a.momentum, weight_decay=a.weight_decay)

    def _steps(self, epochs: float, loader) -> int:
        steps = math.ceil(epochs * len(loader) / self.args.grad_accum)
        return min(steps, self.args.max_steps) if self.args.max_steps else steps

    def _record(self, phase: str, model, **extra) -> dict:
        """Evaluate (``--max-steps`` batches at most) and store the phase's metrics; every process
        runs its own (unwrapped) copy of the model on its shard of the test set."""
        model = self.accelerator.unwrap_model(model).to(self.accelerator.device)
        ev = accuracy(self.accelerator, model, self.test_loader, max_batches=self.args.max_steps)
        self.metrics["phases"][phase] = {**extra, **ev}
        self.print(f"{phase}:", {k: v for k, v in self.metrics["phases"][phase].items() if k != "residuals"})
        return ev

    def _sgd_phase(self, model, *, phase: str, epochs: float, lr: float, evaluate: bool = True) -> dict:
        acc = self.accelerator
        prepared, opt = acc.prepare(model, self._sgd(model, lr))
        n = self._steps(epochs, self.train_loader)
        loss = train_steps(acc, prepared, self.train_loader, opt, n_steps=n, desc=phase)
        if evaluate:
            self._record(phase, prepared, steps=n, train_loss=loss)
        else:
            self.metrics["phases"][phase] = {"steps": n, "train_loss": loss}
        acc.free_memory()
        return self.metrics["phases"][phase]

    # ------------------------------------------------------------------ phases
    def warm_start(self, model, *, pretrained: bool = False) -> dict:
        """Dense phase: load ``--checkpoint`` (safetensors), or train ``--dense-epochs`` unless the
        weights are pretrained or the run resumes; then evaluate."""
        a = self.args
        if a.checkpoint:
            model.load_state_dict(load_file(a.checkpoint))
            self.print(f"loaded dense weights from {a.checkpoint}")
        if a.dense_epochs > 0 and not (a.checkpoint or a.resume or pretrained):
            return self._sgd_phase(model, phase="dense", epochs=a.dense_epochs, lr=a.lr)
        self.print("dense: evaluating the starting weights ...")
        return self._record("dense", model, steps=0)

    def admm(self, model, cfg: tn_hf.TNConfig):
        """ADMM-regularised training of the dense model towards the ranks ``cfg`` plans; saves its
        state (``accelerator.save_state``) to ``<output-dir>/checkpoints/admm`` at the end and every
        ``--save-every`` steps; ``--resume`` continues from such a folder. Returns the scheduler."""
        a, acc = self.args, self.accelerator
        ckpt_dir = Path(a.output_dir) / "checkpoints" / "admm"
        start = 0
        if a.resume:  # ranks are planned from the weights: reuse the plan the interrupted run trained for
            progress = Path(a.resume) / "progress.json"
            if not progress.is_file():
                raise SystemExit(f"--resume {a.resume}: no progress.json (not a checkpoint of this recipe)")
            state = json.loads(progress.read_text())
            cfg = tn_hf.Plan.from_dict(state["admm_plan"]) if "admm_plan" in state else \
                tn_hf.TNConfig.from_dict(state["admm_config"])
            start = int(state["step"])
        self.metrics["tn_config"] = cfg.to_dict()
        prepared, opt = acc.prepare(model, self._sgd(model, a.lr))
        self.print("admm: planning the ranks of the targeted layers ...")
        sched = tn_hf.ADMMScheduler(acc.unwrap_model(prepared), cfg, rho=a.rho, update_every=a.update_every)
        acc.register_for_checkpointing(sched)
        n = self._steps(a.admm_epochs, self.train_loader)
        if a.resume:
            acc.load_state(a.resume)
            self.print(f"resumed ADMM at step {start}/{n} from {a.resume}")

        def save_state(step):
            acc.save_state(str(ckpt_dir))
            if acc.is_main_process:
                write_json(ckpt_dir / "progress.json", {"phase": "admm", "step": step, "of": n,
                                                        "admm_plan": sched.plan.to_dict()})
            acc.wait_for_everyone()

        on_step = (lambda s: s % a.save_every == 0 and s < n and save_state(s)) if a.save_every else None
        loss = train_steps(acc, prepared, self.train_loader, opt, n_steps=n, desc="admm", sched=sched,
                           start_step=min(start, n), on_step=on_step)
        save_state(n)
        res = sched.residuals()  # {"primal", "dual", "rho", "layers": {name: {...}}}
        self._record("admm", prepared, steps=n, train_loss=loss, residuals=res)
        self.print("primal/dual residual:", res["primal"], res["dual"])
        acc.free_memory()
        acc._custom_objects.clear()  # the scheduler belongs to the ADMM phase only
        return sched

    def decompose(self, model, sched) -> tn_hf.CompressionReport:
        """Swap the targeted layers for TT/TR layers (TT-SVD/TR-SVD at the ADMM ranks, identical on
        every process) and evaluate the decomposed model before fine-tuning."""
        self.print("decomposing at the ranks ADMM trained for ...")
        report = sched.compress(model, progress=self.accelerator.is_local_main_process)
        self.print(report)
        self.metrics.update(compression_metrics(report))
        self._record("decomposed", model)
        return report

    def finetune(self, model) -> dict:
        """SGD on the TT/TR model (DDP re-wrap broadcasts process 0's cores); ``evaluate`` follows."""
        return self._sgd_phase(model, phase="finetune", epochs=self.args.finetune_epochs,
                               lr=self.args.finetune_lr, evaluate=False)

    def evaluate(self, model) -> dict:
        """Final top-1/top-5/loss of ``model`` on the test set (``metrics["final"]``)."""
        self.metrics["final"] = self._record("final", model)
        return self.metrics["final"]

    def save(self, model, report=None) -> dict:
        """Main process: ``<output-dir>/model`` + ``metrics.json`` (+ ``--push-to-hub``). Returns the metrics."""
        acc = self.accelerator
        self.metrics["time_s"] = time.time() - self.t0
        self.print(f"saving to {Path(self.args.output_dir) / 'model'} ...")
        if acc.is_main_process:
            save_run(acc.unwrap_model(model), self.args.output_dir, self.metrics, report=report,
                     push_to_hub=self.args.push_to_hub)
        acc.wait_for_everyone()
        acc.end_training()
        return self.metrics
