"""Healing: a short fine-tune of a factorised model under a wall-clock budget.

Three ways to spend the budget (all keep the factorised structure, so parameters stay reduced):

* ``lora``: LoRA (rankwise.adapt) on the inner `A` and `B` linears of every FactorizedLinear,
  causal-LM loss; merged back into A and B afterwards (each stays (r, in) / (out, r)).
* ``lowrank``: WeLore-style: train only the low-rank factors A, B (WeLore's LRCs); every other
  weight (embeddings, norms, layers kept dense) is frozen; causal-LM loss.
* ``distill``: train the factors against the dense model as teacher (PELA card 9):
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
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers.factorized import FactorizedLinear

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_LR", "HealResult", "distill_loss", "heal_"]

DEFAULT_LR = {"lora": 5e-4, "lowrank": 5e-5, "distill": 5e-5}
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


def _trainable(model: nn.Module, method: str, lora_rank: int, seed: int) -> list[nn.Parameter]:
    layers = _factorized(model)
    if not layers:
        raise ValueError("the model has no factorised layers to heal: compress it first")
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "lora":
        from rankwise.adapt import adapt_

        groups: dict[int, list[str]] = {}  # LoRA rank capped by each factor's smaller side
        for n, layer in layers.items():
            for side in ("A", "B"):
                k = min(lora_rank, *getattr(layer, side).weight.shape)
                groups.setdefault(k, []).append(f"{n}.{side}")
        for k, inner in groups.items():
            adapt_(model, "lora", target_modules=inner, rank=k, alpha=2 * k, seed=seed)
    else:
        for layer in layers.values():
            for p in layer.parameters():
                p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


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
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield windows[order[i:i + batch_size]]


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
) -> HealResult:
    """Fine-tune `model`'s factorised layers in place on `stream` (1-D token ids) within `minutes`.

    Stops at the deadline or after `max_steps`, whichever comes first (`minutes=0` with
    `max_steps`: steps only). LoRA adapters are merged into the factors before returning, so the
    model has exactly the structure it came with. `on_step(step, seconds, loss)` reports progress.
    `batches` (an iterator of (batch, seq_len) ids) replaces the windows of `stream`, and
    `loss_fn(model, ids)` the method's loss (rankwise.pipeline.distill builds both).
    """
    if method not in DEFAULT_LR:
        raise ValueError(f"heal method must be one of {list(DEFAULT_LR)}, got {method!r}")
    if method == "distill" and teacher is None and loss_fn is None:
        raise ValueError("heal method 'distill' needs the dense teacher model: pass teacher=")
    if minutes <= 0 and not max_steps:
        raise ValueError("healing needs a time budget (minutes > 0) or max_steps")
    lr = DEFAULT_LR[method] if lr is None else lr
    params = _trainable(model, method, lora_rank, seed)
    result = HealResult(method=method, lr=lr, trainable=sum(p.numel() for p in params))
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    budget = minutes * 60 if minutes > 0 else float("inf")
    batches = _batches(stream, batch_size, seq_len, seed) if batches is None else batches
    if teacher is not None:
        teacher.eval()
    model.train()
    start = time.perf_counter()
    step_time = 0.0
    losses: list[float] = []
    try:
        while max_steps is None or result.steps < max_steps:
            elapsed = time.perf_counter() - start
            if result.steps and elapsed + step_time > budget:
                break
            frac = max(elapsed / budget if math.isfinite(budget) else 0.0,
                       result.steps / max_steps if max_steps else 0.0)
            for g in opt.param_groups:
                g["lr"] = _lr_at(result.steps, frac, lr)
            ids = next(batches)
            t0 = time.perf_counter()
            if loss_fn is not None:
                loss = loss_fn(model, ids)
            elif method == "distill":
                with torch.no_grad():
                    t_out = teacher(ids, output_hidden_states=bool(distill_alpha))
                s_out = model(ids, output_hidden_states=bool(distill_alpha))
                loss = distill_loss(s_out, t_out, distill_alpha)
            else:
                loss = model(ids, labels=ids).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"healing loss became {loss.item()} at step {result.steps}: "
                                         "lower heal_lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            step_time = dt if not result.steps else 0.8 * step_time + 0.2 * dt
            result.steps += 1
            result.tokens += ids.numel()
            losses.append(loss.item())
            result.curve.append((result.steps, time.perf_counter() - start, losses[-1]))
            if on_step is not None:
                on_step(result.steps, time.perf_counter() - start, losses[-1])
    finally:
        model.eval()
        if method == "lora":
            from rankwise.adapt import merge_and_unload

            merge_and_unload(model)
        for p in model.parameters():
            p.requires_grad_(False)
    result.seconds = time.perf_counter() - start
    k = max(1, min(10, len(losses) // 4))
    if losses:
        result.loss_first = sum(losses[:k]) / k
        result.loss_last = sum(losses[-k:]) / k
    return result
