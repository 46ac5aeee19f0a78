"""The ``tn-hf`` command: compress, inspect, push, demo.

User errors (unknown model, bad ratio, missing folder, Hub refusals) end with one line on stderr
and exit status 2 (1 for network/permission failures), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

PROG = "tn-hf"


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
    return folder


def _load_folder(folder: Path):
    """A model from a local checkpoint folder: tn_hf checkpoint, timm folder or transformers folder."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{folder} has no config.json (not a timm / transformers / tn_hf checkpoint folder)")
    cfg = _read_json(cfg_path)
    if "tn_hf" in cfg or (cfg.get("quantization_config") or {}).get("quant_method") == "tn_hf":
        raise UserError(f"{folder} is already TN-compressed; compress its dense base model instead")
    if "architecture" in cfg:
        import timm
        return timm.create_model(f"local-dir:{folder}", pretrained=True)
    if "model_type" in cfg:
        import transformers
        archs = cfg.get("architectures") or []
        cls = getattr(transformers, archs[0], None) if archs else None
        return (cls or transformers.AutoModel).from_pretrained(str(folder))
    raise UserError(f"{cfg_path} has neither 'architecture' (timm) nor 'model_type' (transformers)")


def load_source(source: str, *, pretrained: bool = False):
    """SOURCE -> (model, base_model_id or None)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path), None
    import timm
    if timm.is_model(source):
        model = timm.create_model(source, pretrained=pretrained)
        hub_id = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id") if pretrained else None
        return model, hub_id or None
    if path.exists():
        raise UserError(f"{source} is a file, not a model folder")
    if _looks_like_repo(source):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError
        try:
            folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
        except RepositoryNotFoundError:
            raise UserError(f"unknown model {source!r}: not a folder, not a timm model name, "
                            "and no Hub repo of that name") from None
        return _load_folder(folder), source
    hint = timm.list_models(f"*{source}*")[:5]
    raise UserError(f"unknown model {source!r}: not a folder, a timm model name or a Hub id 'org/name'"
                    + (f" (timm models like it: {', '.join(hint)})" if hint else ""))


# ----------------------------------------------------------------------------- inspect
def safetensors_header(path: Path) -> dict:
    """Tensor name -> {"dtype", "shape"} from a safetensors file's JSON header (no tensor data read)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise UserError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise UserError(f"{path} is not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} has a corrupt safetensors header: {e}") from e
    header.pop("__metadata__", None)
    return header


def _numel(shape) -> int:
    p = 1
    for s in shape:
        p *= int(s)
    return p


def _specs_of(cfg: dict):
    if isinstance(cfg.get("tn_hf"), dict):
        return cfg["tn_hf"].get("specs") or {}, cfg["tn_hf"].get("config") or {}
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") == "tn_hf":
        return qc.get("specs") or {}, qc.get("tn_config") or qc.get("config") or {}
    return None, None


def _layer_params(spec: dict):
    """(dense params, TN params, TN class, dense class) of a spec, from an empty layer on the meta device."""
    try:
        import torch

        from .layers import layer_from_spec
        with torch.device("meta"):
            layer = layer_from_spec(spec)
        tn = sum(p.numel() for p in layer.parameters())
        return int(layer.dense_params()), tn, type(layer).__name__, getattr(layer.dense_type, "__name__", "?")
    except Exception:  # noqa: BLE001 - unknown/future spec: fall back to the safetensors header
        return None, None, spec.get("class", "?"), "?"


