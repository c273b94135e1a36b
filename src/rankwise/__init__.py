"""rankwise: low-rank methods for neural networks on one shared core.

Importing rankwise is cheap and has no side effects: submodules load on first use.

    import rankwise
    model = rankwise.load_model("smollm2-135m")
    rankwise.linalg.randomized_svd(W, rank=64)
    rankwise.catalogue()          # every registered method of every kind (`rankwise list`)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> "module:attribute" (attribute None for a submodule)
_LAZY = {
    "linalg": ("rankwise.linalg", None),
    "data": ("rankwise.data", None),
    "surgery": ("rankwise.surgery", None),
    "calibrate": ("rankwise.calibrate", None),
    "profiling": ("rankwise.profiling", None),
    "eval": ("rankwise.eval", None),
    "models": ("rankwise.models", None),
    "inspect": ("rankwise.inspect", None),
    "io": ("rankwise.io", None),
    "adapt": ("rankwise.adapt", None),
    "optim": ("rankwise.optim", None),
    "layers": ("rankwise.layers", None),
    "compress": ("rankwise.compress", None),
    "config": ("rankwise.config", None),
    "registry": ("rankwise.registry", None),
    "catalogue": ("rankwise.registry", "catalogue"),
    "adapt_": ("rankwise.adapt", "adapt_"),
    "load_model": ("rankwise.models", "load_model"),
    "load_tokenizer": ("rankwise.models", "load_tokenizer"),
}

__all__ = [
    "__version__",
    "adapt",
    "adapt_",
    "calibrate",
    "catalogue",
    "compress",
    "config",
    "data",
    "eval",
    "inspect",
    "io",
    "layers",
    "linalg",
    "load_model",
    "load_tokenizer",
    "models",
    "optim",
    "profiling",
    "registry",
    "surgery",
]

if TYPE_CHECKING:  # pragma: no cover
    from rankwise import (
        adapt,
        calibrate,
        compress,
        config,
        data,
        eval,
        inspect,
        io,
        layers,
        linalg,
        models,
        optim,
        profiling,
        registry,
        surgery,
    )
    from rankwise.adapt import adapt_
    from rankwise.models import load_model, load_tokenizer
    from rankwise.registry import catalogue


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'rankwise' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
