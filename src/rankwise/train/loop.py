"""A small pretraining loop: a tiny Llama from scratch with any memory-efficient method.

    from rankwise.train import loop
    result = loop.pretrain(loop.PretrainConfig(method="sltrain", steps=2000, out="runs/sl"))
    result.val_perplexity, result.tokens_per_s, result.memory

One step (the protocol of rankwise.layers.schedules; Maestro adds its truncated forward):

    lr <- peak * jagged_cosine(step)      warmup, cosine to min_lr_ratio; ReLoRA re-warms from 0
    loss = CE(model(x), x)                 [+ CE(model_truncated(x), softmax(model(x)))  Maestro]
    backward; average over processes; clip_grad_norm; schedules.before_step(); optimizer.step();
    schedules(step + 1)

The loop itself (cadence, Ctrl-C, non-finite guard, rank-0 writes, logs) is
`rankwise.train.runner.Runner`; this module supplies the step (`PretrainStep`), the evaluation
and the checkpoint contents. Data: `rankwise.train.data` (the data position is the step);
methods: `rankwise.train.methods`.

Checkpoints (rankwise.train.checkpoint) every `save_every` steps, at the end and on Ctrl-C hold
the model, optimizer, schedules, RNG states and history, so `pretrain(config, resume=True)`
continues bit-exactly: N steps + resume + M steps equals N + M steps uninterrupted. Under
``torchrun`` each process trains on its shard of the global batch (rankwise.train.dist) and
rank 0 alone writes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.train import dist
from rankwise.train.config import PretrainConfig
from rankwise.train.data import PretrainData, batch_rows, load_tokenizer, prepare_data
from rankwise.train.methods import (
    TARGET_MODULES,
    build_model,
    lr_multiplier,
    parameter_counts,
    setup_method,
)

logger = logging.getLogger(__name__)

__all__ = [
    "TARGET_MODULES",
    "PretrainConfig",
    "PretrainData",
    "PretrainResult",
    "batch_rows",
    "build_model",
    "load_tokenizer",
    "lr_multiplier",
    "parameter_counts",
    "prepare_data",
    "pretrain",
    "setup_method",
]


def __getattr__(name: str) -> Any:  # METHODS follows the layer registry (train.config)
    if name == "METHODS":
        from rankwise.train.config import methods

        return methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- result
@dataclass
class PretrainResult:
    """What a run measured. Lists are per update from step 1 (losses: the LM loss only, the mean
    over the global batch; step_seconds: wall time of each update, evaluation and checkpoints
    excluded). `interrupted`: Ctrl-C stopped the run (it saved; resume continues)."""

    config: dict[str, Any]
    steps: int
    tokens: int
    completed: bool
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)
    val_perplexity: float = math.nan
    train_seconds: float = 0.0
    tokens_per_s: float = 0.0
    parameters: dict[str, int] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    schedule_runs: dict[str, list[int]] = field(default_factory=dict)
    resumed_from: int | None = None
    checkpoint: str | None = None
    interrupted: bool = False
    processes: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- the step
class PretrainStep:
    """The per-step functions of pretraining (rankwise.train.runner.StepTask)."""

    def __init__(self, config: PretrainConfig, model: nn.Module, optimizer: Any, schedules: Any,
                 data: PretrainData) -> None:
        self.config, self.model, self.optimizer, self.schedules = config, model, optimizer, schedules
        self.data, self.n_rows = data, data.train.shape[0]
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.shard = dist.shard_rows(config.batch_size)
        self._total: torch.Tensor | None = None

    def set_lr(self, step: int) -> float:
        mult = lr_multiplier(self.config, step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * mult
        return self.base_lrs[0] * mult

    def forward(self, step: int) -> torch.Tensor:
        rows = batch_rows(step, self.config.batch_size, self.n_rows, self.config.seed)
        x = self.data.train[rows[self.shard]]
        out = self.model(input_ids=x, labels=x)
        self._total = out.loss
        if self.schedules.truncates:  # Maestro: ordered-dropout forward distilled from the full one
            from rankwise.layers import MaestroSchedule

            with self.schedules.truncated():
                partial = self.model(input_ids=x).logits
            self._total = out.loss + MaestroSchedule.distillation_loss(out.logits, partial)
        return out.loss

    def update(self, step: int, loss: torch.Tensor) -> None:
        self._total.backward()
        self._total = None
        dist.average_gradients(self.params)
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.schedules.before_step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedules(step + 1)


def _evaluate(model: nn.Module, data: PretrainData, config: PretrainConfig) -> float:
    from rankwise.eval import perplexity

    was_training = model.training
    model.eval()
    try:
        return perplexity(model, None, data.val, seq_len=config.seq_len,
                          batch_size=config.batch_size, progress=False)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- the run
def pretrain(
    config: PretrainConfig,
    *,
    data: PretrainData | None = None,
    tokenizer: Any | None = None,
    resume: bool = False,
) -> PretrainResult:
    """Train `config`'s model with its method; see the module docstring.

    Args:
        config: the run.
        data: ready token ids (skips tokenisation; benchmarks share one PretrainData).
        tokenizer: used to tokenise the corpus when `data` is None, and saved with the export.
        resume: continue from the newest checkpoint in `config.out` (a checkpoint of another
            method or configuration raises ValueError).
    """
    # torch's global RNG (dropout) is seeded from the config inside a fork, so runs are
    # reproducible and the caller's RNG state is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _run(config, data, tokenizer, resume)


def _run(config: PretrainConfig, data: PretrainData | None, tokenizer: Any | None,
         resume: bool) -> PretrainResult:
    from rankwise.train import checkpoint as ckpt
    from rankwise.train import fsdp
    from rankwise.train.logs import check_log_dir

    dist.init()
    out = Path(config.out) if config.out is not None else None
    found = ckpt.checkpoint_to_resume(out, resume, out_flag="config.out")
    if found is not None:
        ckpt.check_compatible(ckpt.read_checkpoint_meta(found), config, found)
    check_log_dir(config.log_dir)
    dist.shard_rows(config.batch_size)  # refuse an uneven split before any work
    fsdp.check(config)
    if data is None:
        data, tokenizer = prepare_data(config, tokenizer)
    model = build_model(config, data.vocab_size, tokenizer if data.vocab_map is None else None)
    model.train()
    shard = fsdp.shard_model if config.fsdp and dist.active() else None
    optimizer, schedules = setup_method(config, model, shard=shard)
    if shard is None:
        dist.broadcast_parameters(model)
    build_tok = tokenizer if data.vocab_map is None else None
    states = fsdp.StateAccess(model, optimizer, sharded=shard is not None,
                              rebuild=lambda: build_model(config, data.vocab_size, build_tok))
    result = PretrainResult(config=config.to_dict(), steps=0, tokens=0, completed=False,
                            processes=dist.world_size())
    start, history = 0, {"losses": [], "lrs": [], "step_seconds": [], "evals": []}
    task = PretrainStep(config, model, optimizer, schedules, data)  # base LRs before a resume
    if found is not None:
        start, history = _resume(found, states, schedules, config, data)
        result.resumed_from = start
        logger.info("resumed %s at step %d from %s", config.method, start, found)
    n_rows = data.train.shape[0]

    def save(step: int, collected: Any) -> Path:
        extra = {"history": _history_out(history),
                 "data": {"rows": n_rows, "samples": step * config.batch_size},
                 **states.extra(collected)}
        return ckpt.save_checkpoint(out, step=step, model=states.model_view(collected),
                                    optimizer=states.optimizer_view(collected),
                                    schedules=schedules, config=config, extra=extra,
                                    keep=config.keep_checkpoints)

    runner = _runner(config, history, out, lambda step: {
        "perplexity": _evaluate(model, data, config)}, save, states)
    stop = config.steps if config.stop_after is None else min(config.steps, config.stop_after)
    outcome = runner.run(task, start, stop)
    done = outcome.done
    result.interrupted = outcome.interrupted
    result.completed = done == config.steps
    _fill_result(result, history, done, config, model, optimizer, schedules, data)
    if out is not None:
        if not runner.saved_at(done):
            runner.save(done)
        result.checkpoint = str(runner.last_saved)
        _publish(result, out, config, model, states, tokenizer, data)
    runner.finish()
    return result


def _runner(config: PretrainConfig, history: dict[str, Any], out: Path | None, eval_fn: Any,
            save: Any, states: Any) -> Any:
    from rankwise.train.runner import Runner

    return Runner(
        total_steps=config.steps, desc=f"pretrain {config.method}", history=history,
        eval_fn=eval_fn, eval_every=config.resolved_eval_every,
        save_fn=save if out is not None else None, collect_fn=states.collect,
        save_every=config.save_every, tokens_per_step=config.batch_size * config.seq_len,
        log_dir=config.log_dir, png=out / "loss.png" if out is not None else None,
        progress=config.progress,
        nonfinite_hint=f"lower the learning rate (now {config.resolved_lr}) or raise "
                       "warmup_steps",
    )


def _history_out(history: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's history record (its historical key "val" for the evaluations)."""
    return {"losses": history["losses"], "lrs": history["lrs"], "val": history["evals"],
            "step_seconds": history["step_seconds"]}


