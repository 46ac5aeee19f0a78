"""Ecosystem integrations, installed when their library is imported (before or after tn_hf).

``install_hooks()`` (run by ``import tn_hf``) installs the transformers, timm and huggingface_hub
(``PyTorchModelHubMixin``) integrations at once for a library that is already imported, and
otherwise when it is first imported, through a finder on ``sys.meta_path`` that runs the
integration right after the library's own module code.
So ``import tn_hf`` stays cheap and never imports transformers, timm or huggingface_hub itself.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# library module -> tn_hf integration module with an install()
# (huggingface_hub imports its submodules lazily: the module that defines PyTorchModelHubMixin is watched)
ECOSYSTEMS = {"transformers": "tn_hf.integrations.transformers", "timm": "tn_hf.integrations.timm",
              "huggingface_hub.hub_mixin": "tn_hf.integrations.hub_mixin"}


def _install(library: str) -> None:
    try:
        importlib.import_module(ECOSYSTEMS[library]).install()
    except Exception as e:  # noqa: BLE001 - never break the user's own import of the library
        warnings.warn(f"tn_hf: could not install the {library} integration: {type(e).__name__}: {e}", stacklevel=2)


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, library: str):
        self.loader, self.library = loader, library

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _install(self.library)

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self.loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Wraps the spec of a watched library so that its integration installs once it is loaded."""

    def __init__(self):
        self._busy: set[str] = set()

    def find_spec(self, name, path=None, target=None):
        if name not in ECOSYSTEMS or name in self._busy:
            return None
        self._busy.add(name)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy.discard(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, name)
        return spec


def install_hooks() -> None:
    for library in ECOSYSTEMS:
        if library in sys.modules:
            _install(library)
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
