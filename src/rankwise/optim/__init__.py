"""Low-rank gradient optimizers: GaLore, Q-GaLore, Fira, FRUGAL, APOLLO, GradNormLoRP, DCT-AdamW.

One optimizer class (`LowRankOptimizer`) over ordinary param groups, one projector
abstraction (`Projector`: svd / randomized / dct / random / random_orthogonal / randperm /
randk / identity,
optionally int8/int4-quantised with lazy refresh), pure update rules (`functional`), and
layer-wise updates during backward (`LayerwiseUpdates`). Named methods are presets, registered
on ``rankwise.registry.registry("optimizer")`` (`PRESETS` and `available` are views of it):

    >>> import rankwise.optim as ro
    >>> opt = ro.create("galore_adamw", model, rank=128)      # or "fira", "apollo", ...
    >>> ro.available()                                        # preset names

The optimizer state is tensors only: ``torch.save(opt.state_dict())`` loads back with
``torch.load(..., weights_only=True)`` and resumes bit-exactly. See docs/optim.md.
"""

from __future__ import annotations

from rankwise.optim.layerwise import LayerwiseUpdates
from rankwise.optim.lowrank import GROUP_DEFAULTS, LowRankOptimizer
from rankwise.optim.presets import (
    PRESETS,
    Preset,
    apply_weight_norm,
    create,
    merge_weight_norm,
    param_groups,
    register_preset,
)
from rankwise.optim.projector import (
    PROJECTORS,
    DCTProjector,
    IdentityProjector,
    Projector,
    RandKProjector,
    RandomizedSVDProjector,
    RandomOrthogonalProjector,
    RandomProjector,
    RandPermProjector,
    SVDProjector,
    make_projector,
    register_projector,
    resolve_side,
)
from rankwise.optim.projector_q import QuantizedProjector
from rankwise.optim.qweight import QuantizedWeightLinear, quantize_weights_


def available() -> list[str]:
    """Names of the optimizer presets (`create` accepts them): the optimizer registry's."""
    from rankwise.registry import registry

    return registry("optimizer").names()


__all__ = [
    "GROUP_DEFAULTS",
    "PRESETS",
    "PROJECTORS",
    "DCTProjector",
    "IdentityProjector",
    "LayerwiseUpdates",
    "LowRankOptimizer",
    "Preset",
    "Projector",
    "QuantizedProjector",
    "QuantizedWeightLinear",
    "RandKProjector",
    "RandomOrthogonalProjector",
    "RandPermProjector",
    "RandomProjector",
    "RandomizedSVDProjector",
    "SVDProjector",
    "apply_weight_norm",
    "available",
    "create",
    "make_projector",
    "merge_weight_norm",
    "param_groups",
    "quantize_weights_",
    "register_preset",
    "register_projector",
    "resolve_side",
]