def _resume(found: Path, states: Any, schedules: Any, config: PretrainConfig,
            data: PretrainData) -> tuple[int, dict[str, Any]]:
    from rankwise.train import checkpoint as ckpt

    loaded = ckpt.load_checkpoint(found, model=states.model_loader(),
                                  optimizer=states.optimizer_loader(), schedules=schedules,
                                  config=config)
    extra = loaded["extra"]
    rows = extra["data"]["rows"]
    if rows != data.train.shape[0]:
        raise ValueError(f"{found} was trained on {rows} rows of tokens, this run has "
                         f"{data.train.shape[0]}: resume with the same data and tokenizer")
    states.restore_rank_rng(extra)
    h = extra["history"]
    history = {"losses": h["losses"], "lrs": h["lrs"], "step_seconds": h["step_seconds"],
               "evals": h["val"]}
    return loaded["step"], history


def _fill_result(result: PretrainResult, history: dict[str, Any], done: int,
                 config: PretrainConfig, model: nn.Module, optimizer: Any, schedules: Any,
                 data: PretrainData) -> None:
    from rankwise.train import fsdp

    result.losses, result.lrs = history["losses"], history["lrs"]
    result.step_seconds, result.val = history["step_seconds"], history["evals"]
    result.train_seconds = sum(result.step_seconds)
    result.steps = done
    result.tokens = done * config.batch_size * config.seq_len
    if result.val and result.val[-1]["step"] == done:
        result.val_perplexity = result.val[-1]["perplexity"]
    else:  # an interrupted run reports it but keeps it out of the (resumable) history
        result.val_perplexity = _evaluate(model, data, config)
        if result.completed:
            result.val.append({"step": done, "perplexity": result.val_perplexity})
    result.tokens_per_s = result.tokens / result.train_seconds if result.train_seconds else 0.0
    result.parameters = parameter_counts(model)
    result.memory = fsdp.memory(model, optimizer)  # per process (its shards under FSDP2)
    result.schedule_runs = schedules.runs


def _publish(result: PretrainResult, out: Path, config: PretrainConfig, model: nn.Module,
             states: Any, tokenizer: Any, data: PretrainData) -> None:
    """result.json and (for a completed run) the dense export, written by rank 0."""
    from rankwise.io import write_json
    from rankwise.train import checkpoint as ckpt

    full = states.collect(result.steps) if config.export and result.completed else None

    def write() -> None:
        write_json(out / "result.json", result.to_dict())
        if result.completed and config.export:
            ckpt.export_dense(states.dense_model(full), out / "final", tokenizer=tokenizer,
                              vocab_map=data.vocab_map)

    dist.on_rank0(write)
