"""huggingface_hub hook: ``PyTorchModelHubMixin`` models save and load their TN layers.

A class ``MyModel(nn.Module, PyTorchModelHubMixin)`` gets ``save_pretrained`` / ``from_pretrained``
from huggingface_hub. Left alone, the mixin writes a compressed model's cores without the specs
that say which modules they replace, and ``from_pretrained`` builds the dense model and loads
non-strictly: every TN key is ignored and the dense layers keep their random initialisation,
silently. The mixin has no extension point for this, so ``install()`` wraps two of its methods,
for the huggingface_hub versions in ``SUPPORTED`` whose signatures match:

* ``PyTorchModelHubMixin._save_pretrained(self, save_directory)``: a model carrying TN layers
  (``model.tn_hf_specs``) is written by ``tn_hf.save_pretrained``: config.json holds the mixin's
  constructor kwargs at the top level (what ``from_pretrained`` passes to ``__init__``) plus
  ``"tn_hf": TNMetadata``; model.safetensors the weights; README.md the tn_hf model card. The
  mixin's ``save_pretrained`` then keeps that config.json and card. Other models: the original.
* ``PyTorchModelHubMixin._load_as_safetensor(cls, model, model_file, map_location, strict)``:
  when the config.json next to ``model_file`` (the local folder, or the Hub cache snapshot that
  ``from_pretrained`` downloaded both files into) has ``"tn_hf"``, the dense modules the specs
  name are swapped for empty TN layers and the weights are loaded strictly after a header check
  (``tn_hf.hub.load_into``); a mismatch is a ``CheckpointError``, never random weights. Without
  that key, a file holding TN cores (``....cores.<i>``) that the dense model lacks is refused with a
  ``CheckpointError``; any other checkpoint goes to the mixin's own method.

The originals are kept as ``wrapper.__wrapped__``; ``uninstall()`` puts them back. Only
``import tn_hf`` installs the hook, so the code that loads a compressed mixin model must import
tn_hf (the checkpoint itself cannot make huggingface_hub import it).
"""
from __future__ import annotations

import functools
import inspect
import warnings
from pathlib import Path

SUPPORTED = ((1, 0), (3, 0))  # [min, max) huggingface_hub versions whose mixin methods this wraps
_SIGNATURES = {"_save_pretrained": ["self", "save_directory"],
               "_load_as_safetensor": ["cls", "model", "model_file", "map_location", "strict"]}


def _save_wrapper(original):
    @functools.wraps(original)
    def _save_pretrained(self, save_directory):
        if not getattr(self, "tn_hf_specs", None):
            return original(self, save_directory)
        from ..hub import save_pretrained
        save_pretrained(self, save_directory)
        return None

    return _save_pretrained


def refuse_cores_without_metadata(model, model_file, config_path) -> None:
    """A CheckpointError when ``model_file`` holds TN cores that ``model`` lacks (saved without specs)."""
    from .. import serialization as S
    header = S.read_header(model_file)
    state = model.state_dict(keep_vars=True)
    cores = sorted(k for k in header if S._CORE.search(k) and k not in state)
    if cores:
        raise S.CheckpointError(
            f"{model_file} holds tn_hf TN layers ({cores[:3]}) but {config_path} has no 'tn_hf' metadata saying "
            f"which modules of {type(model).__name__} they replace; loading it would leave those layers randomly "
            "initialised. Save the compressed model again with tn_hf imported (model.save_pretrained(dir) or "
            "tn_hf.save_pretrained(model, dir))")


def _load_wrapper(original):
    @functools.wraps(original)
    def _load_as_safetensor(cls, model, model_file, map_location, strict):
        from .. import serialization as S  # torch: imported on use, so the hook itself stays cheap
        folder = Path(model_file).parent
        S.recover(folder)  # finish a tn_hf save interrupted after its commit point (local folders)
        config_path = folder / S.CONFIG_NAME
        cfg = S.read_json(config_path) if config_path.is_file() else {}
        if "tn_hf" not in cfg:
            refuse_cores_without_metadata(model, model_file, config_path)
            return original(cls, model, model_file, map_location, strict)
        from ..hub import load_into
        meta = S.TNMetadata.from_dict(cfg["tn_hf"], str(config_path))
        load_into(model, meta, model_file, where=config_path)  # always strict
        return model.to(map_location)

    return _load_as_safetensor


_WRAPPERS = {"_save_pretrained": (_save_wrapper, False), "_load_as_safetensor": (_load_wrapper, True)}


def _function(descriptor):
    return descriptor.__func__ if isinstance(descriptor, classmethod) else descriptor


def _supported(version: str, mixin) -> bool:
    try:
        v = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return SUPPORTED[0] <= v < SUPPORTED[1] and all(
        name in vars(mixin) and list(inspect.signature(_function(vars(mixin)[name])).parameters) == params
        for name, params in _SIGNATURES.items())


def install() -> bool:
    """Wrap the mixin's two methods (idempotent); False (with a warning) on an unsupported huggingface_hub."""
    import huggingface_hub
    from huggingface_hub.hub_mixin import PyTorchModelHubMixin as mixin
    if not _supported(huggingface_hub.__version__, mixin):
        warnings.warn(f"tn_hf: huggingface_hub {huggingface_hub.__version__} is not supported by the tn_hf "
                      f"PyTorchModelHubMixin hook (needs {SUPPORTED[0]} <= version < {SUPPORTED[1]} and the known "
                      "method signatures); MyModel.from_pretrained won't load tn_hf checkpoints, use "
                      "tn_hf.from_pretrained(dir, model_class=MyModel)", stacklevel=2)
        return False
    for name, (make, is_classmethod) in _WRAPPERS.items():
        original = vars(mixin)[name]
        if getattr(_function(original), "_tn_hf", False):
            continue
        wrapper = make(_function(original))
        wrapper._tn_hf = True
        wrapper._tn_hf_original = original  # the descriptor itself, restored as it was
        setattr(mixin, name, classmethod(wrapper) if is_classmethod else wrapper)
    return True


def uninstall() -> None:
    from huggingface_hub.hub_mixin import PyTorchModelHubMixin as mixin
    for name in _WRAPPERS:
        current = _function(vars(mixin)[name])
        if getattr(current, "_tn_hf", False):
            setattr(mixin, name, current._tn_hf_original)
