"""Calibration inputs of `compress_` / `compensate_`: targets, token windows, statistics.

Calibration is `n_samples x seq_len` tokens of the embedded python-docs corpus by default
(rankwise.data.calibration_batch); statistics come from rankwise.calibrate's one pass (running
fp64 sums only). Fewer calibration tokens than a layer's input width make its Gram singular:
Cholesky then retries with jitter (rankwise.linalg) and `damping` defaults to 1e-4 for that run
(logged). Fewer than `MIN_TOKENS` tokens raise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rankwise.linalg import make_generator

logger = logging.getLogger(__name__)

__all__ = ["MIN_TOKENS", "calibration_ids", "capture", "check_tokens", "find_targets"]

MIN_TOKENS = 128  # below this a Gram is hopelessly rank-deficient for any real layer


def find_targets(model: nn.Module, target_modules: str | Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """`{fqn: nn.Linear}` to compress (surgery vocabulary; default all linears but the head)."""
    from rankwise import surgery

    if target_modules is None and not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layers: rankwise.compress factorises linear "
            "weights only (convolutions and embeddings are left alone); nothing to compress"
        )
    found = surgery.find_modules(model, target_modules)
    bad = [n for n, m in found.items() if not isinstance(m, nn.Linear)]
    if bad:
        raise TypeError(
            f"rankwise.compress factorises nn.Linear layers; {bad[0]!r} is a "
            f"{type(found[bad[0]]).__name__}: leave it out of target_modules"
        )
    return dict(found)


def calibration_ids(
    model: nn.Module,
    calibration: Any = None,
    tokenizer: Any = None,
    *,
    n_samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Calibration input_ids (n, seq_len) and a description of where they came from.

    `calibration`: None (the embedded python-docs corpus), a corpus name / text source accepted
    by `rankwise.data.load_texts`, or a LongTensor (n, seq_len) of input_ids.
    """
    if isinstance(calibration, torch.Tensor):
        ids = calibration
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"calibration ids must be an integer tensor (n, seq_len), got {tuple(ids.shape)} {ids.dtype}")
        info = {"source": "tensor", "n_samples": ids.shape[0], "seq_len": ids.shape[1]}
    else:
        from rankwise.data import calibration_batch

        if tokenizer is None:
            from rankwise.models import load_tokenizer

            path = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
            if not path:
                raise ValueError("calibration needs a tokenizer: pass tokenizer=... or calibration=<input_ids>")
            tokenizer = load_tokenizer(path)
        source = calibration if calibration is not None else "python-docs"
        if getattr(tokenizer, "eos_token_id", None) is None and getattr(tokenizer, "sep_token_id", None) is not None:
            ids = _calibration_with_separator(tokenizer, n_samples, seq_len, source, seed)
        else:
            ids = calibration_batch(tokenizer, n_samples, seq_len, source=source, seed=seed)
        info = {"source": f"{source} (train)" if isinstance(source, str) else "texts",
                "n_samples": n_samples, "seq_len": seq_len, "seed": seed}
    info["tokens"] = int(ids.numel())
    if ids.numel() < MIN_TOKENS:
        raise ValueError(
            f"calibration has {ids.numel()} tokens; at least {MIN_TOKENS} are needed (SVD-LLM uses "
            "256 x 2048): raise n_samples or seq_len"
        )
    return ids.long(), info


def _calibration_with_separator(tokenizer: Any, n: int, seq_len: int, source: Any, seed: int) -> torch.Tensor:
    """calibration_batch for tokenizers without EOS (BERT): documents separated by [SEP].

    TODO(rankwise.data): calibration_batch could take eos_id / fall back to sep_token_id itself.
    """
    from rankwise.data import token_stream
    from rankwise.data.loaders import load_texts

    stream = token_stream(load_texts(source, "train"), tokenizer, eos_id=tokenizer.sep_token_id,
                          max_tokens=max(4 * n * seq_len, 200_000))
    windows = stream.numel() // seq_len
    if windows < n:
        raise ValueError(f"{source!r} has only {stream.numel()} tokens; n * seq_len = {n * seq_len} needed: "
                         "lower n_samples or seq_len")
    gen = make_generator(seed)  # one seeded-generator helper (rankwise.linalg)
    blocks = stream[: windows * seq_len].view(windows, seq_len)
    return blocks[torch.randperm(windows, generator=gen)[:n]].clone()


def capture(model: nn.Module, ids: torch.Tensor, targets: Mapping[str, nn.Module],
            needs: Sequence[str], *, batch_size: int, progress: bool,
            loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None) -> dict[str, Any]:
    """`{fqn: LayerStats}` with the statistics `needs` (input statistics shared between layers
    reading one tensor; squared gradients, when needed, from a second pass with a loss)."""
    from rankwise.calibrate import capture_input_stats

    stats: dict[str, Any] = {}
    inputs = [s for s in needs if s != "sq_grad"]
    if inputs:
        stats = capture_input_stats(model, ids, targets, stats=inputs, batch_size=batch_size,
                                    share_inputs=True, progress=progress)
    if "sq_grad" in needs:
        grads = capture_input_stats(model, ids, targets, stats=("sq_grad",), batch_size=batch_size,
                                    progress=progress, loss_fn=loss_fn)
        for fqn, g in grads.items():
            if fqn in stats:
                stats[fqn].sq_grad, stats[fqn].n_batches = g.sq_grad, g.n_batches
            else:
                stats[fqn] = g
    return stats


def check_tokens(stats: Mapping[str, Any], targets: Mapping[str, nn.Linear], compressor: Any) -> None:
    """Fewer tokens than a Gram's width: singular Gram; log the documented fallback."""
    from rankwise.compress.base import as_input_stats

    if "gram" not in getattr(compressor, "needs", ()):
        return
    narrow = [(f, m.in_features) for f, m in targets.items()
              if as_input_stats(stats[f]).n_tokens < m.in_features]
    if narrow and getattr(getattr(compressor, "config", None), "damping", 1) == 0:
        logger.warning(
            "%d layers saw fewer calibration tokens than their input width (e.g. %s, %d inputs): their "
            "Grams are singular; using damping 1e-4 (raise n_samples or seq_len to avoid it)",
            len(narrow), narrow[0][0], narrow[0][1])
        from dataclasses import replace

        compressor.config = replace(compressor.config, damping=1e-4)
