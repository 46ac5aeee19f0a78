"""One way for every benchmark to record results: data as JSON (with the environment it ran in)
next to the rendered markdown table, both under benchmarks/results/."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
import tn_hf  # noqa: E402
from tn_hf.cost import device_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    env = {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cores": os.cpu_count(), "python": platform.python_version(), "tn_hf": tn_hf.__version__}
    try:
        import timm
        env["timm"] = timm.__version__
    except ImportError:
        pass
    return env


def write(name: str, data: dict, markdown: str, out_dir: Path | str = RESULTS) -> Path:
    """Write ``<name>.json`` ({"environment", **data}) and ``<name>.md``; return the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"environment": environment(), **data}, indent=1, default=str) + "\n")
    md = out / f"{name}.md"
    md.write_text(markdown.rstrip() + "\n")
    return md
