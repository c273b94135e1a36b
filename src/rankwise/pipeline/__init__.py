"""rankwise.pipeline: compress -> compensate -> heal -> export in one call (`rankwise shrink`).

    from rankwise.pipeline import shrink
    result = shrink("smollm2-135m", ratio=0.2, out="out/smol-20", heal_minutes=15)
    print(result.summary())
    model = rankwise.load_model("out/smol-20")

Modules: `config` (settings, per-stage fingerprints), `state` (atomic per-stage resume
records), `stages` (compress / compensate / heal), `healing` (time-budgeted LoRA, factor-only
and distillation fine-tunes), `structure` (EoRA folding, parameter accounting), `measure`
(held-out / test perplexity, latency), `report` (summary table, report.md), `api` (`shrink`).
"""

from __future__ import annotations

from rankwise.pipeline.api import ShrinkResult, shrink
from rankwise.pipeline.config import HEAL_METHODS, STAGES, ShrinkConfig
from rankwise.pipeline.healing import HealResult, distill_loss, heal_
from rankwise.pipeline.state import PipelineInterrupted, PipelineState
from rankwise.pipeline.structure import fold_compensation

__all__ = [
    "HEAL_METHODS",
    "STAGES",
    "HealResult",
    "PipelineInterrupted",
    "PipelineState",
    "ShrinkConfig",
    "ShrinkResult",
    "distill_loss",
    "fold_compensation",
    "heal_",
    "shrink",
]
