"""Optional dependencies: check for them, or fail with the extra to install."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# package import name -> the rankwise extra that installs it
_EXTRAS = {
    "gguf": "gguf",
    "accelerate": "gguf",
    "matplotlib": "plot",
    "peft": "peers",
    "galore_torch": "peers",
    "datasets": "data",
}


def is_available(package: str) -> bool:
    """True when `package` can be imported (without importing it)."""
    return importlib.util.find_spec(package) is not None


def require(package: str, extra: str | None = None, *, purpose: str = "") -> ModuleType:
    """Import `package` or raise ImportError naming the pip command that provides it."""
    if not is_available(package):
        extra = extra or _EXTRAS.get(package)
        hint = f"pip install 'rankwise[{extra}]'" if extra else f"pip install {package}"
        why = f" for {purpose}" if purpose else ""
        raise ImportError(f"rankwise needs the optional package '{package}'{why}: run `{hint}`.")
    return importlib.import_module(package)
