"""Layer-wise updates during backward: full gradients never all exist at once (GaLore §4.2).

Each parameter gets a ``register_post_accumulate_grad_hook`` that, as soon as its gradient is
final, runs the optimizer's update for that one parameter (`LowRankOptimizer.step_param`) and
frees the gradient. Peak memory then holds one layer's gradient instead of the model's.

Differences from the official GaLore script (Zhao et al. 2024, §4.2), on purpose:

* one optimizer (one state dict, one scheduler) instead of one optimizer per parameter, so
  ``state_dict()``/resume and LR schedulers work unchanged; the scheduler is stepped once per
  training step by the caller (the official script doubled every step count instead);
* gradient accumulation works: with ``accumulation_steps=k`` the update runs on every k-th
  backward (the gradient then lives across the k micro-batches, as it must);
* ``optimizer.step()`` stays callable and is a no-op for parameters already updated.

Limits (documented, not silent): global gradient clipping sees no gradients (clip per layer
inside a closure of your own if needed); DDP and FSDP all-reduce gradients *after* these
hooks would fire, so use plain ``step()`` under them (`attach` refuses DTensor parameters).
"""

from __future__ import annotations

from typing import Any

import torch

from rankwise.optim import distributed as dist_


class LayerwiseUpdates:
    """Hooks that update each parameter of `optimizer` during backward.

    Args:
        optimizer: a `LowRankOptimizer` (anything with ``step_param(p, group)``).
        accumulation_steps: backward passes per update (gradient accumulation).

    Use as a context manager or call `remove()`:

        >>> with LayerwiseUpdates(opt):
        ...     for batch in loader:
        ...         model(**batch).loss.backward()   # updates happen here
        ...         scheduler.step()
    """

    def __init__(self, optimizer: Any, *, accumulation_steps: int = 1) -> None:
        if not hasattr(optimizer, "step_param"):
            raise TypeError(
                f"{type(optimizer).__name__} has no step_param(p, group): layer-wise updates "
                "need a rankwise.optim.LowRankOptimizer"
            )
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.optimizer = optimizer
        self.accumulation_steps = int(accumulation_steps)
        self._counts: dict[int, int] = {}
        self._handles: list[Any] = []
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if dist_.is_dtensor(p):
                    raise ValueError(
                        "layer-wise updates cannot run on FSDP2 (DTensor) parameters: the "
                        "gradient is reduce-scattered after the hook; call optimizer.step()"
                    )
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook(index)))

    def _hook(self, index: int) -> Any:
        # The group is looked up at call time: load_state_dict replaces the group dicts and
        # schedulers write the lr into the current ones.
        def hook(p: torch.Tensor) -> None:
            n = self._counts.get(id(p), 0) + 1
            self._counts[id(p)] = n
            if n % self.accumulation_steps:
                return
            with torch.no_grad():
                self.optimizer.step_param(p, self.optimizer.param_groups[index])
            p.grad = None

        return hook

    def remove(self) -> None:
        """Remove every hook (the optimizer goes back to plain ``step()`` use)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> LayerwiseUpdates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
