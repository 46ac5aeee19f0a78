"""Every code block and command in README.md runs as written.

Offline substitutions only: timm's pretrained weights can't be downloaded here, so
`pretrained=True` for a timm model name becomes `pretrained=False` and `tn-hf compress <timm name>`
gets `--random-init`; the Hub is the local test server. `make` lines are the test suite itself and
the main job, run by CI and `make demo`; `pip install` is the install they run."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
OFFLINE = [(re.compile(r'create_model\("(?!local-dir:|hf-hub:)([\w.]+)", pretrained=True\)'),
            r'create_model("\1", pretrained=False)')]


def _offline(code: str) -> str:
    for pattern, repl in OFFLINE:
        code = pattern.sub(repl, code)
    return code


def _commands() -> list[str]:
    out = []
    for lang, body in BLOCKS:
        if lang == "bash":
            out += [ln.split(" #")[0].strip() for ln in body.splitlines() if ln.strip() and not ln.startswith("#")]
    return out


def test_readme_has_blocks():
    langs = [lang for lang, _ in BLOCKS]
    assert langs.count("python") >= 4 and langs.count("bash") >= 3
    assert all(lang in ("python", "bash") for lang in langs), langs


def test_python_blocks_and_commands_run_in_order(hub, tmp_path, monkeypatch, capsys):
    """The blocks build on each other (the Trainer block's checkpoint is loaded later), as a reader
    runs them top to bottom in one session; then the shell commands, in the same folder."""
    from tn_hf.cli import main
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, (lang, body) in enumerate(BLOCKS):
        if lang == "python":
            exec(compile(_offline(body), f"README.md python block {i}", "exec"), namespace)
    assert (tmp_path / "out" / "resnet18-tt" / "model.safetensors").is_file()
    assert "your-name/resnet18-tt" in hub.repos
    for cmd in _commands():
        argv = shlex.split(cmd)
        if argv[0] in ("make", "pip"):  # the install and the make targets: run by CI / make itself
            continue
        if argv[0] == "tn-hf":
            args = argv[1:]
            if args[:1] == ["compress"] and not Path(args[1]).exists():
                args.insert(2, "--random-init")
            try:
                code = main(args)
            except SystemExit as e:  # --version / --help exit through argparse
                code = e.code
            assert code == 0, (cmd, capsys.readouterr().err)
        elif argv[0] == "python":
            script = ROOT / argv[1]
            proc = subprocess.run([sys.executable, str(script), *argv[2:]], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
        else:
            pytest.fail(f"README command not covered by this test: {cmd}")
    assert (tmp_path / "out" / "cli-resnet18" / "config.json").is_file()
