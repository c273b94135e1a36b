"""Resumable pipeline state: one atomic JSON record per finished stage.

Layout under the output directory:

    OUT/.rankwise-pipeline/state.json        {"stages": {name: record}} (rewritten atomically)
    OUT/.rankwise-pipeline/<stage>/          the stage's model (save_compressed format)

A stage's model directory is written first (its `rankwise_compression.json` marker last), then
its record is added to state.json with one atomic rename: a run killed at any point leaves
either a finished stage (record + complete directory) or none. A resumed run reuses the longest
prefix of finished stages whose settings (`ShrinkConfig.stage_fingerprint`) still match.

Under ``torchrun`` every rank holds a PipelineState and makes the same calls in the same order;
rank 0 alone touches the files (recovery, removal, state.json, between barriers:
`rankwise.train.dist.on_rank0`), and every rank reads the state rank 0 left, so all resume from
the same stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rankwise.io import remove_dir
from rankwise.pipeline.config import STAGES, ShrinkConfig
from rankwise.train import dist

logger = logging.getLogger(__name__)

__all__ = ["STATE_DIR", "PipelineInterrupted", "PipelineState"]

STATE_DIR = ".rankwise-pipeline"
_FORMAT = 1


class PipelineInterrupted(RuntimeError):
    """Raised by `shrink(..., stop_after=STAGE)` once STAGE is recorded (an injected failure)."""


class PipelineState:
    """The finished stages of one run in `out`, and where their models live."""

    def __init__(self, out: str | Path, config: ShrinkConfig, *, resume: bool) -> None:
        from rankwise.io import read_json, recover, recover_all

        self.out = Path(out)
        self.root = self.out / STATE_DIR
        self.path = self.root / "state.json"
        self.config = config
        self.stages: dict[str, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}
        self.reused: list[str] = []

        def tidy() -> None:
            recover(self.out)  # an export killed between its renames moved this state away with it
            recover_all(self.root)  # stage directories a killed save left half-published
            if not resume:
                remove_dir(self.root)  # renamed away first: no half-deleted state is ever read

        dist.on_rank0(tidy)  # one process repairs; the others read after the barrier
        if not resume:
            return
        if not self.path.is_file():
            logger.info("no pipeline state in %s: starting from the first stage", self.out)
            return
        data = read_json(self.path)
        if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
            raise ValueError(f"{self.path} is malformed (not a pipeline state): delete {self.root} or run without resume")
        if data.get("format") != _FORMAT:
            raise ValueError(f"{self.path} has format {data.get('format')!r}, this rankwise writes {_FORMAT}: "
                             "delete the directory or choose another out")
        extra = data.get("extra", {})
        if extra.get("fingerprint") == self._extra_fingerprint():
            self.extra = extra.get("values", {})
        for stage in STAGES:  # the longest still-valid prefix
            rec = data.get("stages", {}).get(stage)
            if rec is None:
                break
            if rec.get("fingerprint") != config.stage_fingerprint(stage):
                changed = config.changed_since(stage, data.get("config", {}))
                logger.warning("stage %s was run with other settings (%s): recomputing from it",
                               stage, ", ".join(changed) or "unknown")
                break
            if rec.get("has_model") and not self.model_dir(stage).is_dir():
                logger.warning("stage %s's model directory is gone: recomputing from it", stage)
                break
            self.stages[stage] = rec
            self.reused.append(stage)

    def _extra_fingerprint(self) -> str:
        c = self.config
        return repr((c.model, c.text, c.select_tokens, c.eval_tokens, c.target_modules))

    def set_extra(self, key: str, value: Any) -> None:
        """Store a run-wide measurement (e.g. the dense model's perplexity) in the state file."""
        self.extra[key] = value
        self._write()

    def _write(self) -> None:
        from rankwise.io import write_json

        data = {"format": _FORMAT, "config": self.config.to_dict(), "stages": self.stages,
                "extra": {"fingerprint": self._extra_fingerprint(), "values": self.extra}}
        dist.on_rank0(lambda: write_json(self.path, data))  # rank 0 writes; the others wait

    def model_dir(self, stage: str) -> Path:
        return self.root / stage

    def done(self, stage: str) -> bool:
        return stage in self.stages

    def last_model_stage(self, before: str) -> str | None:
        """The latest finished stage before `before` that saved a model."""
        for stage in reversed(STAGES[: STAGES.index(before)]):
            if self.stages.get(stage, {}).get("has_model"):
                return stage
        return None

    def record(self, stage: str, record: dict[str, Any], *, has_model: bool) -> None:
        """Mark `stage` finished (after its model directory is complete): one atomic write."""
        for later in STAGES[STAGES.index(stage) + 1:]:
            self.stages.pop(later, None)  # anything after a recomputed stage is stale
        self.stages[stage] = dict(record, fingerprint=self.config.stage_fingerprint(stage), has_model=has_model)
        self._write()

    def clean_models(self) -> None:
        """Remove the stage model directories (after export); the records stay."""
        dist.on_rank0(lambda: [remove_dir(self.model_dir(stage)) for stage in STAGES])
        for stage in STAGES:
            if stage in self.stages:
                self.stages[stage]["has_model"] = False
        self._write()
