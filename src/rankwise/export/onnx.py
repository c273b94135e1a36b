"""Export a (factorised) model to ONNX and check it in onnxruntime against PyTorch.

The graph is traced from the PyTorch forward pass, so a FactorizedLinear becomes two MatMuls
(x A^T, then B^T): the ONNX model keeps the factorisation's parameter and FLOP savings. The
exported function is logits = f(input_ids, attention_mask) over the whole sequence (no KV cache:
one forward pass per call, what scoring and batch inference run); batch and sequence length
are dynamic. Written files:

    model.onnx              the graph and its weights (a tied input/output embedding is stored
                            twice: the exporter keeps a transposed copy for the output MatMul)
    tokenizer files         when a tokenizer is known
    rankwise_export.json    format, opset, exporter, and the onnxruntime check (max |diff|)

onnx and onnxruntime are optional (the `export` extra); a clear ImportError names it.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.export.publish import check_target, published_dir

logger = logging.getLogger(__name__)

__all__ = ["check_onnx", "export_onnx", "onnx_session"]

ONNX_FILE = "model.onnx"
_TOLERANCE = 1e-3  # max |logit diff| relative to the largest logit (float32, other op order)


class _LogitsOnly(nn.Module):
    """forward(input_ids, attention_mask) -> logits, without a KV cache (a traceable signature)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits


def _require() -> None:
    from rankwise._optional import require

    require("onnx", purpose="ONNX export", extra="export")
    require("onnxruntime", purpose="checking the ONNX export", extra="export")


def export_onnx(
    src: str | os.PathLike[str] | nn.Module,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    opset: int = 18,
    dynamo: bool = False,
    overwrite: bool = False,
    check: bool = True,
) -> dict[str, Any]:
    """Trace `src` (a causal LM) to `out`/model.onnx and check it in onnxruntime.

    Args:
        src: a compressed directory (or anything `rankwise.load_model` takes), or a model.
        out: output directory (published atomically; refused if non-empty unless `overwrite`).
        tokenizer: saved alongside (default: the one found with `src`).
        opset: ONNX opset version.
        dynamo: use torch.export's exporter instead of the TorchScript tracer (same graph for
            these models; the tracer takes ~5x less time on CPU).
        check: run the file in onnxruntime on a padded batch and compare logits with PyTorch;
            ValueError beyond 1e-3 relative.

    Returns:
        A summary (also written to rankwise_export.json): opset, exporter, file size, check.
    """
    from rankwise.export.dense import _load
    from rankwise.io import write_json
    from rankwise.models import model_kind

    _require()
    out = check_target(out, overwrite=overwrite)
    model, found_tokenizer = _load(src)
    tokenizer = tokenizer if tokenizer is not None else found_tokenizer
    if model_kind(model) != "causal-lm":
        raise ValueError(f"export_onnx exports causal LMs (logits); got a {model_kind(model)} "
                         f"({type(model).__name__})")
    ids, mask = _probe(model)
    with published_dir(out) as tmp:
        _trace(model, tmp / ONNX_FILE, ids, mask, opset=opset, dynamo=dynamo)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        summary: dict[str, Any] = {
            "format": "onnx", "file": ONNX_FILE, "opset": opset,
            "exporter": "torch.export (dynamo)" if dynamo else "torchscript tracer",
            "bytes": (tmp / ONNX_FILE).stat().st_size,
        }
        if check:
            summary["max_abs_logit_diff"] = check_onnx(tmp / ONNX_FILE, model, ids, mask)
        write_json(tmp / "rankwise_export.json", summary)
    return summary | {"out": str(out)}


def _probe(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A small padded batch: exercises dynamic shapes and the attention mask in the check."""
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0  # right padding on the second row
    return ids, mask


def _trace(model: nn.Module, path: Path, ids: torch.Tensor, mask: torch.Tensor, *,
           opset: int, dynamo: bool) -> None:
    wrapper = _LogitsOnly(model).eval()
    names = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    kwargs: dict[str, Any]
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        kwargs = {"dynamic_shapes": {k: {0: batch, 1: seq} for k in names}, "verbose": False}
    else:
        kwargs = {"dynamic_axes": names | {"logits": {0: "batch", 1: "sequence"}}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
        torch.onnx.export(wrapper, (ids, mask), str(path), input_names=list(names),
                          output_names=["logits"], opset_version=opset, dynamo=dynamo, **kwargs)


def onnx_session(path: str | os.PathLike[str], *, threads: int | None = None) -> Any:
    """An onnxruntime CPU InferenceSession for `path` (intra-op `threads`, default: ORT's).

    Threads do not spin-wait between runs.
    """
    _require()
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # no busy-waiting between runs: spinning threads would steal the cores of whatever runs
    # next (PyTorch in an interleaved timing, other jobs on a shared machine)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(path: str | os.PathLike[str], model: nn.Module, ids: torch.Tensor,
               mask: torch.Tensor | None = None) -> float:
    """Max |logit difference| between onnxruntime on `path` and `model` (padded positions skipped).

    Raises:
        ValueError: the difference exceeds 1e-3 of the largest logit.
    """
    mask = torch.ones_like(ids) if mask is None else mask
    session = onnx_session(path)
    got = torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy(),
                                                   "attention_mask": mask.numpy()})[0])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    diff = float((got - want)[keep].abs().max())
    scale = float(want[keep].abs().max()) or 1.0
    if diff > _TOLERANCE * scale:
        raise ValueError(f"onnxruntime's logits on {path} differ from PyTorch's by {diff:.3g} "
                         f"(logits up to {scale:.3g}): try dynamo=True (--dynamo) or another opset")
    return diff
