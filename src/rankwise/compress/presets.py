"""Named compression methods: each is a preset over (whitener, allocation, update).

| name            | whitener   | default allocation | update                                   | paper                 |
|-----------------|------------|--------------------|------------------------------------------|-----------------------|
| lord            | none       | uniform            | -                                        | LoRD (Kaushal 2023)   |
| fwsvd           | fisher a=1 | uniform            | -                                        | FWSVD (Hsu 2022)      |
| asvd            | act-scale  | uniform            | -                                        | ASVD (Yuan 2023)      |
| svd_llm         | cholesky   | uniform            | - (SVD-LLM's whitening only)             | SVD-LLM (Wang 2025)   |
| svd_llm_update  | cholesky   | uniform            | lstsq B, current target (step 2)         | SVD-LLM (Wang 2025)   |
| svd_llm_seq     | cholesky   | uniform            | joint (re-whitened on propagated inputs) | rankwise, after SVD-LLM |
| welore          | none       | welore             | -                                        | WeLore (Jaiswal 2024) |
| drank           | cholesky   | dynamic            | -                                        | D-Rank                |
| afm             | output PCA | uniform            | -                                        | AFM (Yu & Wu 2023)    |
| eora            | compensation of another compression (see `compensate_`)                | EoRA (Liu 2024)       |

The presets are entries of `rankwise.registry.registry("compressor")` (names lower_snake_case;
``svd-llm`` resolves to ``svd_llm``); `METHODS` is a read-only view of that registry, so a preset
registered there (``registry("compressor").register("mine", MethodPreset(name="mine", ...))``)
is a method everywhere, the CLI included.

Any allocation ("uniform", "budget", "welore", "dynamic") combines with any factorisation
method: `compress_(model, method="svd-llm", allocation="welore")`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from rankwise.registry import canonical_name, registry

__all__ = ["METHODS", "MethodPreset", "get_preset", "method_names"]

_REGISTRY = registry("compressor")
UPDATES = ("none", "lstsq", "joint")
TARGETS = ("current", "original")


@dataclass(frozen=True, kw_only=True)
class MethodPreset:
    """One named method.

    Attributes:
        name: registry name (CLI `--method`).
        kind: "factorize" (compress_) or "compensate" (compensate_).
        whitener: rankwise.compress.svd whitener, or "afm" for output-feature PCA.
        alpha: diagonal-scaling exponent (ASVD 0.5, FWSVD 1.0).
        fisher_axis: "in" or "out" (FWSVD).
        allocation: default rank allocation.
        update: "none", "lstsq" (SVD-LLM step 2) or "joint" (closed-form both factors).
        update_target: "current" (original layer on current inputs) or "original" (the
            original model's activations).
        damping: relative Gram damping for Gram whiteners.
        description: one line for `rankwise list` and the docs.
    """

    name: str
    kind: str = "factorize"
    whitener: str = "none"
    alpha: float = 0.5
    fisher_axis: str = "in"
    allocation: str = "uniform"
    update: str = "none"
    update_target: str = "current"
    damping: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", canonical_name(self.name))
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {list(UPDATES)}, got {self.update!r}")
        if self.update_target not in TARGETS:
            raise ValueError(f"update_target must be one of {list(TARGETS)}, got {self.update_target!r}")

    def with_options(self, **options: Any) -> MethodPreset:
        """A copy with some fields overridden (None values are ignored)."""
        return replace(self, **{k: v for k, v in options.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


_BUILTIN = (
    MethodPreset(name="lord", whitener="none",
                 description="plain truncated SVD of each weight (LoRD)"),
    MethodPreset(name="fwsvd", whitener="fisher", alpha=1.0,
                 description="Fisher-weighted SVD: columns scaled by sqrt of summed squared gradients"),
    MethodPreset(name="asvd", whitener="act-scale", alpha=0.5,
                 description="activation-aware SVD: columns scaled by mean|x|^0.5 (ASVD)"),
    MethodPreset(name="svd_llm", whitener="cholesky",
                 description="truncation-aware Cholesky-whitened SVD (SVD-LLM, whitening only)"),
    MethodPreset(name="svd_llm_update", whitener="cholesky", update="lstsq",
                 description="SVD-LLM whitening + closed-form least-squares update of B on propagated inputs"),
    MethodPreset(name="svd_llm_seq", whitener="cholesky", update="joint",
                 description="SVD-LLM re-whitened block by block on inputs propagated through compressed blocks"),
    MethodPreset(name="welore", whitener="none", allocation="welore",
                 description="WeLore: heavy-tail thresholded ranks, low-rank vs dense components"),
    MethodPreset(name="drank", whitener="cholesky", allocation="dynamic",
                 description="D-Rank: whitened SVD with effective-rank (Lagrange) rank allocation"),
    MethodPreset(name="afm", whitener="afm",
                 description="output-feature PCA (Atomic Feature Mimicking), bias carries the mean"),
    MethodPreset(name="eora", kind="compensate", whitener="eigh",
                 description="EoRA: eigenspace low-rank compensation of quantisation/pruning/truncation error"),
)
for _preset in _BUILTIN:
    _REGISTRY.register(_preset.name, _preset, summary=_preset.description)


class _MethodsView(Mapping[str, MethodPreset]):
    """Read-only ``{name: MethodPreset}`` view of the "compressor" registry, in table order
    (built-ins first, then later registrations by name); lookups accept dashes."""

    def __getitem__(self, name: str) -> MethodPreset:
        if not isinstance(name, str) or name not in _REGISTRY:
            raise KeyError(name)
        return _REGISTRY.get(name).load()

    def __iter__(self) -> Iterator[str]:
        order = [p.name for p in _BUILTIN]
        return iter(order + [n for n in _REGISTRY.names() if n not in order])

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY


METHODS: Mapping[str, MethodPreset] = _MethodsView()


def method_names(kind: str | None = None) -> list[str]:
    """Registered method names (optionally of one kind), in table order."""
    return [n for n, p in METHODS.items() if kind is None or p.kind == kind]


def get_preset(name: str) -> MethodPreset:
    """The preset called `name` (case-insensitive; '-' and '_' are interchangeable)."""
    try:
        return _REGISTRY.get(name).load()
    except ValueError as exc:
        raise ValueError(str(exc).replace("unknown compressor", "unknown method", 1)) from None
