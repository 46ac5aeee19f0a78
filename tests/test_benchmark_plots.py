"""benchmarks/plots.py draws a figure from every result JSON committed in benchmarks/results/."""
import importlib.util
import shutil
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _plots():
    spec = importlib.util.spec_from_file_location("bench_plots", BENCH / "plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_committed_result_draws(tmp_path):
    plots = _plots()
    names = [n for n in plots.FIGURES if (BENCH / "results" / f"{n}.json").is_file()]
    assert {"admm_mnist", "tucker_mnist", "speed_models"} <= set(names)
    for name in names:
        shutil.copy(BENCH / "results" / f"{name}.json", tmp_path)
        png = plots.draw(tmp_path / f"{name}.json")
        assert png == tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_result_names_the_figures(tmp_path):
    plots = _plots()
    with pytest.raises(ValueError, match=r"no figure for other\.json; figures: .*admm_mnist\.json"):
        plots.draw(tmp_path / "other.json")
