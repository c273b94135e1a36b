"""CompressionReport: exact parameter accounting of a compression, in both scopes.

`ratio` always means the fraction of parameters removed. The report gives it for the targeted
layers (`ratio_targets`: what SVD-LLM's `--ratio` silently means) and for the whole model
(`ratio_model`: embeddings, norms and the head included), from exact counts, so that nobody
has to guess what a ratio counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CompressionReport", "LayerRecord"]


@dataclass
class LayerRecord:
    """One targeted layer. `rank` None: kept dense. `compensation_rank`: EoRA path width."""

    fqn: str
    out_features: int
    in_features: int
    rank: int | None
    params_before: int
    params_after: int
    compensation_rank: int = 0
    base: str = "factorized"  # "factorized", "dense", "int8", "int4", "2:4"


@dataclass
class CompressionReport:
    """What `compress_` / `compensate_` did. Ratios are fractions of parameters removed."""

    method: str
    allocation: str
    ratio_requested: float
    scope: str
    layers: list[LayerRecord]
    params_model_before: int
    params_model_after: int
    calibration: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def params_targets_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_targets_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def ratio_targets(self) -> float:
        """Fraction of the targeted layers' parameters removed."""
        before = self.params_targets_before
        return 1.0 - self.params_targets_after / before if before else 0.0

    @property
    def ratio_model(self) -> float:
        """Fraction of the whole model's parameters removed."""
        before = self.params_model_before
        return 1.0 - self.params_model_after / before if before else 0.0

    @property
    def n_factorized(self) -> int:
        return sum(1 for r in self.layers if r.rank is not None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            params_targets_before=self.params_targets_before,
            params_targets_after=self.params_targets_after,
            ratio_targets=self.ratio_targets,
            ratio_model=self.ratio_model,
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressionReport:
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["layers"] = [LayerRecord(**r) for r in d.get("layers", [])]
        return cls(**kwargs)

    def summary(self, *, max_layers: int = 12) -> str:
        """A plain-text summary table (what the CLI prints)."""
        lines = [
            f"method {self.method}  allocation {self.allocation}  requested ratio "
            f"{self.ratio_requested:.3f} of {self.scope}",
            "",
            f"{'scope':<16}{'before':>14}{'after':>14}{'removed':>10}",
            f"{'targeted layers':<16}{self.params_targets_before:>14,}{self.params_targets_after:>14,}"
            f"{self.ratio_targets:>10.2%}",
            f"{'whole model':<16}{self.params_model_before:>14,}{self.params_model_after:>14,}"
            f"{self.ratio_model:>10.2%}",
            "",
            f"{self.n_factorized} of {len(self.layers)} targeted layers factorised "
            f"({len(self.layers) - self.n_factorized} kept dense); {self.seconds:.1f} s",
        ]
        if self.calibration:
            c = self.calibration
            lines.append(
                f"calibration: {c.get('n_samples')} x {c.get('seq_len')} tokens "
                f"({c.get('tokens')}) from {c.get('source')}"
            )
        shown = self.layers if len(self.layers) <= max_layers else self.layers[:max_layers]
        lines += ["", f"{'layer':<48}{'shape':>14}{'rank':>7}{'comp':>6}{'removed':>9}"]
        for r in shown:
            rank = "dense" if r.rank is None else str(r.rank)
            removed = 1 - r.params_after / r.params_before if r.params_before else 0.0
            shape = f"{r.out_features}x{r.in_features}"
            lines.append(f"{r.fqn[-48:]:<48}{shape:>14}{rank:>7}{r.compensation_rank or '':>6}{removed:>9.1%}")
        if len(shown) < len(self.layers):
            lines.append(f"... {len(self.layers) - len(shown)} more layers (see the JSON report)")
        return "\n".join(lines)