def inspect_checkpoint(target: str) -> dict:
    """Per-layer table and totals of a tn_hf checkpoint (folder or Hub id) from config.json and the
    safetensors header only. Returns ``{"rows": [...], "totals": {...}}``."""
    folder = Path(target).expanduser()
    if not folder.is_dir():
        if folder.exists() or not _looks_like_repo(target):
            raise UserError(f"{target} is not a checkpoint folder or a Hub id 'org/name'")
        folder = _download(target, ["config.json", "model.safetensors"])
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise UserError(f"{folder} has no {name} (not a tn_hf checkpoint)")
    cfg = _read_json(folder / "config.json")
    specs, tn_cfg = _specs_of(cfg)
    if specs is None:
        raise UserError(f"{folder / 'config.json'} has no TN spec: not a tn_hf checkpoint")
    header = safetensors_header(folder / "model.safetensors")
    sizes = {k: _numel(v["shape"]) for k, v in header.items()}
    rows = []
    for name, spec in specs.items():
        dense, tn, tn_type, dense_type = _layer_params(spec)
        if tn is None:  # tensors stored under the module's name (timm / plain torch layouts)
            tn = sum(n for k, n in sizes.items() if k.startswith(name + "."))
        rows.append({"name": name, "type": dense_type, "tn_type": tn_type, "dense_params": dense,
                     "tn_params": tn, "ratio": dense / tn if dense and tn else None, "ranks": spec.get("ranks")})
    total = sum(sizes.values())
    td = sum(r["dense_params"] or 0 for r in rows)
    tt = sum(r["tn_params"] for r in rows)
    dense_model = total - tt + td
    return {"rows": rows, "totals": {"layers": len(rows), "format": (tn_cfg or {}).get("format"),
                                     "target_params_dense": td, "target_params_tn": tt,
                                     "target_ratio": td / max(tt, 1), "model_params_dense": dense_model,
                                     "model_params_tn": total, "model_ratio": dense_model / max(total, 1)}}


def format_table(info: dict) -> str:
    cols = ("name", "type", "tn_type", "dense_params", "tn_params", "ratio", "ranks")

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}x"
        if isinstance(v, list):
            return "-".join(map(str, v))
        if isinstance(v, dict):
            return "; ".join(f"{k}:{fmt(x)}" for k, x in v.items())
        return str(v)

    table = [list(cols)] + [[fmt(r.get(c)) for c in cols] for r in info["rows"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    t = info["totals"]
    lines.insert(1, "-" * len(lines[0]))
    lines += ["-" * len(lines[0]),
              f"compressed layers: {t['layers']}  params {t['target_params_dense']:,} -> {t['target_params_tn']:,} "
              f"({t['target_ratio']:.2f}x)",
              f"whole model:       stored values (params + buffers) {t['model_params_dense']:,} -> {t['model_params_tn']:,} "
              f"({t['model_ratio']:.2f}x)"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands
def cmd_compress(args) -> int:
    import tn_hf
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    try:
        cfg = tn_hf.TNConfig(format=args.format, compression_ratio=args.ratio,
                             target_modules=args.targets or None, exclude_modules=args.exclude or None)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"loading {args.source} ...")
    model, base = load_source(args.source, pretrained=args.pretrained)
    model.eval()
    try:
        report = tn_hf.compress(model, cfg)
    except ValueError as e:
        raise UserError(f"compress {args.source}: {e}") from None
    print(report)
    tn_hf.save_pretrained(model, out, report=report, base_model=base)
    print(f"saved to {out}")
    return 0


def cmd_inspect(args) -> int:
    print(format_table(inspect_checkpoint(args.target)))
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
    try:
        from .demo import run_demo
    except ModuleNotFoundError as e:
        if e.name == f"{__package__}.demo":
            raise UserError("the demo module (tn_hf.demo) is not available in this installation") from None
        raise
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
    p = _Parser(prog=PROG, description="Tensor-Train / Tensor-Ring compression for Hugging Face and timm models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{compress,inspect,push,demo}",
                           parser_class=_Parser)

    c = sub.add_parser("compress", help="decompose a model's layers into TT/TR cores and save it with a card",
                       description="Load SOURCE (timm model name, local folder, or Hub id 'org/name'), "
                                   "replace its target layers by TT/TR layers at the given compression "
                                   "ratio, print the per-layer report and save the checkpoint + model card.")
    c.add_argument("source", metavar="SOURCE", help="timm model name, checkpoint folder, or Hub id")
    c.add_argument("--format", choices=("tt", "tr"), default="tt", help="tensor-network format (default tt)")
    c.add_argument("--ratio", type=_ratio, required=True, help="compression ratio of the target layers (> 1)")
    c.add_argument("--targets", nargs="+", help="module names or regexes to compress (default: all eligible)")
    c.add_argument("--exclude", nargs="+", help="module names or regexes to leave dense")
    c.add_argument("--pretrained", action="store_true", help="timm names: load pretrained weights (network)")
    c.add_argument("--out", required=True, help="output folder")
    c.set_defaults(func=cmd_compress)

    i = sub.add_parser("inspect", help="per-layer table of a tn_hf checkpoint (folder or Hub id)",
                       description="Print per-layer TN params, ranks and totals from config.json and the "
                                   "safetensors header, without building the model.")
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
    except (UserError, ValueError, FileNotFoundError) as e:
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
