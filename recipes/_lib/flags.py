"""Command-line flags shared by the recipes.

``make_parser(description, defaults)`` builds the parser; ``defaults`` holds each recipe's own
setting (the paper's where there is one). Recipes add their model flags on top.
"""
from __future__ import annotations

import argparse

import tn_hf


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the recipe docstring's line breaks."""


def make_parser(description: str, *, defaults: dict, sgd_loop: bool = True) -> argparse.ArgumentParser:
    """Flags for data, compression (``tn_hf.TNConfig``), the schedule and the output.

    ``sgd_loop=False`` leaves out what only the Accelerate SGD loop of ``_lib.loop`` uses
    (``--data-dir``, ``--dense-epochs``, ``--momentum``, ``--checkpoint``, ``--resume``,
    ``--save-every``), for recipes that train with the transformers Trainer.
    """
    d = defaults
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.get("dataset", "mnist-5k"), help=d["dataset_help"])
    if sgd_loop:
        g.add_argument("--data-dir", default=None, help="local dataset folder (see --dataset)")
    p.image_sizes = {"mnist-5k": d.get("mnist_image_size", 32), None: d.get("image_size", 224)}
    g.add_argument("--image-size", type=int, default=None,
                   help=f"input resolution (default: {p.image_sizes[None]}; "
                        f"{p.image_sizes['mnist-5k']} with --dataset mnist-5k)")
    g.add_argument("--batch-size", type=int, default=d.get("batch_size", 128), help="per-process batch size")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")

    g = p.add_argument_group("compression (tn_hf.TNConfig)")
    g.add_argument("--format", choices=("tt", "tr"), default="tt", help="tensor format")
    g.add_argument("--compression-ratio", type=float, default=d["compression_ratio"],
                   help="dense / compressed size of the targeted layers (measured in --budget)")
    g.add_argument("--budget", choices=("params", "flops"), default=d.get("budget"),
                   help="what --compression-ratio counts (default: TNConfig's)")
    g.add_argument("--no-speed-plan", action="store_true",
                   help="choose ranks by size alone; by default the reference cost model (from the layers' "
                        "shapes, the same on every machine) keeps dense the layers it estimates not faster as TN")
    g.add_argument("--plan", metavar="FILE", default=None,
                   help="a saved tn_hf plan (JSON from tn_hf.plan/tn_hf.tune(...).save or tn-hf compress "
                        "--save-plan): ADMM trains for exactly its ranks; the compression flags are then unused")
    g.add_argument("--rho", type=float, default=d.get("rho", 1e-3), help="ADMM penalty rho")
    g.add_argument("--update-every", type=update_every, default=d.get("update_every", "epoch"),
                   help="ADMM Z/U update period: an int (optimizer steps) or 'epoch'")

    g = p.add_argument_group("schedule (epochs per phase)")
    if sgd_loop:
        g.add_argument("--dense-epochs", type=float, default=d.get("dense_epochs", 0),
                       help="dense warm start (skipped with --pretrained/--checkpoint/--resume)")
    g.add_argument("--admm-epochs", type=float, default=d["admm_epochs"], help="ADMM-regularised training")
    g.add_argument("--finetune-epochs", type=float, default=d["finetune_epochs"],
                   help="fine-tuning of the decomposed (TT/TR) model")
    g.add_argument("--lr", type=float, default=d.get("lr", 0.1), help="learning rate (dense, ADMM)")
    g.add_argument("--finetune-lr", type=float, default=d.get("finetune_lr", 0.01), help="fine-tune learning rate")
    if sgd_loop:
        g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.get("weight_decay", 5e-4))
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--max-steps", type=int, default=None,
                   help="smoke runs: at most this many optimizer steps per phase and eval batches")

    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--output-dir", default=d["output_dir"],
                   help="gets metrics.json and model/ (the compressed checkpoint with its model card)")
    if sgd_loop:
        g.add_argument("--checkpoint", default=None, help="dense safetensors file to start from (skips warm start)")
        g.add_argument("--resume", default=None, help="<output-dir>/checkpoints/admm of an interrupted run: "
                                                      "resume its ADMM phase")
        g.add_argument("--save-every", type=int, default=0, help="save ADMM state every N steps (0: phase end only)")
    g.add_argument("--push-to-hub", default=None, metavar="REPO", help="push the compressed model to this Hub repo")
    g.add_argument("--seed", type=int, default=0)
    return p


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``; an unset ``--image-size`` gets the dataset's default (MNIST-5k: small)."""
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = parser.image_sizes.get(args.dataset, parser.image_sizes[None])
    return args


def update_every(value: str):
    """``--update-every``: 'epoch' or a positive int."""
    if value == "epoch":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give a positive int or 'epoch'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: must be >= 1")
    return n


def tn_config(args, **extra) -> tn_hf.TNConfig | tn_hf.Plan:
    """The recipe's ``tn_hf.Plan`` from ``--plan FILE``, else its ``tn_hf.TNConfig`` from the compression
    flags (+ e.g. ``layer_types``), planned by the scheduler with ``tn_hf.plan``."""
    if args.plan:
        return tn_hf.Plan.load(args.plan)
    budget = {"budget": args.budget} if args.budget else {}
    return tn_hf.TNConfig(format=args.format, compression_ratio=args.compression_ratio,
                          plan_for_speed=not args.no_speed_plan, **budget, **extra)
