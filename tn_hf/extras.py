"""Optional dependencies: each one comes with an extra of the package (pyproject.toml), and a missing
one is an error that names the extra to install, not a bare ``ModuleNotFoundError``."""
from __future__ import annotations

import importlib
from types import ModuleType

# import name -> (distribution name, extra that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "mlxtend": ("mlxtend", "data"),
    "sklearn": ("scikit-learn", "data"),
    "sktime": ("sktime", "video"),
    "av": ("av", "video"),
    "skvideo": ("scikit-video", "video"),
}


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"mlxtend.data"``), or raise ``MissingExtra`` saying what needs it
    (``purpose``) and which extra to install. A missing dependency of the module itself (mlxtend
    without scikit-learn) is named the same way."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = (e.name or module).split(".")[0]
        dist = OPTIONAL[missing][0] if missing in OPTIONAL else missing
        extra = (OPTIONAL.get(missing) or OPTIONAL.get(module.split(".")[0]) or (missing, "data"))[1]
        raise MissingExtra(f"{purpose} needs {dist}, which is not installed: pip install -e \".[{extra}]\" "
                           "(in the tn_hf checkout)", name=missing) from e
