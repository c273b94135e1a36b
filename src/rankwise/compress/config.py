"""Frozen configs of `compress_` and `compensate_` (rankwise.config.Config: one declaration per
option gives its default, validation, serialisation and the `rankwise compress` flag).

    from rankwise.compress import CompressConfig, compress_
    config = CompressConfig(method="svd_llm", ratio=0.2, allocation="welore", n_samples=64)
    report = compress_(model, config=config, tokenizer=tok)
    compress_(model, "svd-llm", 0.2, n_samples=64)       # the same, as keyword options
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rankwise.config import Config, option

__all__ = ["CalibrationConfig", "CompensateConfig", "CompressConfig", "config_from"]

SCOPES = ("targets", "model")
UPDATE_CHOICES = (None, "none", "lstsq", "joint")
UPDATE_TARGETS = (None, "current", "original")
BASES = ("int8", "int4", "2:4")
COMPENSATIONS = ("eora", "svd")


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig(Config):
    """Calibration options shared by `compress_` and `compensate_`."""

    calibration: str | None = option(
        None, "calibration text: corpus name, file or glob (default: the embedded python-docs "
        "corpus); from Python also a LongTensor (n, seq_len) of input_ids", cli=False)
    n_samples: int = option(32, "calibration sequences")
    seq_len: int = option(256, "calibration sequence length")
    seed: int = option(0, "calibration sampling seed")
    target_modules: tuple[str, ...] | None = option(
        None, "layer names/globs to compress (None: every linear but the output head)")
    batch_size: int = option(8, "calibration micro-batch size")
    progress: bool = option(True, "show progress bars", cli=False)

    def validate(self) -> None:
        super().validate()
        for name in ("n_samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))


@dataclass(frozen=True, kw_only=True)
class CompressConfig(CalibrationConfig):
    """Options of `compress_` (factorise linear layers to remove `ratio` of their parameters)."""

    method: str = option("svd_llm", "compression method (a 'compressor' registry name; "
                         "dashes accepted, e.g. svd-llm-update)")
    ratio: float = option(0.2, "fraction of parameters to remove, in [0, 1)")
    scope: str = option("targets", "what --ratio is a fraction of: the targeted layers or the "
                        "whole model", choices=SCOPES)
    allocation: str | None = option(None, "rank allocation across layers (None: the method's)")
    damping: float | None = option(None, "relative Gram damping, e.g. 1e-2 (None: the method's)")
    update: str | None = option(None, "SVD-LLM update after whitening (None: the method's)",
                                choices=UPDATE_CHOICES)
    update_target: str | None = option(None, "target of the update: the original layer on current "
                                       "inputs, or the original model's activations (None: "
                                       "the method's)",
                                       choices=UPDATE_TARGETS)
    compensation_rank: int = option(0, "spend this much of each layer's rank on an EoRA path")
    compensation_sequential: bool = option(
        False, "fit the EoRA paths block by block on inputs through the compensated earlier "
        "blocks (EoRA's reference order; methods with an update always do)")

    def validate(self) -> None:
        from rankwise.compress.allocate import ALLOCATIONS
        from rankwise.compress.base import check_ratio
        from rankwise.compress.presets import get_preset
        from rankwise.registry import canonical_name

        super().validate()
        check_ratio(self.ratio)
        get_preset(self.method)  # unknown names raise, listing the known ones
        object.__setattr__(self, "method", canonical_name(self.method))
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {list(ALLOCATIONS)}, got {self.allocation!r}")
        if isinstance(self.compensation_rank, bool) or not isinstance(self.compensation_rank, int) \
                or self.compensation_rank < 0:
            raise ValueError(f"compensation_rank must be an int >= 0, got {self.compensation_rank!r}")


@dataclass(frozen=True, kw_only=True)
class CompensateConfig(CalibrationConfig):
    """Options of `compensate_` (a base compression plus a low-rank correction)."""

    base: str = option("int4", "the compression to compensate", choices=BASES)
    rank: int = option(32, "rank of the correction (0: the base compression alone)")
    compensation: str = option("eora", "correction: EoRA's eigenspace projection or a plain SVD "
                               "of the error", choices=COMPENSATIONS)
    block_size: int = option(64, "quantisation block size along the input dimension")
    sequential: bool = option(False, "fit block by block on inputs that went through the "
                              "compensated earlier blocks (EoRA's reference order)")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {self.rank!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


def config_from(cls: type[CalibrationConfig], config: CalibrationConfig | None,
                options: dict[str, Any]) -> CalibrationConfig:
    """`config` (or the defaults) with keyword `options` applied; None options are ignored
    when a config is given, so `compress_(model, config=c)` keeps c's method and ratio."""
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    given = {k: v for k, v in options.items() if v is not None or config is None}
    if config is None:
        from rankwise.config import check_keys

        check_keys(cls, given)
        return cls(**given)
    return config.replace(**given) if given else config
