"""One way for every benchmark to record results: data as JSON (with the environment it ran in)
next to the rendered markdown table, both under benchmarks/results/."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def write(name: str, data: dict, markdown: str, out_dir: Path | str = RESULTS) -> Path:
    """Write ``<name>.json`` ({"environment", **data}) and ``<name>.md``; return the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"environment": environment(), **data}, indent=1, default=str) + "\n")
    md = out / f"{name}.md"
    md.write_text(markdown.rstrip() + "\n")
    return md
