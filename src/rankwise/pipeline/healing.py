"""Healing: a short fine-tune of a factorised model under a wall-clock budget.

Three ways to spend the budget (all keep the factorised structure, so parameters stay reduced):

* ``lora``: LoRA (rankwise.adapt) on the inner `A` and `B` linears of every FactorizedLinear,
  causal-LM loss; merged back into A and B afterwards (each stays (r, in) / (out, r)).
* ``lowrank``: WeLore-style: train only the low-rank factors A, B (WeLore's LRCs); every other
  weight (embeddings, norms, layers kept dense) is frozen; causal-LM loss.
* ``distill``: train the factors against the dense model as teacher (PELA, Guo et al. 2023):
  `KL(p_teacher || p_student)` on the next-token distributions plus `distill_alpha` times the
  feature loss, the mean over blocks of `MSE(h_s, h_t) / mean(h_t^2)` (PELA's block-feature
  MSE, normalised per block because LLM hidden-state scales differ by orders of magnitude
  across depth).

The budget is enforced: a step starts only if the running mean step time says it ends before
the deadline. The learning rate warms up linearly over the first `WARMUP_STEPS` steps (Adam's
first steps are sign-like: without warm-up they damage the compressed model) and decays by a
cosine of the elapsed fraction of the budget to 10 % at the deadline, so any budget is a
complete schedule.
Optimizer: torch AdamW (betas 0.9/0.95, no weight decay); plain AdamW beats the GaLore family
here because the trainable factors are already low-rank and small.

Methods are entries of ``registry("healing")`` (a `HealMethod`: what trains, the loss, what
happens after; ``none`` skips healing); a caller may pass its own `loss_fn`. The loop is
`rankwise.train.runner.Runner` (non-finite guard, Ctrl-C deferral, TensorBoard, loss PNG) with
the budget as its `keep_going` test.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers.factorized import FactorizedLinear
from rankwise.linalg import make_generator
from rankwise.registry import registry
from rankwise.train import dist
from rankwise.train.runner import Runner

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_LR", "HealMethod", "HealResult", "distill_loss", "heal_", "lm_loss"]

WARMUP_STEPS = 10
FLOOR = 0.1


@dataclass
class HealResult:
    """What healing did: steps, tokens, seconds, losses (first/last window means) and the curve."""

    method: str
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    lr: float = 0.0
    trainable: int = 0
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, seconds, loss)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _factorized(model: nn.Module) -> dict[str, FactorizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def _factors_trainable(model: nn.Module, lora_rank: int, seed: int) -> None:
    """lowrank / distill: the factors A and B of every FactorizedLinear train."""
    for layer in _factorized(model).values():
        for p in layer.parameters():
            p.requires_grad_(True)


def _lora_on_factors(model: nn.Module, lora_rank: int, seed: int) -> None:
    """lora: LoRA on the inner A and B linears, rank capped by each factor's smaller side."""
    from rankwise.adapt import adapt_

    groups: dict[int, list[str]] = {}
    for n, layer in _factorized(model).items():
        for side in ("A", "B"):
            k = min(lora_rank, *getattr(layer, side).weight.shape)
            groups.setdefault(k, []).append(f"{n}.{side}")
    for k, inner in groups.items():
        adapt_(model, "lora", target_modules=inner, rank=k, alpha=2 * k, seed=seed)


def _merge_lora(model: nn.Module) -> None:
    from rankwise.adapt import merge_and_unload

    merge_and_unload(model)


def lm_loss(model: nn.Module, ids: torch.Tensor, teacher: nn.Module | None = None,
            distill_alpha: float = 0.0) -> torch.Tensor:
    """The causal-LM loss of `model` on `ids` (labels = inputs)."""
    return model(ids, labels=ids).loss


def distill_step_loss(model: nn.Module, ids: torch.Tensor, teacher: nn.Module | None = None,
                      distill_alpha: float = 1.0) -> torch.Tensor:
    """`distill_loss` of the student against the teacher's outputs on `ids`."""
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=bool(distill_alpha))
    s_out = model(ids, output_hidden_states=bool(distill_alpha))
    return distill_loss(s_out, t_out, distill_alpha)


#: the loss-function signature of a healing method: (student, ids, teacher, alpha) -> scalar
LossFn = Callable[[nn.Module, torch.Tensor, "nn.Module | None", float], torch.Tensor]


