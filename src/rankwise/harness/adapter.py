"""Hand a rankwise model to lm-evaluation-harness and run local tasks on it."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["TASK_DIR", "evaluate", "harness_lm", "local_tasks"]

TASK_DIR = Path(__file__).with_name("tasks")


def _require() -> None:
    from rankwise._optional import require

    require("lm_eval", extra="harness", purpose="lm-evaluation-harness tasks")


def local_tasks(include: Sequence[str | os.PathLike[str]] = ()) -> list[str]:
    """Names of the task YAMLs in rankwise's task folder and in the `include` folders."""
    names = []
    for folder in (TASK_DIR, *map(Path, include)):
        if not folder.is_dir():
            raise FileNotFoundError(f"task folder {folder} does not exist: pass a folder of "
                                    "lm-eval task YAML files")
        for path in sorted(folder.glob("*.yaml")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.startswith("task:"):
                    names.append(line.split(":", 1)[1].strip())
                    break
    return names


def harness_lm(model: nn.Module, tokenizer: Any, *, batch_size: int = 4,
               max_length: int = 512) -> Any:
    """lm-eval's HFLM around a loaded causal LM (no copy, no download).

    The prefix token that conditions each document's first token is EOS, the token that
    precedes a document in `rankwise.eval`'s stream, so both score the same tokens.
    """
    _require()
    from lm_eval.models.huggingface import HFLM

    from rankwise.models import model_kind

    if model_kind(model) != "causal-lm":
        raise ValueError(f"lm-eval's tasks here score causal LMs; got a {model_kind(model)} "
                         f"({type(model).__name__}): evaluate it with `rankwise eval` instead")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, which the rolling tasks use as the "
                         "prefix of each document: set tokenizer.eos_token")
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token  # HFLM pads batches
    return HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size,
                max_length=max_length, prefix_token_id=tokenizer.eos_token_id,
                device=str(next(model.parameters()).device))


def evaluate(
    model: str | os.PathLike[str] | nn.Module,
    tasks: str | Sequence[str],
    *,
    tokenizer: Any = None,
    include: Sequence[str | os.PathLike[str]] = (),
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 4,
    max_length: int = 512,
    dtype: Any = None,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval `tasks` on `model`; return {task: {metric: value, ...}}.

    Args:
        model: a bundled name or directory (loaded with `rankwise.load_model`), or a model.
        tasks: task names (a comma-separated string is split): rankwise's own (`local_tasks()`)
            or any in the `include` folders. lm-eval's built-in tasks are not indexed (they
            download their data).
        tokenizer: required with a model object; found with a name or directory.
        include: extra folders of task YAML files.
        limit: score only the first `limit` documents of each task.
        num_fewshot: few-shot examples (from the task's training split).
        batch_size: sequences per forward pass.
        max_length: the window length of rolling perplexity (and the context cap).
        dtype: parameter dtype when loading by name (default float32).

    Every task reports `documents` (scored); rolling tasks also get `token_perplexity` (exp of
    minus the summed log-likelihood over the summed document token counts), `tokens` and
    `doc_loglikelihoods` (one per document, in order).
    """
    _require()
    from rankwise.models import load_model, load_tokenizer

    if logging.getLogger().getEffectiveLevel() > logging.INFO:  # lm-eval's notes, unless -v
        logging.getLogger("lm_eval").setLevel(logging.ERROR)

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    known = local_tasks(include)
    unknown = [t for t in names if t not in known]
    if not names or unknown:
        raise ValueError(f"unknown harness task(s) {unknown or names}: choose from "
                         f"{', '.join(known)} (or add a YAML folder with include=/--harness-include)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("a model object needs its tokenizer: pass tokenizer=")
    else:
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model(model, **({"dtype": dtype} if dtype is not None else {}))
    lm = harness_lm(model, tokenizer, batch_size=batch_size, max_length=max_length)
    raw = _simple_evaluate(lm, names, include, limit, num_fewshot)
    return {name: _summarise(name, raw, tokenizer) for name in names}


def _simple_evaluate(lm: Any, names: list[str], include: Sequence[Any], limit: int | None,
                     num_fewshot: int | None) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = [str(TASK_DIR), *map(str, include)]
    manager = TaskManager(include_path=paths, include_defaults=False)
    return simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                           num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=0,
                           random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                           fewshot_random_seed=0)


def _summarise(name: str, raw: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """The task's metrics (lm-eval's "metric,filter" keys shortened), plus token perplexity."""
    metrics = {}
    for key, value in raw["results"][name].items():
        metric, _, filt = key.partition(",")
        if filt in ("none", "") and "stderr" not in metric and isinstance(value, (int, float)):
            metrics[metric] = float(value)
    samples = raw.get("samples", {}).get(name, [])
    metrics["documents"] = len(samples)
    if samples and raw["configs"][name].get("output_type") == "loglikelihood_rolling":
        total = sum(float(_loglikelihood(s)) for s in samples)
        tokens = sum(len(tokenizer(s["target"], add_special_tokens=False)["input_ids"])
                     for s in samples)
        metrics["tokens"] = tokens
        metrics["token_perplexity"] = math.exp(-total / tokens)
        metrics["doc_loglikelihoods"] = [_loglikelihood(s) for s in samples]
    return metrics


def _loglikelihood(sample: dict[str, Any]) -> float:
    resp = sample["filtered_resps"]
    while isinstance(resp, (list, tuple)):
        resp = resp[0]
    return float(resp)
