"""The ``tn-hf`` command: compress, inspect, push, demo.

User errors (unknown model, bad ratio, missing folder, missing optional extra, Hub refusals) end
with one line on stderr and exit status 2 (1 for network/permission failures), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import FORMATS
from .extras import MissingExtra

PROG = "tn-hf"
REPORT_NAME = "tn_hf_report.json"  # written next to every checkpoint with its model card


class UserError(Exception):
    """An error caused by the command's input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + message by default)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------- helpers
def _ratio(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratio must be a number > 1, got {text!r}") from None
    if not r > 1:
        raise argparse.ArgumentTypeError(f"--ratio must be > 1 (dense params / compressed params), got {text}")
    return r


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from e


def _looks_like_repo(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _download(repo_id: str, filenames: list[str]) -> Path:
    """Fetch files of a Hub repo into the cache; return the snapshot folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    folder = None
    for name in filenames:
        try:
            folder = Path(hf_hub_download(repo_id, name)).parent
        except RepositoryNotFoundError:
            raise UserError(f"{repo_id!r} is not a local folder and no Hub repo of that name was found") from None
        except (EntryNotFoundError, RevisionNotFoundError):
            raise UserError(f"Hub repo {repo_id!r} has no {name}") from None
    if folder is None:
        raise ValueError(f"_download({repo_id!r}): no file names given")
    return folder


def _load_folder(folder: Path, *, weights: bool = True):
    """A model from a local checkpoint folder: tn_hf checkpoint, timm folder or transformers folder;
    ``weights=False``: built from config.json alone (random weights)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{folder} has no config.json (not a timm / transformers / tn_hf checkpoint folder)")
    cfg = _read_json(cfg_path)
    if "tn_hf" in cfg or (cfg.get("quantization_config") or {}).get("quant_method") == "tn_hf":
        raise UserError(f"{folder} is already TN-compressed; compress its dense base model instead")
    if "architecture" in cfg:
        import timm
        if not weights:
            args = {"num_classes": cfg.get("num_classes"), **(cfg.get("model_args") or {})}
            return timm.create_model(cfg["architecture"], pretrained=False,
                                     pretrained_cfg_overlay=cfg.get("pretrained_cfg"), **args)
        return timm.create_model(f"local-dir:{folder}", pretrained=True)
    if "model_type" in cfg:
        import transformers

        from .hub import transformers_class
        cls = transformers_class(cfg)
        if not weights:
            config = transformers.AutoConfig.from_pretrained(str(folder))
            return cls(config) if cls is not None else transformers.AutoModel.from_config(config)
        return (cls or transformers.AutoModel).from_pretrained(str(folder))
    raise UserError(f"{cfg_path} has neither 'architecture' (timm) nor 'model_type' (transformers)")


def load_source(source: str, *, random_init: bool = False, weights: bool = True):
    """SOURCE -> (model, base_model_id or None). timm names load their pretrained weights unless
    ``random_init``; a failed download is a UserError with the ways out. ``weights=False``: nothing
    but the architecture is fetched (timm names and Hub ids get random weights; a local folder,
    with nothing to download, loads its own)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path), None
    import timm
    if timm.is_model(source):
        if random_init or not weights:
            return timm.create_model(source, pretrained=False), None
        try:
            model = timm.create_model(source, pretrained=True)
        except Exception as e:  # noqa: BLE001 - offline, no weights for this name, Hub errors
            raise UserError(f"cannot load pretrained weights for timm model {source!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); offline? pass a local checkpoint "
                            "folder, or --random-init to compress random weights (for trying things out)") from None
        hub_id = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
        return model, (f"timm/{hub_id}" if hub_id and "/" not in hub_id else hub_id) or None
    if path.exists():
        raise UserError(f"{source} is a file, not a model folder")
    if _looks_like_repo(source):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError
        try:
            patterns = ["*.json", "*.safetensors"] if weights else ["*.json"]
            folder = Path(snapshot_download(source, allow_patterns=patterns))
        except RepositoryNotFoundError:
            raise UserError(f"unknown model {source!r}: not a folder, not a timm model name, "
                            "and no Hub repo of that name") from None
        return _load_folder(folder, weights=weights), source
    hint = timm.list_models(f"*{source}*")[:5]
    raise UserError(f"unknown model {source!r}: not a folder, a timm model name or a Hub id 'org/name'"
                    + (f" (timm models like it: {', '.join(hint)})" if hint else ""))


# ----------------------------------------------------------------------------- inspect
def inspect_checkpoint(target: str):
    """The ``CompressionReport`` of a tn_hf checkpoint (folder or Hub id), from config.json and the
    safetensors header only (no weights read, no model built), with the errors and FLOPs of the
    report saved next to it (tn_hf_report.json, the model card's table) when there is one."""
    from .report import CompressionReport
    from .serialization import TNMetadata, read_header
    folder = Path(target).expanduser()
    header = None
    if not folder.is_dir():
        if folder.exists() or not _looks_like_repo(target):
            raise UserError(f"{target} is not a checkpoint folder or a Hub id 'org/name'")
        folder = _download(target, ["config.json"])
        header = _hub_header(target)
    for name in ("config.json",) + (("model.safetensors",) if header is None else ()):
        if not (folder / name).is_file():
            raise UserError(f"{folder} has no {name} (not a tn_hf checkpoint)")
    cfg = _read_json(folder / "config.json")
    block = cfg.get("tn_hf")
    qc = cfg.get("quantization_config")
    if block is None and isinstance(qc, dict) and qc.get("quant_method") == "tn_hf":
        block = qc
    if block is None:
        raise UserError(f"{folder / 'config.json'} has no TN metadata: not a tn_hf checkpoint")
    meta = TNMetadata.from_dict(block, str(folder / "config.json"))
    # the measured columns (error, FLOPs) come from the report saved with the model card
    report: Path | None = folder / REPORT_NAME
    if header is None:
        header = read_header(folder / "model.safetensors")
    else:
        report = _download_optional(target, REPORT_NAME)
    return CompressionReport.from_checkpoint(meta.specs, meta.config, header, saved=_saved_report(report))


def _download_optional(repo_id: str, name: str) -> Path | None:
    """A file of a Hub repo fetched into the cache, or None if the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    try:
        return Path(hf_hub_download(repo_id, name))
    except EntryNotFoundError:
        return None


def _saved_report(path: Path | None) -> dict | None:
    """The report saved next to a checkpoint (``tn_hf_report.json``), or None if absent or unreadable."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _hub_header(repo_id: str) -> dict:
    """{tensor: (dtype, shape)} of a Hub repo's safetensors weights, read with range requests (the
    header only, not the tensors)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import NotASafetensorsRepoError
    try:
        meta = HfApi().get_safetensors_metadata(repo_id)
    except NotASafetensorsRepoError:
        raise UserError(f"Hub repo {repo_id!r} has no model.safetensors") from None
    return {k: (t.dtype, tuple(t.shape)) for f in meta.files_metadata.values() for k, t in f.tensors.items()}


# ----------------------------------------------------------------------------- commands
def cmd_compress(args) -> int:
    from .config import TNConfig
    if args.out is None and not args.dry_run:
        raise UserError("--out is required (or --dry-run to print the plan only)")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    from .plans import Plan
    if (args.plan is None) == (args.ratio is None):
        raise UserError("give --ratio (plan now) or --plan FILE (a saved plan), not both")
    try:
        cfg = Plan.load(args.plan) if args.plan else TNConfig(
            format=args.format, compression_ratio=args.ratio, plan_for_speed=not args.no_speed_plan,
            allocation=args.allocation, budget=args.budget, target_modules=args.targets or None,
            exclude_modules=args.exclude or None)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None
    # a dry run plans on the architecture: no pretrained weights are downloaded for it
    random_weights = args.random_init or (args.dry_run and not Path(args.source).expanduser().is_dir())
    print(f"loading {args.source}" + (" (architecture only, random weights)" if random_weights else "") + " ...")
    model, base = load_source(args.source, random_init=args.random_init, weights=not args.dry_run)
    model.eval()
    from .convert import compress, preview
    from .targeting import plan, tune
    if not isinstance(cfg, Plan):
        print("tuning: timing each layer's forms on this machine ..." if args.tune else "planning ...")
        try:
            cfg = tune(model, cfg) if args.tune else plan(model, cfg)
        except ValueError as e:
            raise UserError(f"plan {args.source}: {e}") from None
    if args.save_plan:
        print(f"plan saved to {cfg.save(args.save_plan)}")
    try:
        report = preview(model, cfg) if args.dry_run else compress(model, cfg)
    except ValueError as e:
        raise UserError(f"compress {args.source}: {e}") from None
    print(report)
    if args.dry_run:
        note = "; planned on the architecture with random weights (no weights downloaded)" if random_weights else ""
        if random_weights and args.allocation == "global":
            note += ": the global allocation follows the weights' spectra, so the real weights may get other ranks"
        print(f"dry run: nothing decomposed or written{note}")
        return 0
    from .hub import save_pretrained
    save_pretrained(model, out, report=report, base_model=base, random_init=args.random_init)
    print(f"saved to {out}")
    return 0


def cmd_inspect(args) -> int:
    print(inspect_checkpoint(args.target))
    return 0


def cmd_push(args) -> int:
    folder = Path(args.dir)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    from .push import push_to_hub
    info = push_to_hub(folder, args.repo_id, private=args.private, token=args.token)
    print(f"pushed {folder} to {args.repo_id}: {info}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    kwargs = {"quick": args.quick, "format": args.format}
    if args.ratio is not None:
        kwargs["ratio"] = args.ratio
    if args.out is not None:
        kwargs["out_dir"] = args.out
    result = run_demo(**kwargs)
    out = Path(kwargs.get("out_dir", "outputs/demo"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_results.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    print(f"results written to {out / 'demo_results.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .config import ALLOCATIONS, BUDGETS
    p = _Parser(prog=PROG, description="Tensor-Train / Tensor-Ring compression for Hugging Face and timm models.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{compress,inspect,push,demo}",
                           parser_class=_Parser)

    c = sub.add_parser("compress", help="decompose a model's layers into TT/TR cores and save it with a card",
                       description="Load SOURCE (timm model name, local folder, or Hub id 'org/name'), "
                                   "replace its target layers by TT/TR layers at the given compression "
                                   "ratio, print the per-layer report and save the checkpoint + model card.")
    c.add_argument("source", metavar="SOURCE", help="timm model name, checkpoint folder, or Hub id")
    c.add_argument("--format", choices=FORMATS, default="tt",
                   help="tensor-network format (default tt)")
    c.add_argument("--ratio", type=_ratio, help="compression ratio of the target layers (> 1)")
    c.add_argument("--plan", metavar="FILE", help="a saved plan (JSON, from --save-plan or tn_hf.plan/tune(...).save)"
                                                  " instead of --ratio and the planning options")
    c.add_argument("--save-plan", metavar="FILE", help="write the plan used as JSON (reuse it with --plan)")
    c.add_argument("--tune", action="store_true",
                   help="time each layer's candidate forms on this machine (tn_hf.tune) instead of the "
                        "deterministic cost model; save the result with --save-plan to reuse it elsewhere")
    c.add_argument("--targets", nargs="+", help="module names or regexes to compress (default: all eligible)")
    c.add_argument("--exclude", nargs="+", help="module names or regexes to leave dense")
    c.add_argument("--random-init", action="store_true",
                   help="timm names: compress randomly initialised weights instead of the pretrained ones "
                        "(for trying things out; the model card says so)")
    c.add_argument("--pretrained", action="store_true", help=argparse.SUPPRESS)  # the default now
    c.add_argument("--no-speed-plan", action="store_true",
                   help="choose ranks by size alone; by default the reference cost model (from the layers' "
                        "shapes, the same on every machine) picks each layer's form and keeps dense the layers "
                        "it estimates not faster as TN")
    c.add_argument("--allocation", choices=ALLOCATIONS, default="global",
                   help="how the ratio's budget is spread over the layers: global (by weight spectra, within "
                        "--budget), uniform (every layer at the ratio in params) or time (the params budget where it "
                        "saves the most estimated time; needs the model's input size)")
    c.add_argument("--budget", choices=BUDGETS, default="auto",
                   help="what --ratio divides: auto (params, and FLOPs too where the input size is known, with "
                        "--allocation global and the speed plan), params, params+flops, flops, or latency "
                        "(estimated time per layer); tucker and bt: auto or params")
    c.add_argument("--dry-run", action="store_true",
                   help="print the per-layer plan (params, FLOPs, ranks) without decomposing or writing; timm "
                        "names and Hub ids are planned on their architecture (no weights downloaded)")
    c.add_argument("--out", help="output folder (only the checkpoint's files are written into it)")
    c.set_defaults(func=cmd_compress)

    i = sub.add_parser("inspect", help="per-layer table of a tn_hf checkpoint (folder or Hub id)",
                       description="Print per-layer TN params, ranks and totals from config.json and the "
                                   "safetensors header, without building the model; errors and FLOPs "
                                   "from the tn_hf_report.json saved with it.")
    i.add_argument("target", metavar="DIR_OR_REPO")
    i.set_defaults(func=cmd_inspect)

    u = sub.add_parser("push", help="upload a checkpoint folder to the Hub",
                       description="Create REPO_ID if needed and upload DIR (written by tn_hf.save_pretrained "
                                   "or `tn-hf compress`) in one commit.")
    u.add_argument("dir", metavar="DIR")
    u.add_argument("repo_id", metavar="REPO_ID")
    u.add_argument("--private", action="store_true", help="create the repo private")
    u.add_argument("--token", help="Hub token (default: HF_TOKEN / stored login)")
    u.set_defaults(func=cmd_push)

    d = sub.add_parser("demo", help="ADMM-TT demo on MNIST-5k with a small CNN",
                       description="Train a small CNN, compress it with ADMM-TT and report accuracy/size.")
    d.add_argument("--quick", action="store_true", help="a fast, small run")
    d.add_argument("--ratio", type=_ratio, default=None, help="compression ratio (> 1)")
    d.add_argument("--format", choices=("tt", "tr"), default="tt")
    d.add_argument("--out", default=None, help="output folder")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, ValueError, FileNotFoundError, MissingExtra) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (PermissionError, ConnectionError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - Hub HTTP errors are user-facing too
        from huggingface_hub.errors import HfHubHTTPError
        if not isinstance(e, HfHubHTTPError):
            raise
        print(f"{PROG} {args.command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
