"""ADMM-TT compression of a VideoMAE video classifier with the transformers Trainer.

Phases: ADMM-regularised training (Trainer(callbacks=[tn_hf.ADMMTTCallback(cfg, rho=...)]))
-> decompose (tn_hf.compress: the Linear layers of the encoder become TT/TR layers) ->
fine-tune (a second Trainer) -> evaluate -> trainer.save_model(<output-dir>/model) with the
model card and metrics -> optional --push-to-hub. The saved checkpoint loads with
`import tn_hf; AutoModelForVideoClassification.from_pretrained(dir)`.

Model: --model a Hub id (e.g. MCG-NJU/videomae-base-finetuned-kinetics, pretrained weights,
new classifier head for the data's labels) or, by default, a small VideoMAE built from a config
(--hidden-size, --layers), randomly initialised.

Data (offline): clips of real MNIST digits translating across the frame, label = the digit
(3 channels, --frames x --image-size^2); --max-train-clips limits the training set.

Defaults (ours): TT format, 3x parameter compression of the targeted Linear layers, rho=1e-3,
ADMM 5 epochs, fine-tune 3 epochs, AdamW lr 1e-3 (ADMM) / 5e-4 (fine-tune).

Example:
  python recipes/trainer_videomae.py --max-steps 3 --output-dir /tmp/videomae
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import _common as C  # noqa: I001  (recipes/ is on sys.path when the script runs)

import torch
import tn_hf


def clip_datasets(args):
    """MNIST-digit clips as lists of {"pixel_values": (T, 3, S, S), "labels": int}."""
    (xtr, ytr), (xte, yte) = C.moving_mnist_clips(args.frames, args.image_size)
    if args.max_train_clips:
        xtr, ytr = xtr[:args.max_train_clips], ytr[:args.max_train_clips]
    if args.max_eval_clips:
        xte, yte = xte[:args.max_eval_clips], yte[:args.max_eval_clips]

    class Clips(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x = ((x - C.MNIST_MEAN) / C.MNIST_STD)[:, :, None].expand(-1, -1, 3, -1, -1)
            self.y = y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"pixel_values": self.x[i], "labels": int(self.y[i])}

    return Clips(xtr, ytr), Clips(xte, yte)


def build_model(args, num_labels):
    from transformers import AutoModelForVideoClassification, VideoMAEConfig, VideoMAEForVideoClassification
    if args.model:
        return AutoModelForVideoClassification.from_pretrained(
            args.model, num_labels=num_labels, ignore_mismatched_sizes=True, num_frames=args.frames,
            image_size=args.image_size)
    cfg = VideoMAEConfig(image_size=args.image_size, patch_size=args.patch_size, num_channels=3,
                         num_frames=args.frames, tubelet_size=2, hidden_size=args.hidden_size,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden_size // 32),
                         intermediate_size=2 * args.hidden_size, num_labels=num_labels,
                         id2label={i: str(i) for i in range(num_labels)},
                         label2id={str(i): i for i in range(num_labels)})
    return VideoMAEForVideoClassification(cfg)


def compute_metrics(pred):
    logits, labels = pred.predictions, pred.label_ids
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def training_args(args, phase, epochs, lr):
    from transformers import TrainingArguments
    return TrainingArguments(
        output_dir=str(Path(args.output_dir) / "trainer" / phase), num_train_epochs=epochs,
        max_steps=args.max_steps or -1, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=lr, weight_decay=0.05,
        lr_scheduler_type="cosine", logging_steps=10, save_strategy="no",
        eval_strategy="no", report_to=[], seed=args.seed, disable_tqdm=False, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=C._Formatter)
    p.add_argument("--model", default=None, help="Hub id of a VideoMAE checkpoint (default: small config)")
    p.add_argument("--frames", type=int, default=4, help="frames per clip (multiple of 2: tubelet size)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-train-clips", type=int, default=None, help="limit the training clips (smoke runs)")
    p.add_argument("--max-eval-clips", type=int, default=None, help="limit the test clips (smoke runs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--format", choices=("tt", "tr"), default="tt")
    p.add_argument("--compression-ratio", type=float, default=3.0)
    p.add_argument("--rho", type=float, default=1e-3, help="ADMM penalty rho")
    p.add_argument("--update-every", default="epoch", help="ADMM Z/U update period: int steps or 'epoch'")
    p.add_argument("--admm-epochs", type=float, default=5)
    p.add_argument("--finetune-epochs", type=float, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--max-steps", type=int, default=None, help="smoke runs: optimizer steps per phase")
    p.add_argument("--output-dir", default="outputs/trainer_videomae")
    p.add_argument("--push-to-hub", default=None, metavar="REPO")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from transformers import Trainer, set_seed

    set_seed(args.seed)
    train, test = clip_datasets(args)
    model = build_model(args, num_labels=10)
    cfg = tn_hf.TNConfig(format=args.format, compression_ratio=args.compression_ratio, layer_types=["linear"])
    update_every = C.parse_update_every(args.update_every)
    out = Path(args.output_dir)
    metrics = {"recipe": "trainer_videomae", "dataset": "moving-mnist", "base_model": args.model,
               "tn_config": cfg.to_dict(), "rho": args.rho, "update_every": update_every, "phases": {}}

    # ---- ADMM-regularised training through the Trainer callback
    cb = tn_hf.ADMMTTCallback(cfg, rho=args.rho, update_every=update_every)
    trainer = Trainer(model=model, args=training_args(args, "admm", args.admm_epochs, args.lr),
                      train_dataset=train, eval_dataset=test, compute_metrics=compute_metrics, callbacks=[cb])
    trainer.train()
    metrics["phases"]["admm"] = trainer.evaluate()

    # ---- decompose (the callback may already have done it at train end)
    if getattr(model, "tn_hf_specs", None):
        report = getattr(cb, "report", None)
    else:
        report = tn_hf.compress(model, cfg)
    if report is not None:
        print(report)
        metrics["compression"] = report.to_dict()

    # ---- fine-tune the TT/TR model
    trainer = Trainer(model=model, args=training_args(args, "finetune", args.finetune_epochs, args.finetune_lr),
                      train_dataset=train, eval_dataset=test, compute_metrics=compute_metrics)
    metrics["phases"]["decomposed"] = trainer.evaluate()
    trainer.train()
    final = trainer.evaluate()
    metrics["phases"]["finetune"] = final
    metrics["final"] = {"top1": final["eval_accuracy"], "loss": final["eval_loss"]}
    metrics["params_compressed"] = C.n_params(model)

    # ---- save: trainer.save_model (config.json with the tn_hf quantization_config) + card + metrics
    if trainer.is_world_process_zero():
        model_dir = out / "model"
        trainer.save_model(str(model_dir))
        from tn_hf import cards
        cards.write_model_card(model, model_dir, report=report, library_name="transformers",
                               base_model=args.model, metrics={"accuracy": final["eval_accuracy"]},
                               dataset="moving-mnist (MNIST digits)")
        C.write_json(out / "metrics.json", metrics)
        if args.push_to_hub:
            print("pushed to", tn_hf.push_to_hub(model, args.push_to_hub))
    return metrics


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
