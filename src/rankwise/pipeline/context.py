"""`RunContext`: what every stage of `shrink` may need, computed once and only when first asked for.

The targets, the healing and held-out token streams, calibration statistics, held-out Grams and
the per-domain perplexities are shared by the four stages (rankwise.pipeline.stages) and, through
`use_cache`, by several runs on the same dense model and data settings.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.pipeline.config import ShrinkConfig
from rankwise.pipeline.measure import heldout_perplexity, test_perplexity
from rankwise.pipeline.structure import target_params

__all__ = ["RunContext"]


@dataclass
class RunContext:
    """What every stage may need, computed once and only when first asked for."""

    config: ShrinkConfig
    dense: nn.Module
    tokenizer: Any
    status: Callable[..., None] = lambda _msg, quiet=False: None
    _cache: dict[str, Any] = field(default_factory=dict)
    shared_cache: bool = False

    @property
    def targets(self) -> dict[str, tuple[int, int]]:
        if "targets" not in self._cache:
            from rankwise.compress import find_targets

            found = find_targets(self.dense, self.config.target_modules)
            self._cache["targets"] = {f: (m.out_features, m.in_features) for f, m in found.items()}
        return self._cache["targets"]

    @property
    def streams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, held-out) token streams (healing text and decision data)."""
        if "streams" not in self._cache:
            from rankwise.pipeline.measure import split_text

            self._cache["streams"] = split_text(self.tokenizer, self.config.text)
        return self._cache["streams"]

    @property
    def heldout(self) -> torch.Tensor:
        return self.streams[1][: self.config.select_tokens]

    def calibration(self) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
        """(ids, info, stats): calibration input_ids and their Grams on the dense model."""
        if "calib" not in self._cache:
            from rankwise.calibrate import capture_input_stats
            from rankwise.compress import calibration_ids

            c = self.config
            self.status("calibration statistics")
            source = self._calibration_source()
            ids, info = calibration_ids(self.dense, source, self.tokenizer, n_samples=c.n_samples,
                                        seq_len=c.seq_len, seed=c.seed)
            if c.calibration in ("mixture", "teacher"):  # config.CALIBRATION_SOURCES
                info = info | {"source": c.calibration}
            stats = capture_input_stats(self.dense, ids, dict(self._dense_targets()), stats=("gram",),
                                        share_inputs=True, progress=False)
            self._cache["calib"] = (ids, info, stats)
        return self._cache["calib"]

    def _calibration_source(self) -> Any:
        """`config.calibration`, with "mixture" and "teacher" turned into input_ids."""
        c = self.config
        if c.calibration == "mixture":
            from rankwise.data.domains import mixture_windows
            from rankwise.pipeline.distill import MIXTURE

            return mixture_windows(MIXTURE, self.tokenizer, c.n_samples, c.seq_len, seed=c.seed)
        if c.calibration == "teacher":
            ids = self.teacher_text()
            if ids.shape[0] < c.n_samples or ids.shape[1] < c.seq_len:
                raise ValueError(f"calibration='teacher' needs {c.n_samples} x {c.seq_len} tokens but "
                                 f"teacher_samples={c.teacher_samples} x 256 were sampled: raise teacher_samples")
            return ids[: c.n_samples, : c.seq_len]
        return c.calibration

    def teacher_text(self) -> torch.Tensor:
        """(teacher_samples, max(256, heal_seq_len)) ids sampled from the dense model (LLM-QAT's
        recipe; cached on disk by rankwise.data.teacher)."""
        c = self.config
        key = f"teacher:{c.teacher_samples}:{c.seed}:{max(256, c.heal_seq_len)}"
        if key not in self._cache:
            from rankwise.data.teacher import teacher_sequences

            self.status("sampling teacher text")
            self._cache[key] = teacher_sequences(
                self.dense, c.teacher_samples, max(256, c.heal_seq_len), seed=c.seed,
                vocab_size=len(self.tokenizer) if self.tokenizer is not None else None,
                progress=lambda done, n: self.status(f"sampling teacher text {done}/{n}", quiet=True))
        return self._cache[key]

    def domains_used(self) -> dict[str, list[str]]:
        """Which embedded LM domains calibration and healing read (the others are held out)."""
        from rankwise.data.domains import DOMAINS
        from rankwise.pipeline.distill import MIXTURE, domains_of

        c = self.config
        calib = c.calibration
        if calib == "mixture":
            cal = list(MIXTURE)
        elif calib is None:
            cal = ["python-docs"]
        else:
            cal = [calib] if isinstance(calib, str) and calib in DOMAINS else []
        heal = domains_of(c.healing_source, c.text) if c.heals else []
        return {"calibration": cal, "healing": heal}

    def heldout_grams(self) -> dict[str, Any]:
        """Input Grams of the dense model's targets on held-out tokens (per-layer decisions)."""
        if "heldout_grams" not in self._cache:
            from rankwise.calibrate import capture_input_stats

            ids = self.heldout[: (self.heldout.numel() // 256) * 256].view(-1, 256)
            self._cache["heldout_grams"] = capture_input_stats(
                self.dense, ids, dict(self._dense_targets()), stats=("gram",), share_inputs=True, progress=False)
        return self._cache["heldout_grams"]

    def use_cache(self, cache: dict[str, Any] | None) -> None:
        """Share calibration statistics and held-out Grams with other runs on the same dense
        model and data settings (a benchmark sweeping ratios); reset on a mismatch."""
        if cache is None:
            return
        c = self.config
        key = repr((id(self.dense), c.model, c.calibration, c.n_samples, c.seq_len, c.seed, c.target_modules,
                    c.text, c.select_tokens))
        if cache.get("_key") != key:
            cache.clear()
            cache["_key"] = key
        self._cache = cache
        self.shared_cache = True

    def fitted_compressor(self, method: str) -> Any:
        """A compressor of `method` fitted to the calibration statistics (SVDs cached inside)."""
        from rankwise.compress import build_compressor

        key = f"compressor:{method}"
        if key not in self._cache:
            _, _, stats = self.calibration()
            comp = build_compressor(method)
            for f in self.targets:
                comp.observe_stats(f, stats[f])
            self._cache[key] = comp
        return self._cache[key]

    def release_compressors(self) -> None:
        for key in [k for k in self._cache if k.startswith("compressor:")]:
            del self._cache[key]

    def _dense_targets(self) -> dict[str, nn.Module]:
        return {f: self.dense.get_submodule(f) for f in self.targets}

    def domain_perplexities(self, model: nn.Module, python_docs_ppl: float) -> dict[str, float]:
        """Test perplexity on every embedded LM domain (python-docs: the test_ppl just measured)."""
        from rankwise.data.domains import DOMAINS
        from rankwise.pipeline.measure import domain_perplexities

        self.status("per-domain perplexity")
        others = [d for d in DOMAINS if d != "python-docs"]
        return {"python-docs": python_docs_ppl} | domain_perplexities(model, self.tokenizer, self.config.eval_tokens,
                                                                       others)

    def working_copy(self) -> nn.Module:
        return copy.deepcopy(self.dense)

    def measure(self, model: nn.Module, record: dict[str, Any], *, test: bool = True) -> dict[str, Any]:
        """Add held-out / test perplexity and exact parameter counts of `model` to `record`."""
        from rankwise.surgery import count_parameters

        self.status("held-out perplexity")
        record["heldout_ppl"] = heldout_perplexity(model, self.heldout)
        if test:
            self.status("test perplexity")
            record["test_ppl"] = test_perplexity(model, self.tokenizer, self.config.eval_tokens)
            record["domains"] = self.domain_perplexities(model, record["test_ppl"])
        before = target_params(self.dense, self.targets)
        after = target_params(model, self.targets)
        total_before, total_after = count_parameters(self.dense), count_parameters(model)
        record |= {"params_targets_before": before, "params_targets": after,
                   "ratio_targets": 1 - after / before, "params_model_before": total_before,
                   "params_model": total_after, "ratio_model": 1 - total_after / total_before}
        return record
