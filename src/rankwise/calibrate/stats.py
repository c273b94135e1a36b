"""Per-layer statistics (`LayerStats`) and the one fp64 running accumulator (`GramAccumulator`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch

__all__ = ["STATS", "GramAccumulator", "LayerStats", "shared_groups"]

STATS = ("gram", "mean", "abs_mean", "abs_max", "sq_grad")
_INPUT_STATS = ("gram", "mean", "abs_mean", "abs_max")


@dataclass
class LayerStats:
    """Input statistics of one layer (tensors only, so they save as safetensors).

    Attributes:
        n_tokens: 0-d int64, tokens seen (padding excluded).
        gram: (in, in) fp64, Σ xᵀx.
        mean: (in,) fp64, mean of x over tokens.
        abs_mean: (in,) fp64, mean of |x| over tokens.
        abs_max: (in,) fp64, max of |x| over tokens.
        sq_grad: (out, in) fp32, Σ over batches of the squared weight gradient.
        n_batches: 0-d int64, backward passes summed into ``sq_grad``.
        cross: (in, in) fp64, Σ x_refᵀ x against reference inputs (block runner only).
    """

    n_tokens: torch.Tensor
    gram: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    abs_mean: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    sq_grad: torch.Tensor | None = None
    n_batches: torch.Tensor | None = None
    cross: torch.Tensor | None = None

    def covariance(self) -> torch.Tensor:
        """Centred covariance E[xxᵀ] − E[x]E[x]ᵀ (in, in) fp64; needs ``gram`` and ``mean``."""
        if self.gram is None or self.mean is None:
            raise ValueError('covariance needs the "gram" and "mean" statistics: collect both')
        n = int(self.n_tokens)
        return self.gram / n - torch.outer(self.mean, self.mean)

    def fisher(self) -> torch.Tensor:
        """Mean squared gradient (out, in): ``sq_grad / n_batches``."""
        if self.sq_grad is None or self.n_batches is None:
            raise ValueError(
                'fisher needs the "sq_grad" statistic: collect it with stats=("sq_grad",)'
            )
        return self.sq_grad / int(self.n_batches)

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat ``{prefix + field: tensor}`` for `rankwise.io.save_tensors` (None fields omitted)."""
        return {
            prefix + f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) is not None
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> LayerStats:
        """Inverse of `to_tensors`."""
        names = {f.name for f in fields(cls)}
        return cls(
            **{
                k[len(prefix) :]: v
                for k, v in tensors.items()
                if k.startswith(prefix) and k[len(prefix) :] in names
            }
        )


def shared_groups(stats: Mapping[str, LayerStats]) -> list[list[str]]:
    """Groups of fqns whose statistics share one Gram / mean tensor (from ``share_inputs``)."""
    groups: dict[int, list[str]] = {}
    for name, s in stats.items():
        key = s.gram if s.gram is not None else s.mean if s.mean is not None else s.abs_mean
        groups.setdefault(id(key) if key is not None else id(s), []).append(name)
    return list(groups.values())

class GramAccumulator:
    """Running fp64 sums for one distinct layer input: the one accumulator of rankwise.

    Every statistic rankwise gathers from activations goes through `add` (the whole-model pass
    below, the block runner of rankwise.compress.sequential, the compressors' own `observe`),
    so they all follow one numeric policy: inputs are cast to fp64 on the stats device *before*
    the product, and ``gram += xᵀx`` is one fp64 ``addmm_``.

    Args:
        n_in: input width n.
        stats: which of ``"gram", "mean", "abs_mean", "abs_max"`` to keep.
        device: where the sums live.
        cross: also keep ``cross = Σ x_refᵀ x`` (n, n), the cross-Gram against reference inputs
            (SVD-LLM's update towards the original model's activations).
    """

    def __init__(self, n_in: int, stats: Sequence[str] = ("gram",),
                 device: str | torch.device = "cpu", *, cross: bool = False) -> None:
        f64 = dict(dtype=torch.float64, device=torch.device(device))
        self.device = torch.device(device)
        self.n_tokens = 0
        self.gram = torch.zeros(n_in, n_in, **f64) if "gram" in stats else None
        self.x_sum = torch.zeros(n_in, **f64) if "mean" in stats else None
        self.abs_sum = torch.zeros(n_in, **f64) if "abs_mean" in stats else None
        self.abs_max = torch.zeros(n_in, **f64) if "abs_max" in stats else None
        self.cross = torch.zeros(n_in, n_in, **f64) if cross else None

    def add(self, x: torch.Tensor, ref: torch.Tensor | None = None) -> None:
        """Add inputs x (..., n) (any float dtype/device); `ref` (..., n): reference inputs of
        the same tokens, for the cross-Gram."""
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.device, dtype=torch.float64)
        self.n_tokens += x.shape[0]
        if self.gram is not None:
            self.gram.addmm_(x.T, x)
        if self.cross is not None:
            if ref is None:
                raise ValueError("this accumulator keeps a cross-Gram: pass ref= with the inputs")
            r = ref.detach().reshape(-1, ref.shape[-1]).to(device=self.device, dtype=torch.float64)
            self.cross.addmm_(r.T, x)
        if self.x_sum is not None:
            self.x_sum += x.sum(0)
        if self.abs_sum is not None or self.abs_max is not None:
            ax = x.abs()
            if self.abs_sum is not None:
                self.abs_sum += ax.sum(0)
            if self.abs_max is not None and x.shape[0]:
                torch.maximum(self.abs_max, ax.amax(0), out=self.abs_max)

    def finish(self) -> dict[str, torch.Tensor | None]:
        """The `LayerStats` fields (means divided out; the Gram stays a sum)."""
        n = max(self.n_tokens, 1)
        return {
            "n_tokens": torch.tensor(self.n_tokens, dtype=torch.int64),
            "gram": self.gram,
            "mean": None if self.x_sum is None else self.x_sum / n,
            "abs_mean": None if self.abs_sum is None else self.abs_sum / n,
            "abs_max": self.abs_max,
            "cross": self.cross,
        }
