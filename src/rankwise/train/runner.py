"""One training runner for pretraining, fine-tuning and healing; the tasks supply the step.

The runner owns what every training loop needs and nothing that differs between them:

* the step range (from the resumed step to `stop`, `keep_going` for a wall-clock budget),
* the **non-finite guard**: a step whose loss is NaN/inf (on any rank) raises
  FloatingPointError *before* backward, so the weights and the last checkpoint stay good,
* the **history** (loss, lr, seconds per step, evaluations) and the **progress** bar,
* the **eval / save cadence** (every `eval_every` / `save_every` steps),
* **Ctrl-C deferral**: a first SIGINT (or a launcher's SIGTERM) finishes the current step, then
  the run stops and the task saves once; a second one interrupts at once. Under several
  processes the flag is OR-ed over ranks each step, so a signal to any rank stops all at the
  same step,
* **rank 0 writes**: checkpoints go through `dist.on_rank0` between barriers, TensorBoard and
  the loss-curve PNG only on rank 0,
* **logs**: TensorBoard scalars (`logs.RunLog`) and OUT/loss.png at the end and at saves
  (at most once a minute, none in the first minute).

A task is any object with the three per-step functions of `StepTask`:

    lr = task.set_lr(step)            # this step's learning rate (set on the optimizer)
    loss = task.forward(step)         # the loss of this rank's shard of the step's batch
    task.update(step, loss)           # backward, average gradients, clip, optimizer step, ...

Everything else (what is evaluated, what a checkpoint holds, the result record) stays in the
task's own module: rankwise.train.loop (pretraining), rankwise.finetune.loop and
rankwise.pipeline.healing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from rankwise.train import dist
from rankwise.train.logs import RunLog, write_loss_png

logger = logging.getLogger(__name__)

__all__ = ["Runner", "RunOutcome", "StepTask", "deferred_interrupt", "new_history"]

_SAME_INTERRUPT_S = 2.0


class StepTask(Protocol):
    """The per-task step functions the runner calls (see the module docstring)."""

    def set_lr(self, step: int) -> float: ...

    def forward(self, step: int) -> torch.Tensor: ...

    def update(self, step: int, loss: torch.Tensor) -> None: ...


def new_history() -> dict[str, list[Any]]:
    """An empty history: per-step losses, lrs, step_seconds and the evaluations."""
    return {"losses": [], "lrs": [], "step_seconds": [], "evals": []}


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[list[bool]]:
    """While active, a first SIGINT (and, under a launcher, SIGTERM) only sets a flag (a truthy
    list) that the runner checks between steps; a second one raises KeyboardInterrupt.
    Handlers are installed only in the main thread and restored on exit.

    A signal within `_SAME_INTERRUPT_S` of the first counts as the same one: on Ctrl-C in a
    terminal every process of the foreground group gets SIGINT, and ``torchrun`` then forwards
    its own SIGINT to the workers (and waits 30 s before SIGKILL), which must not skip the save."""
    flag: list[float] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if flag:
            if now - flag[0] > _SAME_INTERRUPT_S:
                raise KeyboardInterrupt
            return  # the launcher forwarding the terminal's Ctrl-C: the same interruption
        flag.append(now)
        logger.warning("interrupted: finishing this step, then saving (interrupt again to stop "
                       "at once)")

    signals = [signal.SIGINT] + ([signal.SIGTERM] if dist.active() else [])
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield flag
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@dataclass
class RunOutcome:
    """How the loop ended: steps done, whether Ctrl-C stopped it, the last checkpoint written."""

    done: int
    interrupted: bool = False
    last_saved: Path | None = None


@dataclass
class Runner:
    """The loop around a `StepTask` (see the module docstring).

    Args:
        total_steps: the run's planned length (the schedule's and progress bar's end).
        desc: progress-bar label.
        history: the (possibly resumed) history the runner appends to (`new_history`).
        eval_fn: returns {metric: value} of the model at a step, or None for no evaluation.
        eval_every: evaluation period (also after the last planned step).
        save_fn: (step, collected) -> the checkpoint directory it wrote (called on rank 0).
        collect_fn: step -> what the checkpoint needs from every rank (gathered states, per-rank
            RNG), called on all ranks before `save_fn` (collectives must run everywhere).
        save_every: checkpoint period (None: only when the task saves at the end).
        keep_going: (steps done, seconds elapsed, recent step seconds) -> bool; False stops
            (healing's wall-clock budget). Rank 0's answer counts for every rank.
        tokens_per_step: global tokens per step, for the throughput log.
        log_dir: TensorBoard directory (None: no event files).
        png: loss-curve PNG written by `finish` and at saves once `png_every_s` seconds have
            passed since the start or the last drawing (None: none); drawing one costs
            ~0.1-0.2 s, most of a short run that saves often.
        progress: show the tqdm bar (rank 0 only).
        on_step: callback (step, seconds elapsed, loss) after each step.
        nonfinite_hint: the fix named when the loss is not finite.
        clock: the time source of `keep_going`, `on_step` and the step times (wall clock by
            default; `time.process_time` counts this process's CPU seconds, so a budget means
            the same compute on a machine shared with other jobs).
    """

    total_steps: int
    desc: str = "train"
    history: dict[str, list[Any]] = field(default_factory=new_history)
    eval_fn: Callable[[int], dict[str, float]] | None = None
    eval_every: int | None = None
    save_fn: Callable[[int, Any], Path] | None = None
    collect_fn: Callable[[int], Any] | None = None
    save_every: int | None = None
    keep_going: Callable[[int, float, float], bool] | None = None
    tokens_per_step: int | None = None
    log_dir: str | None = None
    png: Path | None = None
    png_every_s: float = 60.0
    progress: bool = True
    on_step: Callable[[int, float, float], None] | None = None
    nonfinite_hint: str = "lower the learning rate"
    clock: Callable[[], float] = time.perf_counter
    last_saved: Path | None = None
    # the last drawing's time; starting at construction, saves in a run's first minute draw nothing
    _png_at: float = field(default_factory=time.monotonic, init=False, repr=False)

    def __post_init__(self) -> None:
        self.log = RunLog(self.log_dir, enabled=dist.is_main())

    # ------------------------------------------------------------------ the loop
    def run(self, task: StepTask, start: int, stop: int | None = None) -> RunOutcome:
        """Steps `start` .. `stop` - 1 (0-based; `stop` None: until `keep_going` says no)."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps if stop is not None else None, initial=start,
                   desc=self.desc, unit="step", leave=False,
                   disable=not self.progress or not dist.is_main())
        outcome = RunOutcome(done=start)
        t_start, step_time = self.clock(), 0.0
        with bar, deferred_interrupt() as interrupted:
            step = start
            while stop is None or step < stop:
                if dist.any_across(bool(interrupted)):
                    logger.warning("interrupted: stopping after step %d", outcome.done)
                    outcome.interrupted = True
                    break
                elapsed = self.clock() - t_start
                if self.keep_going is not None and not _rank0_says(
                        self.keep_going(step - start, elapsed, step_time)):
                    break
                seconds, loss, lr = self._step(task, step)
                step_time = seconds if step == start else 0.8 * step_time + 0.2 * seconds
                step += 1
                outcome.done = step
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
                if self.on_step is not None:
                    self.on_step(step, self.clock() - t_start, loss)
                self._cadence(step, bar)
        outcome.last_saved = self.last_saved
        return outcome

    def _step(self, task: StepTask, step: int) -> tuple[float, float, float]:
        lr = task.set_lr(step)
        t0 = self.clock()
        loss = task.forward(step)
        value = dist.mean_across(float(loss.detach()))
        if not math.isfinite(value):  # on every rank (the mean of a NaN is NaN): nobody hangs
            raise FloatingPointError(f"the training loss became {value} at step {step}: "
                                     f"{self.nonfinite_hint}")
        task.update(step, loss)
        seconds = self.clock() - t0
        h = self.history
        h["step_seconds"].append(seconds)
        h["losses"].append(value)
        h["lrs"].append(float(lr))
        tps = self.tokens_per_step / seconds if self.tokens_per_step and seconds > 0 else None
        self.log.step(step + 1, loss=value, lr=float(lr), tokens_per_s=tps)
        return seconds, value, float(lr)

    def _cadence(self, done: int, bar: Any) -> None:
        if self.eval_fn is not None and self.eval_every and (
                done % self.eval_every == 0 or done == self.total_steps):
            self.evaluate(done, bar)
        if self.save_fn is not None and self.save_every and done % self.save_every == 0:
            self.save(done)

    # ------------------------------------------------------------------ evaluation and saving
    def evaluate(self, done: int, bar: Any | None = None) -> dict[str, float]:
        """Evaluate at `done`, append to the history and the logs; returns the metrics."""
        metrics = self.eval_fn(done) if self.eval_fn is not None else {}
        self.history["evals"].append({"step": done, **metrics})
        self.log.evaluation(done, metrics)
        if bar is not None and self.progress and dist.is_main():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            bar.write(f"step {done}: {shown}")
        return metrics

    def save(self, done: int) -> Path | None:
        """Write the checkpoint of step `done` (rank 0, between barriers) and the loss PNG."""
        if self.save_fn is None:
            return None
        collected = self.collect_fn(done) if self.collect_fn is not None else None
        written = dist.on_rank0(lambda: self.save_fn(done, collected))
        # other ranks know the checkpoint by its step (only its name is compared)
        self.last_saved = written if written is not None else Path(f"step-{done:06d}")
        self._png(force=False)
        return self.last_saved

    def saved_at(self, done: int) -> bool:
        return self.last_saved is not None and self.last_saved.name.endswith(f"{done:06d}")

    def finish(self) -> None:
        """Close the logs and draw the final loss curve (rank 0)."""
        self._png(force=True)
        self.log.close()

    def _png(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._png_at < self.png_every_s:
            return
        if self.png is not None and dist.is_main() and self.history["losses"]:
            self._png_at = now
            try:
                write_loss_png(self.png, self.history["losses"], self.history["evals"],
                               title=self.desc)
            except ImportError:  # matplotlib absent: the numbers are in result.json
                logger.warning("matplotlib is not installed: no %s", self.png)


def _rank0_says(flag: bool) -> bool:
    """Rank 0's boolean on every rank (a budget decision must be the same everywhere)."""
    if not dist.active():
        return flag
    import torch.distributed as tdist

    t = torch.tensor([1.0 if flag else 0.0], device=dist._device())
    tdist.broadcast(t, src=0)
    return bool(t.item())
