"""Named compression methods: each is a preset over (whitener, allocation, update).

| name            | whitener   | default allocation | update                       | card |
|-----------------|------------|--------------------|------------------------------|------|
| lord            | none       | uniform            | -                            | 1    |
| fwsvd           | fisher a=1 | uniform            | -                            | 2    |
| asvd            | act-scale  | uniform            | -                            | 3    |
| svd-llm         | cholesky   | uniform            | - (SVD-LLM's whitening only) | 4    |
| svd-llm-update  | cholesky   | uniform            | lstsq B, current target (step 2) | 4 |
| svd-llm-seq     | cholesky   | uniform            | joint (re-whitened on propagated inputs) | 4 (rankwise) |
| welore          | none       | welore             | -                            | 5    |
| drank           | cholesky   | dynamic            | -                            | 6    |
| afm             | output PCA | uniform            | -                            | 8    |
| eora            | compensation of another compression (see `compensate_`)   | 7    |

Any allocation ("uniform", "budget", "welore", "dynamic") combines with any factorisation
method: `compress_(model, method="svd-llm", allocation="welore")`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

__all__ = ["METHODS", "MethodPreset", "get_preset", "method_names"]

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
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {list(UPDATES)}, got {self.update!r}")
        if self.update_target not in TARGETS:
            raise ValueError(f"update_target must be one of {list(TARGETS)}, got {self.update_target!r}")

    def with_options(self, **options: Any) -> MethodPreset:
        """A copy with some fields overridden (None values are ignored)."""
        return replace(self, **{k: v for k, v in options.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


METHODS: dict[str, MethodPreset] = {
    p.name: p
    for p in (
        MethodPreset(name="lord", whitener="none",
                     description="plain truncated SVD of each weight (LoRD)"),
        MethodPreset(name="fwsvd", whitener="fisher", alpha=1.0,
                     description="Fisher-weighted SVD: columns scaled by sqrt of summed squared gradients"),
        MethodPreset(name="asvd", whitener="act-scale", alpha=0.5,
                     description="activation-aware SVD: columns scaled by mean|x|^0.5 (ASVD)"),
        MethodPreset(name="svd-llm", whitener="cholesky",
                     description="truncation-aware Cholesky-whitened SVD (SVD-LLM, whitening only)"),
        MethodPreset(name="svd-llm-update", whitener="cholesky", update="lstsq",
                     description="SVD-LLM whitening + closed-form least-squares update of B on propagated inputs"),
        MethodPreset(name="svd-llm-seq", whitener="cholesky", update="joint",
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
}


def method_names(kind: str | None = None) -> list[str]:
    """Registered method names (optionally of one kind), in table order."""
    return [n for n, p in METHODS.items() if kind is None or p.kind == kind]


def get_preset(name: str) -> MethodPreset:
    """The preset called `name` (case-insensitive; '_' and '-' are interchangeable)."""
    key = str(name).lower().replace("_", "-")
    if key not in METHODS:
        import difflib

        close = difflib.get_close_matches(key, list(METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}: choose one of {list(METHODS)}{hint}")
    return METHODS[key]
