"""Score rankwise models with lm-evaluation-harness, offline, on local task definitions.

Compression and fine-tuning results are usually reported with lm-evaluation-harness (lm-eval).
`evaluate(model, ["rankwise_python_docs"])` hands any rankwise model (a bundled name, a
compressed directory, an adapted model in memory) to lm-eval's own Hugging Face model class
(`HFLM`, which accepts a loaded `nn.Module` and tokenizer) and runs tasks defined by YAML files
whose data comes from rankwise's embedded corpora, so nothing is downloaded:

- `rankwise_python_docs`: rolling log-likelihood perplexity over the python-docs test split, as
  lm-eval's `wikitext` task (word / byte perplexity, bits per byte; `evaluate` adds the token
  perplexity from the per-document log-likelihoods, comparable with `rankwise.eval.perplexity`).
- `rankwise_fortunes`: the fortunes topic set as 8-way multiple choice (acc, acc_norm).

Users add tasks the same way: a YAML file in a folder passed as `include=` (CLI
`--harness-include DIR`) whose `custom_dataset` is `rankwise.harness.sources.documents` or
`.topics` with `dataset_kwargs` naming a corpus, folder or file (docs/harness.md).

Modules: `adapter` (model -> HFLM, evaluate), `sources` (datasets for custom_dataset),
`metrics` (per-document results of the rolling tasks), `tasks/` (the YAML definitions).
Needs the `harness` extra (lm-eval).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["TASK_DIR", "evaluate", "harness_lm", "local_tasks"]

_LAZY = {"evaluate": "rankwise.harness.adapter", "harness_lm": "rankwise.harness.adapter",
         "local_tasks": "rankwise.harness.adapter", "TASK_DIR": "rankwise.harness.adapter"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rankwise.harness' has no attribute {name!r}")
