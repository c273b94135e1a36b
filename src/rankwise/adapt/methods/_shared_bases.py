"""Random bases shared by every layer of a model, rebuilt from a seed instead of being saved.

VeRA (Kopiczko et al. 2024) and RandLoRA (Albert et al. 2025) use one pair of frozen random matrices for all adapted
layers, allocated for the largest shapes and sliced per layer. Those matrices are *regenerable*:
a CPU ``torch.Generator`` seeded with the config's ``projection_prng_key`` draws them in fp32,
so the same key and shapes give bit-identical tensors on any machine, and a saved adapter holds
only the key and the shapes (JSON), never the bases.

`shared_basis` keeps one tensor per (method, key, shapes) in a weak-value cache, so the layers
of one model (adapted together, or loaded together) hold views of a single tensor; it is freed
when the last layer referring to it goes away. Callers must treat it as read-only.
`shared_pair` does this for a pair of bases kept in one tensor, and `RegeneratedBases` is the
adapter-side protocol of such methods: the sizes the bases were drawn for are the only extra
state saved, and loading redraws the bases from the key and those sizes.

`MaterializedFactors` serves methods whose LoRA factors A (r, in), B (out, r) are assembled each
forward from pieces the layer does not own alone (NOLA's random bases, MoS's shared pools):
ΔW = s · B A and the forward s · B A dropout(x) through the two thin matmuls.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

import torch

from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import AdapterMethod, MethodConfig
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


def shared_pair(key: tuple[Hashable, ...], shapes: tuple[tuple[int, int], tuple[int, int]],
                draw: Callable[[], tuple[torch.Tensor, torch.Tensor]], *, dtype: torch.dtype,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair (a, b) of the given (rows, cols) shapes that `draw()` makes (fp32, CPU), cast to
    `dtype` on `device` and cached under `key` + (dtype, device) as one tensor, so the cache keeps
    both alive together; read-only views."""

    def flat() -> torch.Tensor:
        a, b = draw()
        return torch.cat([a.reshape(-1), b.reshape(-1)]).to(device=device, dtype=dtype)

    (rows_a, cols_a), shape_b = shapes
    tensor = shared_basis((*key, dtype, str(device)), flat)
    n_a = rows_a * cols_a
    return tensor[:n_a].view(rows_a, cols_a), tensor[n_a:].view(*shape_b)


def check_bases_fit(label: str, have: tuple[int, int], need: tuple[int, int]) -> None:
    """Raise unless shared bases of sizes `have` cover a layer needing `need` (element-wise)."""
    if have[0] < need[0] or have[1] < need[1]:
        raise ValueError(f"shared {label} bases {have} are smaller than this layer's {need}: "
                         "the saved adapter is corrupt")


class RegeneratedBases(AdapterMethod):
    """An adapter over model-wide random bases regenerated from its config's key (VeRA, RandLoRA).

    Subclasses name in `basis_sizes` the attribute (and extra-state key) that holds the sizes
    the shared bases were drawn for, and implement `_attach_bases(*sizes)`, which (re)draws the
    bases and slices this layer's views; the sizes are all a saved adapter keeps of them.
    """

    #: attribute and extra-state key holding the sizes of the shared bases (None before init)
    basis_sizes: ClassVar[str] = ""

    def _attach_bases(self, first: int, second: int) -> None:
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {self.basis_sizes: list(getattr(self, self.basis_sizes) or ())}

    @classmethod
    def from_saved(cls, config: MethodConfig, geometry: Geometry, extra: dict[str, Any]
                   ) -> RegeneratedBases:
        method = cls(config, geometry)
        setattr(method, cls.basis_sizes, check_saved_shape(extra, cls.basis_sizes, cls.name))
        return method

    def after_load(self, geometry: Geometry) -> None:
        """Redraw the shared bases from the key and the saved sizes."""
        sizes = getattr(self, self.basis_sizes)
        assert sizes is not None
        self._attach_bases(*sizes)


class MaterializedFactors(AdapterMethod):
    """LoRA-form update from factors assembled each call: subclasses implement `factors()`
    returning (A (r, in), B (out, r)) and set `scale` (s) and `dropout` (a module)."""

    scale: float
    dropout: torch.nn.Module

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A (out, in)."""
        A, B = self.factors()
        return self.scale * (B @ A)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        A, B = self.factors()
        h = geo.apply_in(self.dropout(x.to(A.dtype)), A)
        return base_out + (self.scale * geo.apply_features(h, B)).to(base_out.dtype)
