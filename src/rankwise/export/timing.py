"""Latency of one model run by PyTorch and by onnxruntime, measured interleaved.

On a shared machine absolute times drift with the load, so every round runs each candidate
once (in rotating order) and the medians are compared as ratios; both runtimes get the same
number of intra-op threads.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["compare_latency", "onnx_runner", "torch_runner", "latency_vs_dense"]


def torch_runner(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], Any]:
    """One no-grad forward pass of `model` (logits only, no KV cache)."""

    def run() -> Any:
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return run


def onnx_runner(path: str | os.PathLike[str], ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], Any]:
    """One onnxruntime run of the exported graph, with as many threads as torch uses."""
    from rankwise.export.onnx import onnx_session

    session = onnx_session(path, threads=torch.get_num_threads())
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    return lambda: session.run(["logits"], feed)


def compare_latency(runners: dict[str, Callable[[], Any]], *, rounds: int = 10,
                    warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each runner, measured interleaved over `rounds` rounds."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def latency_vs_dense(model: nn.Module, factorised_onnx: str | os.PathLike[str], *,
                     batch: int = 1, seq_len: int = 128, rounds: int = 10) -> dict[str, Any]:
    """Time PyTorch (factorised), ONNX (factorised) and ONNX of the merged dense model.

    The dense ONNX model is `model` with its factors multiplied back (`merge_factors_` on a
    copy), exported to a temporary directory: the runtime a dense-only user would run.
    Returns the medians and their ratios to the dense ONNX model (below 1 = faster).
    """
    import copy

    from rankwise.export.dense import merge_factors_
    from rankwise.export.onnx import export_onnx

    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    dense = copy.deepcopy(model)
    merge_factors_(dense)
    with tempfile.TemporaryDirectory(prefix="rankwise-dense-onnx-") as tmp:
        export_onnx(dense, Path(tmp) / "dense", check=False)
        del dense
        medians = compare_latency({
            "pytorch_factorised": torch_runner(model, ids, mask),
            "onnx_factorised": onnx_runner(factorised_onnx, ids, mask),
            "onnx_dense": onnx_runner(Path(tmp) / "dense" / "model.onnx", ids, mask),
        }, rounds=rounds)
    base = medians["onnx_dense"]
    return {
        "batch": batch, "seq_len": seq_len, "rounds": rounds, "threads": torch.get_num_threads(),
        "median_seconds": medians, "ratio_to_onnx_dense": {k: v / base for k, v in medians.items()},
    }
