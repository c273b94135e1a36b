"""The shared training runner: non-finite guard, cadence and history, Ctrl-C deferral in
pretraining (healing's: tests/pipeline/test_healing.py)."""

from __future__ import annotations

import signal

import pytest
import torch
from test_train_loop import tiny_config, tiny_data
from torch import nn

from rankwise.train import loop
from rankwise.train.runner import Runner


class _Toy:
    """w <- w - lr * grad of (w - target)^2 on a scalar; the loss becomes NaN at `nan_at`."""

    def __init__(self, nan_at: int | None = None) -> None:
        self.w = nn.Parameter(torch.tensor(3.0))
        self.nan_at, self.updates = nan_at, []

    def set_lr(self, step: int) -> float:
        return 0.1

    def forward(self, step: int) -> torch.Tensor:
        loss = (self.w - 1.0) ** 2
        return loss * float("nan") if step == self.nan_at else loss

    def update(self, step: int, loss: torch.Tensor) -> None:
        loss.backward()
        with torch.no_grad():
            self.w -= 0.1 * self.w.grad
        self.w.grad = None
        self.updates.append(step)


def test_nonfinite_loss_stops_before_the_update():
    toy = _Toy(nan_at=2)
    runner = Runner(total_steps=5, progress=False, nonfinite_hint="lower --lr")
    with pytest.raises(FloatingPointError, match="became nan at step 2: lower --lr"):
        runner.run(toy, 0, 5)
    assert toy.updates == [0, 1]  # step 2 never touched the weight
    assert float(toy.w.detach()) == pytest.approx(1 + 2 * 0.8 ** 2)  # (w - 1) shrinks by 0.8 per step


def test_cadence_and_history():
    toy, saved, evals = _Toy(), [], []
    runner = Runner(total_steps=6, progress=False, eval_every=4, save_every=3,
                    eval_fn=lambda s: evals.append(s) or {"w": float(toy.w)},
                    save_fn=lambda s, _: saved.append(s) or __import__("pathlib").Path(
                        f"step-{s:06d}"))
    outcome = runner.run(toy, 0, 6)
    assert outcome.done == 6 and not outcome.interrupted
    assert evals == [4, 6] and saved == [3, 6]  # eval also after the last planned step
    losses = runner.history["losses"]
    assert losses == pytest.approx([4 * 0.64 ** k for k in range(6)])
    assert runner.history["lrs"] == [0.1] * 6 and len(runner.history["step_seconds"]) == 6


@pytest.mark.parametrize("every, drawn_at", [(60.0, ["finish"]), (0.0, [2, 4, 6, "finish"])])
def test_the_loss_png_is_drawn_at_saves_at_most_every_png_every_s_and_always_at_the_end(
        tmp_path, monkeypatch, every, drawn_at):
    """A save draws loss.png only once `png_every_s` has passed since the start or the last
    drawing (each costs ~0.1-0.2 s); `finish` always draws, so the final curve is complete."""
    from pathlib import Path

    from rankwise.train import runner as runner_module

    drawn: list = []
    monkeypatch.setattr(runner_module, "write_loss_png",
                        lambda path, losses, evals, title: drawn.append(len(losses)))
    runner = Runner(total_steps=6, progress=False, save_every=2, png=tmp_path / "loss.png",
                    png_every_s=every, save_fn=lambda s, _: Path(f"step-{s:06d}"))
    runner.run(_Toy(), 0, 6)
    runner.finish()
    assert drawn == [n if n != "finish" else 6 for n in drawn_at]


def test_pretrain_ctrl_c_saves_once_and_resume_is_exact(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    kw = {"steps": 8, "eval_every": 4, "save_every": 100, "export": False}
    straight = loop.pretrain(tiny_config("sltrain", out=str(tmp_path / "a"), **kw),
                             data=tiny_data())
    real = loop.batch_rows

    def rows(step, *args):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # arrives in the middle of step index 2
        return real(step, *args)

    monkeypatch.setattr(loop, "batch_rows", rows)
    out = tmp_path / "b"
    stopped = loop.pretrain(tiny_config("sltrain", out=str(out), **kw), data=tiny_data())
    monkeypatch.setattr(loop, "batch_rows", real)
    assert stopped.interrupted and stopped.steps == 3 and not stopped.completed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003"]
    resumed = loop.pretrain(tiny_config("sltrain", out=str(out), **kw), data=tiny_data(),
                            resume=True)
    assert resumed.losses == straight.losses and resumed.val == straight.val
