"""Fine-tune a model with a `rankwise.adapt` method: progress, evaluation, checkpoints, resume.

    from rankwise.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="minilm-l6", task="fortunes", method="lora", rank=8,
                                     steps=200, out="runs/fortunes-lora"))
    result.metric, result.history["losses"], result.trainable_parameters

One step (`FinetuneStep`; transformers' "linear" warmup/decay schedule; AdamW over the
trainable tensors; the adapters' training-time rules hook onto the optimizer through
`rankwise.adapt.attach_rules`, so no method is a special case here):

    loss = task_loss(model, this rank's shard of batch(step)); backward; average over processes
    clip_grad_norm; optimizer.step()   # rules run around it;   scheduler.step();   zero_grad()

The loop around it is `rankwise.train.runner.Runner`: eval/save cadence, the non-finite guard,
Ctrl-C (finishes the current step, checkpoints once and returns with ``interrupted``; a second
Ctrl-C stops at once), TensorBoard (``log_dir``) and OUT/loss.png. Under ``torchrun`` or
``accelerate launch`` each process trains on its shard of the global batch, gradients are
averaged, and rank 0 alone writes (rankwise.train.dist).

Why not `transformers.Trainer`: its checkpoints pickle the optimizer, scheduler and RNG state
(``optimizer.pt``, ``rng_state.pth``: ``torch.load``) and save the whole model; ours hold only
adapter + head tensors as safetensors plus JSON, and a step-indexed data order makes resume
bit-exact without replaying a sampler. Trainer users get the same rules with
``Trainer(..., callbacks=[rankwise.adapt.rules_callback()])`` on an `adapt_`-ed model.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.finetune import full
from rankwise.finetune import state as ckpt
from rankwise.finetune.config import FULL, TASKS, FinetuneConfig
from rankwise.finetune.tasks import (
    TaskData,
    TopicClassifier,
    default_targets,
    evaluate,
    prepare_data,
    task_batch,
    task_loss,
)
from rankwise.io import write_json
from rankwise.train import dist
from rankwise.train.fsdp import StateAccess
from rankwise.train.runner import Runner

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
    interrupted: bool = False
    processes: int = 1
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


class FinetuneStep:
    """The per-step functions of fine-tuning (rankwise.train.runner.StepTask)."""

    def __init__(self, config: FinetuneConfig, model: nn.Module, data: TaskData, optimizer: Any,
                 scheduler: Any, device: torch.device) -> None:
        self.config, self.model, self.data, self.device = config, model, data, device
        self.optimizer, self.scheduler = optimizer, scheduler
        self.clipped = [p for p in model.parameters() if p.requires_grad]
        self.batch_size = config.resolved_batch_size
        self.shard = dist.shard_rows(self.batch_size)

    def set_lr(self, step: int) -> float:
        return float(self.scheduler.get_last_lr()[0])  # the scheduler sets it after each step

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's shard of the batch of `step`, on the device."""
        batch = task_batch(self.data, step, self.batch_size, self.config.seed)
        return {k: v[self.shard].to(self.device) for k, v in batch.items()}

    def forward(self, step: int) -> torch.Tensor:
        return task_loss(self.model, self.batch(step))

    def update(self, step: int, loss: torch.Tensor) -> None:
        loss.backward()
        # every optimizer tensor, including those a rule added (IncreLoRA grows its rank)
        dist.average_gradients(p for g in self.optimizer.param_groups for p in g["params"])
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.clipped, self.config.grad_clip)
        self.optimizer.step()  # the adapters' rules run around it (attach_rules)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device() if dist.active() else 0)
    return torch.device("cpu")


def _load_task_data(config: FinetuneConfig, tokenizer: Any | None) -> TaskData:
    if tokenizer is None:
        from rankwise.models import load_tokenizer

        tokenizer = load_tokenizer(config.model)
    return prepare_data(config.task, tokenizer, seq_len=config.resolved_seq_len,
                        train_tokens=config.train_tokens, eval_tokens=config.eval_tokens,
                        eval_samples=config.eval_samples)


def _adapted_model(config: FinetuneConfig, base: nn.Module | None, data: TaskData,
                   found: Path | None) -> tuple[nn.Module, torch.device]:
    """The task model with its adapters (fresh, or the checkpoint's), on this rank's device,
    equal on every rank."""
    model = build_model(config, base, getattr(data, "num_classes", None))
    head = [n for n, _ in model.named_parameters() if n.startswith("head.")]
    if config.method == FULL:
        full.make_trainable(model)
        head = [n for n, _ in model.named_parameters()]  # every weight is a trainable extra
    if found is not None:
        ckpt.load_adapters(found, model, head)
    elif config.method != FULL:
        _adapt(config, model, data)
        for name, p in model.named_parameters():
            if name in head:
                p.requires_grad_(True)
    device = _device()
    model.to(device)
    dist.broadcast_parameters(model)
    if config.fsdp and dist.active():
        full.shard(model)
    return model, device


