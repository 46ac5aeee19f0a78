"""ADMM-TT compression of a VideoMAE video classifier with the transformers Trainer.

Phases: data -> model -> ADMM-regularised training (Trainer(callbacks=[tn_hf.ADMMTTCallback(cfg,
rho=...)])) -> decompose (the Linear layers of the encoder become TT/TR layers at the ranks ADMM
trained for) -> fine-tune (a second Trainer) -> evaluate -> save (tn_hf.save_pretrained: the
transformers layout with the tn_hf quantization_config, model card, metrics.json) -> optional
--push-to-hub. The saved checkpoint loads with
`import tn_hf; AutoModelForVideoClassification.from_pretrained(dir)`.

Model: --model a Hub id (e.g. MCG-NJU/videomae-base-finetuned-kinetics, pretrained weights,
new classifier head for the data's labels) or, by default, a small VideoMAE built from a config
(--hidden-size, --layers), randomly initialised.

Data (offline): --dataset mnist-5k, clips of the real MNIST-5k digits moving across the frame,
label = the digit (3 channels, --frames x --image-size^2).

Defaults (ours): TT format, 3x parameter compression of the targeted Linear layers, rho=1e-3,
ADMM 5 epochs, fine-tune 3 epochs, AdamW lr 1e-3 (ADMM) / 5e-4 (fine-tune), cosine schedule.

Examples:
  python recipes/trainer_videomae.py --dataset mnist-5k --max-steps 3 --output-dir /tmp/videomae
  accelerate launch recipes/trainer_videomae.py --model MCG-NJU/videomae-base-finetuned-kinetics
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from _lib import data, flags, loop, models, output  # noqa: I001  (recipes/ is on sys.path when the script runs)

import tn_hf  # after _lib: it puts a source checkout on sys.path

DEFAULTS = dict(dataset="mnist-5k", image_size=32, batch_size=32, compression_ratio=3.0, budget="params",
                rho=1e-3, update_every="epoch", admm_epochs=5, finetune_epochs=3, lr=1e-3, finetune_lr=5e-4,
                weight_decay=0.05, output_dir="outputs/trainer_videomae",
                dataset_help="'mnist-5k' (offline: clips of real MNIST digits moving across the frame)")


def parse_args(argv=None):
    p = flags.make_parser(__doc__, defaults=DEFAULTS, sgd_loop=False)
    p.add_argument("--model", default=None, help="Hub id of a VideoMAE checkpoint (default: small config)")
    p.add_argument("--frames", type=int, default=4, help="frames per clip (multiple of 2: tubelet size)")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    args = flags.parse(p, argv)
    if args.dataset != "mnist-5k":
        raise SystemExit(f"--dataset {args.dataset!r}: valid choices are mnist-5k")
    return args


def clip_data(args):
    """MNIST-5k clips ``(T, 3, S, S)``; with --max-steps the test set is cut to that many batches."""
    train, test, num_classes = data.mnist_clips(args.frames, args.image_size, channels=3)
    if args.max_steps:
        test = torch.utils.data.Subset(test, range(min(len(test), args.max_steps * args.batch_size)))
    return train, test, num_classes


def collate(batch):
    """``(clip, label)`` pairs -> the VideoMAE batch dict."""
    clips, labels = zip(*batch)
    return {"pixel_values": torch.stack(clips), "labels": torch.stack(labels)}


def compute_metrics(pred):
    hit1, hit5 = loop.top_k_hits(torch.as_tensor(pred.predictions), torch.as_tensor(pred.label_ids))
    return {"top1": hit1.float().mean().item(), "top5": hit5.float().mean().item()}


def trainer(args, model, train, test, *, phase: str, epochs: float, lr: float, callbacks=()):
    from transformers import Trainer, TrainingArguments
    targs = TrainingArguments(
        output_dir=str(Path(args.output_dir) / "trainer" / phase), num_train_epochs=epochs,
        max_steps=args.max_steps or -1, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=lr, weight_decay=args.weight_decay, lr_scheduler_type="cosine", logging_steps=10,
        save_strategy="no", eval_strategy="no", report_to=[], seed=args.seed,
        dataloader_num_workers=args.num_workers, use_cpu=not torch.cuda.is_available())
    return Trainer(model=model, args=targs, train_dataset=train, eval_dataset=test, data_collator=collate,
                   compute_metrics=compute_metrics, callbacks=list(callbacks))


def train(t, metrics: dict, phase: str) -> dict:
    """``t.train()``; its steps and loss go to ``metrics["phases"][phase]``."""
    out = t.train()
    metrics["phases"][phase] = {"steps": out.global_step, "train_loss": out.training_loss}
    return metrics["phases"][phase]


def evaluate(t, metrics: dict, phase: str) -> dict:
    """``t.evaluate()`` as ``{"top1", "top5", "loss", "n"}``, added to ``metrics["phases"][phase]``."""
    ev = t.evaluate()
    ev = {"top1": ev["eval_top1"], "top5": ev["eval_top5"], "loss": ev["eval_loss"], "n": len(t.eval_dataset)}
    metrics["phases"].setdefault(phase, {}).update(ev)
    print(f"{phase}:", metrics["phases"][phase])
    return ev


def main(argv=None):
    args = parse_args(argv)
    from transformers import set_seed

    set_seed(args.seed)
    train_set, test_set, num_classes = clip_data(args)
    model = models.videomae(args.model, num_labels=num_classes, frames=args.frames, image_size=args.image_size,
                            patch_size=args.patch_size, hidden_size=args.hidden_size, layers=args.layers)
    cfg = flags.tn_config(args, layer_types=["linear"])
    metrics = {"recipe": "trainer_videomae", "dataset": args.dataset, "model": args.model or "videomae (small)",
               "base_model": args.model, "tn_config": cfg.to_dict(), "rho": args.rho,
               "update_every": args.update_every, "phases": {}}

    # ADMM-regularised training through the Trainer callback (decomposition is the next, explicit phase)
    cb = tn_hf.ADMMTTCallback(cfg, rho=args.rho, update_every=args.update_every, compress_at_end=False)
    t = trainer(args, model, train_set, test_set, phase="admm", epochs=args.admm_epochs, lr=args.lr, callbacks=[cb])
    print("admm: planning the ranks of the targeted layers, then ADMM training ...")
    train(t, metrics, "admm")
    evaluate(t, metrics, "admm")

    # decompose at the ranks ADMM trained for
    print("decomposing at the ranks ADMM trained for ...")
    report = cb.sched.compress(model, progress=t.is_world_process_zero())
    print(report)
    metrics.update(output.compression_metrics(report))

    # fine-tune the TT/TR model, evaluate
    t = trainer(args, model, train_set, test_set, phase="finetune", epochs=args.finetune_epochs,
                lr=args.finetune_lr)
    evaluate(t, metrics, "decomposed")
    train(t, metrics, "finetune")
    metrics["final"] = evaluate(t, metrics, "final")

    # save: transformers layout + model card + metrics.json (+ push)
    if t.is_world_process_zero():
        output.save_run(model, args.output_dir, metrics, report=report, push_to_hub=args.push_to_hub)
    return metrics


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
