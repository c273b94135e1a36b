"""Fine-tune a model with a `rankwise.adapt` method: progress, evaluation, checkpoints, resume.

    from rankwise.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="minilm-l6", task="fortunes", method="lora", rank=8,
                                     steps=200, out="runs/fortunes-lora"))
    result.metric, result.history["losses"], result.trainable_parameters

One step (Hugging Face Accelerate carries device placement and backward; transformers' "linear"
warmup/decay schedule; AdamW over the trainable tensors; the adapters' training-time rules hook
onto the optimizer through `rankwise.adapt.attach_rules`, so no method is a special case here):

    loss = task_loss(model, batch(step)); accelerator.backward(loss); clip_grad_norm
    optimizer.step()   # rules run around it;   scheduler.step();   optimizer.zero_grad()

Ctrl-C finishes the current step, checkpoints and returns (a second Ctrl-C stops at once).

Why not `transformers.Trainer`: its checkpoints pickle the optimizer, scheduler and RNG state
(``optimizer.pt``, ``rng_state.pth``: ``torch.load``) and save the whole model; ours hold only
adapter + head tensors as safetensors plus JSON, and a step-indexed data order makes resume
bit-exact without replaying a sampler. Trainer users get the same rules with
``Trainer(..., callbacks=[rankwise.adapt.rules_callback()])`` on an `adapt_`-ed model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.finetune import state as ckpt
from rankwise.finetune.config import TASKS, FinetuneConfig
from rankwise.finetune.tasks import (
    TaskData,
    TopicClassifier,
    default_targets,
    evaluate,
    prepare_data,
    task_batch,
    task_loss,
)

logger = logging.getLogger(__name__)

__all__ = ["FinetuneResult", "build_model", "finetune", "param_groups"]

_CALIBRATION_BATCHES = 4


@dataclass
class FinetuneResult:
    """What a run reports (also written to OUT/result.json)."""

    config: dict[str, Any]
    metric_name: str
    steps: int = 0
    completed: bool = False
    metric: float | None = None
    initial_metric: float | None = None
    trainable_parameters: int = 0
    total_parameters: int = 0
    history: dict[str, Any] = field(default_factory=lambda: {
        "losses": [], "lrs": [], "step_seconds": [], "evals": []})
    resumed_from: int | None = None
    checkpoint: str | None = None
    #: the trained model (adapters still unmerged); not part of result.json
    model: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}


def build_model(config: FinetuneConfig, base: nn.Module | None = None,
                num_classes: int | None = None) -> nn.Module:
    """The task's model around `base` (loaded from `config.model` when None), unadapted.

    fortunes: `TopicClassifier` (encoder + mean pooling + a seeded fresh Linear head);
    python-docs: the causal LM itself.
    """
    if config.task == "fortunes":
        if base is None:
            from rankwise.models import load_model

            base = load_model(config.model, task="encoder")
        if num_classes is None:
            raise ValueError("the fortunes model needs num_classes")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return TopicClassifier(base, num_classes)
    if base is None:
        from rankwise.models import load_model

        base = load_model(config.model, task="causal-lm")
    return base


def param_groups(model: nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW groups: the adapters at `lr`, a classification head (if any) at `head_lr`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not n.startswith("head.")],
               "lr": config.resolved_lr}]
    head = [p for n, p in named if n.startswith("head.")]
    if head:
        groups.append({"params": head, "lr": config.resolved_head_lr})
    return groups


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[list[bool]]:
    """While active, a first Ctrl-C (SIGINT) only sets a flag (a truthy list) that the loop checks
    between steps; a second one interrupts at once. Only in the main thread."""
    flag: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag:
            raise KeyboardInterrupt
        flag.append(True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _export(model: nn.Module, out: Path) -> None:
    """OUT/adapter: the adapters relative to the base model (loadable onto it with
    `rankwise.adapt.load_adapter`); fortunes also writes OUT/head.safetensors."""
    from rankwise import adapt
    from rankwise.io import save_tensors

    if isinstance(model, TopicClassifier):
        adapt.save_adapter(model.encoder, out / "adapter")
        save_tensors(out / "head.safetensors", model.head.state_dict())
    else:
        adapt.save_adapter(model, out / "adapter")


def _adapt(config: FinetuneConfig, model: nn.Module, data: TaskData) -> None:
    from rankwise import adapt

    targets = config.target_modules or default_targets(model)
    calib = [task_batch(data, -(i + 1) % data.n_rows, config.resolved_batch_size, config.seed)
             for i in range(_CALIBRATION_BATCHES)]
    adapt.adapt_(model, config.method, rank=config.rank, target_modules=targets,
                 seed=config.seed, data=calib, loss_fn=task_loss, **config.method_args)


def finetune(
    config: FinetuneConfig,
    *,
    base: nn.Module | None = None,
    tokenizer: Any | None = None,
    data: TaskData | None = None,
    resume: bool = False,
) -> FinetuneResult:
    """Run `config` (see the module docstring).

    Args:
        base: the unadapted base model (default: ``load_model(config.model)``); adapted in place.
        tokenizer: used to tokenise the task when `data` is None (default: the model's).
        data: ready task data (tests and benchmarks share one).
        resume: continue from the newest checkpoint in `config.out`; other settings raise.
    """
    with torch.random.fork_rng(devices=[]):  # dropout reproducible, caller's RNG untouched
        torch.manual_seed(config.seed)
        return _run(config, base, tokenizer, data, resume)


def _run(config: FinetuneConfig, base: nn.Module | None, tokenizer: Any | None,
         data: TaskData | None, resume: bool) -> FinetuneResult:
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from rankwise import adapt
    from rankwise.io import write_json

    out = Path(config.out) if config.out is not None else None
    found = ckpt.checkpoint_to_resume(out, resume, resume_flag="--resume", out_flag="--out")
    if found is not None:
        ckpt.check_compatible(ckpt.read_meta(found), config, found)
    seq_len, batch_size = config.resolved_seq_len, config.resolved_batch_size
    if data is None:
        if tokenizer is None:
            from rankwise.models import load_tokenizer

            tokenizer = load_tokenizer(config.model)
        data = prepare_data(config.task, tokenizer, seq_len=seq_len,
                            train_tokens=config.train_tokens, eval_tokens=config.eval_tokens,
                            eval_samples=config.eval_samples)
    model = build_model(config, base, getattr(data, "num_classes", None))
    head = [n for n, _ in model.named_parameters() if n.startswith("head.")]
    if found is not None:
        ckpt.load_adapters(found, model, head)
    else:
        _adapt(config, model, data)
        for name, p in model.named_parameters():
            if name in head:
                p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW(param_groups(model, config), weight_decay=config.weight_decay)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=config.resolved_warmup,
                              num_training_steps=config.steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    rules = adapt.attach_rules(model, optimizer, total_steps=config.steps)
    metric_name = TASKS[config.task]["metric"]
    result = FinetuneResult(config=config.to_dict(), metric_name=metric_name,
                            trainable_parameters=sum(p.numel() for p in params),
                            total_parameters=sum(p.numel() for p in model.parameters()))
    start = 0
    if found is not None:
        loaded = ckpt.load_into(found, optimizer=optimizer, scheduler=scheduler, rules=rules)
        start, result.history = loaded["step"], loaded["history"]
        result.initial_metric = result.history.get("initial_metric")
        result.resumed_from = start
        logger.info("resumed %s at step %d from %s", config.method, start, found)
    eval_kw = {"seq_len": seq_len, "batch_size": batch_size}
    if start == 0 and config.initial_eval:
        result.initial_metric = evaluate(model, data, **eval_kw)
        result.history["initial_metric"] = result.initial_metric
    stop = config.steps if config.stop_after is None else min(config.steps, config.stop_after)
    last_saved: Path | None = None
    history = result.history

    def save(step: int) -> None:
        nonlocal last_saved
        last_saved = ckpt.save(out, step=step, model=model, optimizer=optimizer,
                               scheduler=scheduler, rules=rules, config=config,
                               history=history, keep=config.keep_checkpoints)

    model.train()
    bar = tqdm(total=config.steps, initial=start, unit="step", leave=False,
               desc=f"finetune {config.method} on {config.task}", disable=not config.progress)
    done = start
    with bar, _deferred_interrupt() as interrupted:
        for step in range(start, stop):
            if interrupted:  # Ctrl-C: stop between steps, so the checkpoint below is exact
                logger.warning("interrupted: stopping after step %d", done)
                break
            batch = {k: v.to(accelerator.device)
                     for k, v in task_batch(data, step, batch_size, config.seed).items()}
            t0 = time.perf_counter()
            loss = task_loss(model, batch)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"the training loss became {float(loss)} at step {step}: "
                                         f"lower --lr (now {config.resolved_lr})")
            accelerator.backward(loss)
            if config.grad_clip:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history["step_seconds"].append(time.perf_counter() - t0)
            history["losses"].append(float(loss.detach()))
            history["lrs"].append(float(lr))
            bar.update(1)
            bar.set_postfix(loss=f"{history['losses'][-1]:.3f}", refresh=False)
            done = step + 1
            if done % config.resolved_eval_every == 0 or done == config.steps:
                value = evaluate(model, data, **eval_kw)
                history["evals"].append({"step": done, metric_name: value})
                if config.progress:
                    bar.write(f"step {done}: {metric_name} {value:.4g}")
            if out is not None and config.save_every and done % config.save_every == 0:
                save(done)
    result.steps, result.completed = done, done == config.steps
    evals = history["evals"]
    result.metric = (evals[-1][metric_name] if evals and evals[-1]["step"] == done
                     else evaluate(model, data, **eval_kw))
    result.history = history
    if out is not None:
        if last_saved is None or not last_saved.name.endswith(f"{done:06d}"):
            save(done)
        result.checkpoint = str(last_saved)
        if result.completed:
            _export(accelerator.unwrap_model(model), out)
        write_json(out / "result.json", result.to_dict())
    result.model = accelerator.unwrap_model(model)
    return result
