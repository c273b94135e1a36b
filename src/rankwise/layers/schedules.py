"""Training-time schedules of the layer methods, all through one mechanism: `LayerSchedule`.

A schedule is called once per optimizer step, from any loop:

    sched = schedule_for(model, optimizer, relora={"every": 500})   # or ReLoRASchedule(...)
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        sched.before_step()        # gradient edits (TRP's nuclear subgradient, Maestro's lasso)
        optimizer.step()
        sched()                    # periodic actions, after update number `sched.step`
        optimizer.zero_grad()

or with a transformers Trainer: `Trainer(..., callbacks=[sched.callback()])` (before_step runs
at `on_pre_optimizer_step`, the call at `on_step_end` with `state.global_step`). Each schedule
records the steps at which its periodic action ran (`runs`), and `state_dict()` /
`load_state_dict()` carry its counters and RNG for exact resume (the layers' own state - SST's
sampled set, Maestro's kept ranks, TRP's rank, ReLoRA's restarts - lives in their buffers).

| schedule (defined next to its layer) | periodic action (after update k * every) | before_step | paper |
|---|---|---|---|
| relora.ReLoRASchedule | merge (alpha/r) B A into W, re-init, reset A/B optimizer state | - | Lialin et al. 2023 |
| refactor.RefactorSchedule | rebalance (B, A) of factorised layers, reset their moments | - | (rankwise) |
| sst.SSTSchedule | resample the trained singular vectors; re-SVD every `svd_every` | - | Zhao et al. 2024 |
| trp.TRPSchedule | project W to its energy rank | + lambda U_k V_k^T | Xu et al. 2020 |
| maestro.MaestroSchedule | progressive shrinking; every step: draw (layer, rank) | + lambda grad GL | Horváth et al. 2024 |

Each schedule's module docstring gives its paper and the update it implements. The shared
optimizer-state reset (ReLoRA's full / magnitude / random) and the jagged cosine LR that re-warms
from 0 after each reset live in `rankwise.layers.restarts` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from rankwise.layers.restarts import _unwrap, jagged_cosine, quantile_linear, reset_optimizer_state_
from rankwise.linalg import make_generator

logger = logging.getLogger(__name__)

__all__ = [
    "LayerSchedule",
    "Schedules",
    "jagged_cosine",
    "quantile_linear",
    "reset_optimizer_state_",
    "schedule_for",
]

# schedule class -> module that defines it (next to its layer); re-exported lazily here
_DEFINED_IN = {
    "ReLoRASchedule": "rankwise.layers.relora",
    "RefactorSchedule": "rankwise.layers.refactor",
    "SSTSchedule": "rankwise.layers.sst",
    "TRPSchedule": "rankwise.layers.trp",
    "MaestroSchedule": "rankwise.layers.maestro",
}
_BY_METHOD = {
    "relora": "ReLoRASchedule",
    "sst": "SSTSchedule",
    "trp": "TRPSchedule",
    "maestro": "MaestroSchedule",
}


def __getattr__(name: str) -> Any:
    if name in _DEFINED_IN:
        return getattr(importlib.import_module(_DEFINED_IN[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_every(every: int | None, name: str = "every") -> int | None:
    if every is None:
        return None
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{name} must be a positive int (steps) or None, got {every!r}")
    return every


class _Callbacks:
    """`callback()`: the same object as a transformers TrainerCallback."""

    def callback(self) -> Any:
        from transformers import TrainerCallback

        schedule = self

        class LayerScheduleCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
                if optimizer is not None and getattr(schedule, "optimizer", None) is None:
                    schedule.bind(optimizer)

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                schedule.before_step()

            def on_step_end(self, args, state, control, **kwargs):
                schedule(state.global_step)

        return LayerScheduleCallback()


class LayerSchedule(_Callbacks):
    """Base: acts on the model's layers of `layer_type` after every `every`-th update.

    Args:
        model: the converted model.
        every: period in optimizer steps (None: no periodic action).
        optimizer: needed by schedules that reset optimizer state; can be bound later.
        seed: seeds the schedule's own CPU generator (restarts, sampling).

    Attributes:
        step: updates seen (the last value passed to / counted by `__call__`).
        runs: the steps at which the periodic action ran.
    """

    layer_type: type | tuple[type, ...] = nn.Module
    method = ""
    needs_optimizer = False

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int | None,
        optimizer: object | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.layers = self._find(model)
        self.every = _check_every(every)
        self.generator = make_generator(int(seed))
        self.step = 0
        self.runs: list[int] = []
        self.optimizer: torch.optim.Optimizer | None = None
        if optimizer is not None:
            self.bind(optimizer)

    def _find(self, model: nn.Module) -> dict[str, nn.Module]:
        layers = {n: m for n, m in model.named_modules() if n and isinstance(m, self.layer_type)}
        if not layers:
            raise ValueError(
                f"{type(self).__name__} found no {self.method!r} layers in the model: "
                f"convert it first with rankwise.layers.convert_(model, {self.method!r}, ...)"
            )
        return layers

    def _params(self) -> list[torch.Tensor]:
        """The parameters whose optimizer state the periodic action resets."""
        return [p for layer in self.layers.values() for p in layer.parameters() if p.requires_grad]

    def bind(self, optimizer: object) -> LayerSchedule:
        """Attach the optimizer (unwrapping Accelerate/Trainer wrappers); checks it holds the layers."""
        inner = _unwrap(optimizer)
        held = {id(p) for group in inner.param_groups for p in group["params"]}
        missing = [p for p in self._params() if id(p) not in held]
        if missing:
            raise ValueError(
                f"the optimizer does not hold {len(missing)} trainable tensors of the {self.method!r} "
                "layers: build it from [p for p in model.parameters() if p.requires_grad]"
            )
        self.optimizer = inner
        return self

    @property
    def ran(self) -> bool:
        return bool(self.runs)

    def before_step(self) -> None:
        """Gradient edits between backward and optimizer.step() (default: none)."""

    def __call__(self, step: int | None = None) -> bool:
        """Register one finished update (`step` = updates done so far); True if the action ran."""
        self.step = self.step + 1 if step is None else int(step)
        self.every_step()
        if self.every is not None and self.step > 0 and self.step % self.every == 0:
            if self.needs_optimizer and self.optimizer is None:
                raise ValueError(
                    f"{type(self).__name__} must reset optimizer state: pass optimizer=... or "
                    "call .bind(optimizer) before training"
                )
            self.run()
            self.runs.append(self.step)
            logger.debug("%s ran at step %d", type(self).__name__, self.step)
            return True
        return False

    def every_step(self) -> None:
        """Work done after every update (default: none)."""

    def run(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """{"step", "runs", "rng" (uint8 tensor)}: JSON-able except "rng"."""
        return {"step": self.step, "runs": list(self.runs), "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.runs = [int(s) for s in state["runs"]]
        self.generator.set_state(state["rng"])


class Schedules(_Callbacks):
    """Several schedules run as one (same call protocol); `runs` maps class name -> steps."""

    def __init__(self, schedules: list[LayerSchedule]) -> None:
        self.schedules = list(schedules)
        self.optimizer = None

    def bind(self, optimizer: object) -> Schedules:
        for s in self.schedules:
            if s.optimizer is None:
                s.bind(optimizer)
        self.optimizer = _unwrap(optimizer)
        return self

    def before_step(self) -> None:
        for s in self.schedules:
            s.before_step()

    def __call__(self, step: int | None = None) -> bool:
        return any([s(step) for s in self.schedules])  # a list: every schedule runs

    @property
    def runs(self) -> dict[str, list[int]]:
        return {type(s).__name__: list(s.runs) for s in self.schedules}

    def __getitem__(self, name: str) -> LayerSchedule:
        for s in self.schedules:
            if type(s).__name__ == name:
                return s
        raise KeyError(f"no {name} here; schedules: {[type(s).__name__ for s in self.schedules]}")

    @property
    def truncates(self) -> bool:
        """True when a member (Maestro) wants a second, truncated forward per step."""
        return any(hasattr(s, "truncated") for s in self.schedules)

    @contextlib.contextmanager
    def truncated(self) -> Iterator[None]:
        """Enter every member's `truncated()` (Maestro's sampled rank); a no-op otherwise."""
        with contextlib.ExitStack() as stack:
            for s in self.schedules:
                if hasattr(s, "truncated"):
                    stack.enter_context(s.truncated())
            yield

    def state_dict(self) -> dict[str, Any]:
        return {type(s).__name__: s.state_dict() for s in self.schedules}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = sorted(type(s).__name__ for s in self.schedules)
        if sorted(state) != names:
            raise ValueError(
                f"checkpoint holds schedules {sorted(state)} but this run has {names}: resume with "
                "the same method and schedule options"
            )
        for s in self.schedules:
            s.load_state_dict(state[type(s).__name__])


def schedule_for(
    model: nn.Module,
    optimizer: object | None = None,
    *,
    refactor: dict[str, Any] | None = None,
    seed: int = 0,
    **options: dict[str, Any],
) -> Schedules:
    """The schedules the model's layer methods need (ReLoRA, SST, TRP, Maestro), as one.

    Args:
        refactor: options of a RefactorSchedule (e.g. {"every": 1000}) to add weight
            refactorisation to factorised / SLTrain / LOST layers; None: none.
        **options: per-method options, e.g. relora={"every": 500}, trp={"lam": 0.0}.
    """
    from rankwise.layers._base import method_of

    present = method_of(model)
    unknown = sorted(set(options) - set(_BY_METHOD))
    if unknown:
        raise ValueError(
            f"no schedule for {unknown}: options are accepted for {sorted(_BY_METHOD)}"
        )
    schedules: list[LayerSchedule] = []
    for method, cls_name in _BY_METHOD.items():
        cls = __getattr__(cls_name)
        if method in present:
            schedules.append(cls(model, optimizer, seed=seed, **options.get(method, {})))
        elif method in options:
            raise ValueError(f"options given for {method!r} but the model has no {method!r} layers")
    if refactor is not None:
        cls = __getattr__("RefactorSchedule")
        schedules.append(cls(model, optimizer, seed=seed, **refactor))
    return Schedules(schedules)