@dataclass(frozen=True)
class HealMethod:
    """One healing method: what trains (`prepare`), its loss, what happens after (`finish`)."""

    prepare: Callable[[nn.Module, int, int], None] | None
    loss: LossFn | None
    lr: float | None
    finish: Callable[[nn.Module], None] | None = None
    needs_teacher: bool = False


_HEALING = registry("healing")
_HEALING.register("lora", HealMethod(_lora_on_factors, lm_loss, 5e-4, _merge_lora),
                  summary="LoRA on the factors A and B, causal-LM loss; merged back afterwards")
_HEALING.register("lowrank", HealMethod(_factors_trainable, lm_loss, 5e-5),
                  summary="train only the low-rank factors (WeLore's LRCs), causal-LM loss")
_HEALING.register("distill", HealMethod(_factors_trainable, distill_step_loss, 5e-5,
                                        needs_teacher=True),
                  summary="train the factors against the dense teacher: KL + block-feature MSE")
_HEALING.register("none", HealMethod(None, None, None), summary="no healing")

#: default peak learning rate per trainable healing method
DEFAULT_LR = {n: e.target.lr for n in _HEALING.names() if (e := _HEALING.get(n)).target.lr}


def _lr_at(step: int, frac: float, lr: float) -> float:
    """Learning rate of step `step` (0-based) at fraction `frac` of the budget."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    t = min(max(frac, 0.0), 1.0)
    return lr * warm * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * t)))


def distill_loss(student_out: Any, teacher_out: Any, alpha: float) -> torch.Tensor:
    """KL(teacher || student) per token + alpha * mean over blocks of normalised feature MSE."""
    s = F.log_softmax(student_out.logits[:, :-1].float(), dim=-1)
    t = F.log_softmax(teacher_out.logits[:, :-1].float(), dim=-1)
    kl = F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean")
    if not alpha:
        return kl
    hs, ht = student_out.hidden_states[1:], teacher_out.hidden_states[1:]
    fm = torch.stack([F.mse_loss(a.float(), b.float()) / b.float().pow(2).mean().clamp_min(1e-8)
                      for a, b in zip(hs, ht, strict=True)]).mean()
    return kl + alpha * fm


def _batches(stream: torch.Tensor, batch_size: int, seq_len: int, seed: int):
    """Endless shuffled batches (batch_size, seq_len) of non-overlapping windows of `stream`."""
    n = stream.numel() // seq_len
    if n < batch_size:
        raise ValueError(f"the healing text has {stream.numel()} tokens, fewer than one batch of "
                         f"{batch_size} x {seq_len}: lower heal_batch_size / heal_seq_len or pass more text")
    windows = stream[: n * seq_len].view(n, seq_len)
    gen = make_generator(seed)  # one seeded-generator helper (rankwise.linalg)
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield windows[order[i:i + batch_size]]


class HealStep:
    """The per-step functions of healing (rankwise.train.runner.StepTask).

    The LR's budget fraction is rank 0's (broadcast), so every process runs the same schedule.
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], loss: LossFn, *,
                 teacher: nn.Module | None, distill_alpha: float, lr: float, batches: Any,
                 budget: float, max_steps: int | None, batch_size: int,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.model, self.params, self.loss_fn, self.teacher = model, params, loss, teacher
        self.alpha, self.lr, self.batches = distill_alpha, lr, batches
        self.budget, self.max_steps = budget, max_steps
        self.opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.shard = dist.shard_rows(batch_size)
        self.clock = clock
        self.start = clock()

    def set_lr(self, step: int) -> float:
        elapsed = self.clock() - self.start
        frac = max(elapsed / self.budget if math.isfinite(self.budget) else 0.0,
                   step / self.max_steps if self.max_steps else 0.0)
        lr = _lr_at(step, dist.from_rank0(frac), self.lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr

    def forward(self, step: int) -> torch.Tensor:
        ids = next(self.batches)[self.shard]
        return self.loss_fn(self.model, ids, self.teacher, self.alpha)

    def update(self, step: int, loss: torch.Tensor) -> None:
        loss.backward()
        dist.average_gradients(self.params)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _check(model: nn.Module, method: Any, has_teacher: bool, minutes: float,
           max_steps: int | None) -> Any:
    """The registry entry of `method`, after refusing bad arguments (before any work)."""
    entry = _HEALING.get(method) if isinstance(method, str) and method in _HEALING else None
    if entry is None or entry.target.loss is None:
        raise ValueError(f"heal method must be one of {list(DEFAULT_LR)}, got {method!r}")
    if entry.target.needs_teacher and not has_teacher:  # a custom loss_fn brings its own
        raise ValueError(f"heal method {method!r} needs the dense teacher model: pass teacher=")
    if minutes <= 0 and not max_steps:
        raise ValueError("healing needs a time budget (minutes > 0) or max_steps")
    if not _factorized(model):
        raise ValueError("the model has no factorised layers to heal: compress it first")
    return entry


def heal_(
    model: nn.Module,
    stream: torch.Tensor,
    *,
    method: str = "lowrank",
    minutes: float = 15.0,
    max_steps: int | None = None,
    teacher: nn.Module | None = None,
    lr: float | None = None,
    batch_size: int = 4,
    seq_len: int = 256,
    lora_rank: int = 16,
    distill_alpha: float = 1.0,
    seed: int = 0,
    on_step: Callable[[int, float, float], None] | None = None,
    batches: Iterator[torch.Tensor] | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    log_dir: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> HealResult:
    """Fine-tune `model`'s factorised layers in place on `stream` (1-D token ids) within `minutes`.

    Stops at the deadline or after `max_steps`, whichever comes first (`minutes=0` with
    `max_steps`: steps only). LoRA adapters are merged into the factors before returning, so the
    model has exactly the structure it came with. `on_step(step, seconds, loss)` reports progress.
    `method` is a name of registry("healing"); `batches` (an iterator of (batch, seq_len) ids)
    replaces the windows of `stream`, and `loss_fn(model, ids)` the method's loss (pluggable
    distillation losses: rankwise.pipeline.distill). `log_dir`: TensorBoard scalars and
    loss.png there. `clock` measures the budget: the wall clock by default, `time.process_time`
    for CPU seconds of this process (equal compute when comparing healings on a shared machine,
    where `minutes` then means CPU-minutes). Under ``torchrun`` each process heals on its shard of every batch (the
    batch size is global) with gradients averaged, so all replicas stay equal.
    """
    entry = _check(model, method, teacher is not None or loss_fn is not None, minutes, max_steps)
    spec: HealMethod = entry.target
    dist.init()
    dist.shard_rows(batch_size)  # refuse an uneven split before any work
    lr = spec.lr if lr is None else lr
    for p in model.parameters():
        p.requires_grad_(False)
    spec.prepare(model, lora_rank, seed)
    dist.broadcast_parameters(model)  # replicas start equal, whatever each process loaded
    params = [p for p in model.parameters() if p.requires_grad]
    result = HealResult(method=entry.name, lr=lr, trainable=sum(p.numel() for p in params))
    budget = minutes * 60 if minutes > 0 else float("inf")
    loss = spec.loss if loss_fn is None else (lambda m, ids, t, a: loss_fn(m, ids))
    task = HealStep(model, params, loss, teacher=teacher, distill_alpha=distill_alpha, lr=lr,
                    batches=_batches(stream, batch_size, seq_len, seed) if batches is None
                    else batches, budget=budget,
                    max_steps=max_steps, batch_size=batch_size, clock=clock)

    def keep_going(steps: int, elapsed: float, step_time: float) -> bool:
        over = steps > 0 and elapsed + step_time > budget
        return (max_steps is None or steps < max_steps) and not over

    def record(step: int, seconds: float, loss: float) -> None:
        result.curve.append((step, seconds, loss))
        if on_step is not None:
            on_step(step, seconds, loss)

    runner = Runner(total_steps=max_steps or 0, desc=f"heal ({entry.name})", keep_going=keep_going,
                    on_step=record, tokens_per_step=batch_size * seq_len, log_dir=log_dir,
                    png=Path(log_dir) / "loss.png" if log_dir else None, progress=False,
                    nonfinite_hint="lower heal_lr", clock=clock)
    if teacher is not None:
        teacher.eval()
    model.train()
    try:
        outcome = runner.run(task, 0, None)
    finally:
        runner.finish()
        model.eval()
        if spec.finish is not None:
            spec.finish(model)
        for p in model.parameters():
            p.requires_grad_(False)
    if outcome.interrupted:  # nothing to save: the caller's Ctrl-C stops it, model consistent
        raise KeyboardInterrupt
    result.steps, result.tokens = outcome.done, outcome.done * batch_size * seq_len
    result.seconds = clock() - task.start
    _loss_windows(result, runner.history["losses"])
    return result


def _loss_windows(result: HealResult, losses: list[float]) -> None:
    """Mean loss of the first and last windows (a quarter of the steps, 1 to 10)."""
    k = max(1, min(10, len(losses) // 4))
    if losses:
        result.loss_first = sum(losses[:k]) / k
        result.loss_last = sum(losses[-k:]) / k
