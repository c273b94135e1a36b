"""Random bases shared by every layer of a model, rebuilt from a seed instead of being saved.

VeRA (Kopiczko et al. 2024) and RandLoRA (Albert et al. 2025) use one pair of frozen random matrices for all adapted
layers, allocated for the largest shapes and sliced per layer. Those matrices are *regenerable*:
a CPU ``torch.Generator`` seeded with the config's ``projection_prng_key`` draws them in fp32,
so the same key and shapes give bit-identical tensors on any machine, and a saved adapter holds
only the key and the shapes (JSON), never the bases.

`shared_basis` keeps one tensor per (method, key, shapes) in a weak-value cache, so the layers
of one model (adapted together, or loaded together) hold views of a single tensor; it is freed
when the last layer referring to it goes away. Callers must treat it as read-only.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch

from rankwise.linalg import make_generator

_CACHE: weakref.WeakValueDictionary[Hashable, torch.Tensor] = weakref.WeakValueDictionary()


def shared_basis(key: Hashable, factory: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The tensor cached under `key` (which names its dtype and device), made by `factory()`
    when absent."""
    tensor = _CACHE.get(key)
    if tensor is None:
        tensor = factory()
        _CACHE[key] = tensor
    return tensor


def max_shape(shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(max out, max in) over the (out, in) shapes of the adapted layers."""
    if not shapes:
        raise ValueError("no adapted layers: nothing to size the shared bases with")
    return max(s[0] for s in shapes.values()), max(s[1] for s in shapes.values())


def check_saved_shape(extra: dict, name: str, method: str) -> tuple[int, ...]:
    """Read a saved shape from a method's extra state, with a clear error when it is missing."""
    if name not in extra:
        raise ValueError(
            f"saved {method} adapter lacks {name!r} in its extra state: it was not written by "
            "rankwise.adapt.save_adapter; re-save it from the trained model"
        )
    return tuple(int(v) for v in extra[name])


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (never the global RNG)."""
    return make_generator(int(seed))
