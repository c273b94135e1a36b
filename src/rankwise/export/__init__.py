"""Export a rankwise model to formats other runtimes run.

- `export_dense(src, out)`: multiply every factorised layer back into one dense weight
  (W = B A, plus an EoRA path's B' A') and write a standard Hugging Face checkpoint that plain
  `transformers.AutoModelForCausalLM.from_pretrained(out)` loads, with rankwise's logits. It
  keeps the compressed model's outputs only: the checkpoint is as large and as slow as the
  original dense model.
- `export_onnx(src, out)`: trace the factorised graph (two MatMuls per factorised layer) to
  ONNX, check it in onnxruntime against the PyTorch logits, and record the check. It keeps the
  parameter saving and the FLOP saving of the factorisation.

Modules: `dense` (merging factors), `onnx` (export + onnxruntime check), `timing` (interleaved
latency of PyTorch and onnxruntime), `publish` (temp sibling directory + rename).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["check_onnx", "export_dense", "export_onnx", "merge_factors_"]

_LAZY = {
    "export_dense": "rankwise.export.dense",
    "merge_factors_": "rankwise.export.dense",
    "export_onnx": "rankwise.export.onnx",
    "check_onnx": "rankwise.export.onnx",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rankwise.export' has no attribute {name!r}")
