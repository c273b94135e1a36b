"""What restarting low-rank training needs besides the merge: optimizer-state resets and a
jagged cosine learning rate (Lialin et al. 2023, "ReLoRA: High-rank training through low-rank
updates", Section 3).

After ReLoRA merges W <- W + (alpha/r) B A and re-initialises (B, A), the Adam moments of B and A
belong to the old factors; ReLoRA prunes them: "full" zeroes them, "magnitude" keeps only the
largest `1 - ratio` fraction by magnitude, "random" zeroes a random `ratio` fraction. The learning
rate then re-warms from 0 after every restart (the jagged schedule) so the fresh factors are not
hit by a full-size step on near-empty moments. SST and the factorised-layer rebalancing reuse the
same reset for the factors they replace.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch


# ----------------------------------------------------------------------------- optimizer state
def _unwrap(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's / Trainer's wrappers."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"expected a torch optimizer, got {type(optimizer).__name__}")
    return inner


def quantile_linear(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x.flatten(), q) (linear interpolation) for tensors of any size, in fp32."""
    flat = x.detach().flatten().float().sort().values
    pos = q * (flat.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, flat.numel() - 1)
    return flat[lo] + (pos - lo) * (flat[hi] - flat[lo])


@torch.no_grad()
def reset_optimizer_state_(
    optimizer: object,
    params: Iterable[torch.Tensor],
    *,
    mode: Literal["full", "magnitude", "random"] = "full",
    ratio: float = 0.9,
    reset_step: bool = False,
    generator: torch.Generator | None = None,
) -> int:
    """Reset the optimizer state of `params` (ReLoRA's three reset types, Lialin et al. 2023, Section 3).

    Args:
        optimizer: a torch optimizer (Accelerate/Trainer wrappers are unwrapped).
        params: the parameters whose state to reset; others are untouched.
        mode: "full" zeros every floating state tensor (exp_avg, exp_avg_sq, ...); "magnitude"
            zeros the entries with |x| <= quantile(|x|, ratio) (linear interpolation, as the
            reference `magnitude_pruning`: with N distinct magnitudes floor(ratio (N-1)) + 1
            become zero); "random" zeros each entry with probability `ratio`.
        ratio: the pruned fraction for "magnitude" / "random", in (0, 1).
        reset_step: also set the step counter to 0 (then the next update is an Adam first step,
            as rebuilding the optimizer would give; the ReLoRA reference keeps the counter).
        generator: for "random".

    Returns:
        The number of state entries set to zero.
    """
    if mode not in ("full", "magnitude", "random"):
        raise ValueError(f"mode must be 'full', 'magnitude' or 'random', got {mode!r}")
    if mode != "full" and not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"ratio must lie strictly between 0 and 1 for mode={mode!r}, got {ratio}")
    state = _unwrap(optimizer).state
    zeroed = 0
    for p in params:
        entry = state.get(p)
        if not entry:
            continue
        for key, value in entry.items():
            if key == "step":
                continue
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                continue
            if mode == "full":
                keep = torch.zeros_like(value, dtype=torch.bool)
            elif mode == "magnitude":
                keep = value.abs().float() > quantile_linear(value.abs(), float(ratio)).to(
                    value.device
                )
            else:
                draw = torch.rand(value.shape, generator=generator).to(value.device)
                keep = draw >= float(ratio)
            zeroed += int((~keep).sum())
            value.mul_(keep.to(value.dtype))
        if reset_step and "step" in entry:
            step = entry["step"]
            entry["step"] = torch.zeros_like(step) if isinstance(step, torch.Tensor) else 0
    return zeroed


# ----------------------------------------------------------------------------- jagged LR
def jagged_cosine(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    restart_every: int | None = None,
    restart_warmup_steps: int = 0,
    min_ratio: float = 0.1,
) -> float:
    """LR multiplier for update `step` (0-based): cosine with warmup, re-warmed after restarts.

    The envelope is `min_ratio + (1 - min_ratio) (1 + cos(pi progress)) / 2` after a linear
    warmup. With `restart_every` = T (ReLoRA's `cosine_restarts`, the benchmark paper's
    `cosine_quick_recovery`), the multiplier is 0 at every update k T (k >= 1; the first update
    after a merge/reset) and climbs linearly to meet the envelope at k T + restart_warmup_steps.
    Use it through `torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(jagged_cosine,
    total_steps=..., ...))`; a LayerSchedule called after update k T lines up with it.
    """
    if total_steps < 1 or warmup_steps < 0 or restart_warmup_steps < 0:
        raise ValueError(
            f"need total_steps >= 1 and non-negative warmups, got {total_steps}, {warmup_steps}, "
            f"{restart_warmup_steps}"
        )
    if restart_every is not None and restart_every <= restart_warmup_steps:
        raise ValueError(
            f"restart_every ({restart_every}) must exceed restart_warmup_steps ({restart_warmup_steps})"
        )

    def envelope(t: int) -> float:
        if t < warmup_steps:
            return t / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (t - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    if restart_every and step >= restart_every and restart_warmup_steps:
        since = step % restart_every
        if since < restart_warmup_steps:
            start = step - since
            return since / restart_warmup_steps * envelope(start + restart_warmup_steps)
    return envelope(step)