def _finish(result: FinetuneResult, runner: Runner, done: int, config: FinetuneConfig,
            model: nn.Module, data: TaskData, eval_kw: dict[str, int], states: StateAccess,
            out: Path | None) -> None:
    """The final metric, the last checkpoint, the export and result.json (rank 0 writes)."""
    metric_name, history = result.metric_name, result.history
    evals = history["evals"]
    result.metric = (evals[-1][metric_name] if evals and evals[-1]["step"] == done
                     else evaluate(model, data, **eval_kw))
    if out is not None:
        if not runner.saved_at(done):
            runner.save(done)
        result.checkpoint = str(runner.last_saved)

        final = states.collect(done) if result.completed and states.sharded else None

        def publish() -> None:
            if result.completed and config.method == FULL:
                full.export_full(model, out, final)
            elif result.completed:
                _export(model, out)
            write_json(out / "result.json", result.to_dict())

        dist.on_rank0(publish)
    runner.finish()


def _run(config: FinetuneConfig, base: nn.Module | None, tokenizer: Any | None,
         data: TaskData | None, resume: bool) -> FinetuneResult:
    from transformers import get_scheduler

    from rankwise import adapt
    from rankwise.train.logs import check_log_dir

    dist.init()
    out = Path(config.out) if config.out is not None else None
    found = ckpt.checkpoint_to_resume(out, resume, resume_flag="--resume", out_flag="--out")
    if found is not None:
        ckpt.check_compatible(ckpt.read_meta(found), config, found)
    check_log_dir(config.log_dir)
    dist.shard_rows(config.resolved_batch_size)  # refuse an uneven split before any work
    data = data if data is not None else _load_task_data(config, tokenizer)
    model, device = _adapted_model(config, base, data, found)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = full.build_optimizer(config, model, param_groups(model, config))
    states = StateAccess(model, optimizer, sharded=config.fsdp and dist.active())
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=config.resolved_warmup,
                              num_training_steps=config.steps)
    rules = adapt.attach_rules(model, optimizer, total_steps=config.steps)
    metric_name = TASKS[config.task]["metric"]
    result = FinetuneResult(config=config.to_dict(), metric_name=metric_name,
                            trainable_parameters=sum(p.numel() for p in params),
                            total_parameters=sum(p.numel() for p in model.parameters()),
                            processes=dist.world_size())
    task = FinetuneStep(config, model, data, optimizer, scheduler, device)
    if states.sharded:
        full.initialise(model, task.batch(0))
    start = 0
    if found is not None:
        loaded = ckpt.load_into(found, optimizer=states.optimizer_loader(), scheduler=scheduler,
                                rules=rules)
        start, result.history = loaded["step"], loaded["history"]
        result.initial_metric = result.history.get("initial_metric")
        result.resumed_from = start
        logger.info("resumed %s at step %d from %s", config.method, start, found)
    eval_kw = {"seq_len": config.resolved_seq_len, "batch_size": config.resolved_batch_size}
    if start == 0 and config.initial_eval:
        result.initial_metric = evaluate(model, data, **eval_kw)
        result.history["initial_metric"] = result.initial_metric
    history = result.history

    def save(step: int, collected: Any) -> Path:
        return ckpt.save(out, step=step, model=model, optimizer=states.optimizer_view(collected),
                         scheduler=scheduler, rules=rules, config=config, history=history,
                         keep=config.keep_checkpoints, rng_ranks=collected.rng_ranks,
                         extras=full.full_state(model, collected) if states.sharded else None)

    runner = Runner(
        total_steps=config.steps, desc=f"finetune {config.method} on {config.task}",
        history=history, eval_fn=lambda step: {metric_name: evaluate(model, data, **eval_kw)},
        eval_every=config.resolved_eval_every, save_fn=save if out is not None else None,
        collect_fn=states.collect, save_every=config.save_every,
        tokens_per_step=config.resolved_batch_size * config.resolved_seq_len,
        log_dir=config.log_dir, png=out / "loss.png" if out is not None else None,
        progress=config.progress, nonfinite_hint=f"lower --lr (now {config.resolved_lr})")
    model.train()
    stop = config.steps if config.stop_after is None else min(config.steps, config.stop_after)
    outcome = runner.run(task, start, stop)
    done = outcome.done
    result.steps, result.completed, result.interrupted = done, done == config.steps, \
        outcome.interrupted
    _finish(result, runner, done, config, model, data, eval_kw, states, out)
    result.model = model
    return result
