"""Run logs people can look at: TensorBoard scalars and a loss-curve PNG per run directory.

`RunLog(log_dir)` writes TensorBoard event files (``tensorboard --logdir DIR``) with the tags
``train/loss``, ``train/lr``, ``train/tokens_per_s`` and ``eval/<metric>``, on rank 0 only.
`write_loss_png` draws the loss curve (and the evaluations on a second axis) with matplotlib's
Agg backend and publishes it atomically (temporary sibling + rename), so a killed run leaves the
previous picture or the new one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rankwise.io import default_mode

__all__ = ["RunLog", "check_log_dir", "write_loss_png"]


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch's writer needs the tensorboard package
        raise ImportError("--log-dir needs TensorBoard: pip install tensorboard "
                          "(or rankwise[logs])") from exc
    return SummaryWriter


def check_log_dir(log_dir: str | os.PathLike[str] | None) -> None:
    """Fail before any work when TensorBoard logging was asked for but cannot be written."""
    if log_dir is None:
        return
    _summary_writer()
    path = Path(log_dir)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"log directory {log_dir} lies under the file {parent}: choose "
                                 "another --log-dir")
            if not os.access(parent, os.W_OK):
                raise ValueError(f"log directory {log_dir} is not writable ({parent}): choose "
                                 "another --log-dir")
            return


class RunLog:
    """TensorBoard scalars of one run (a no-op without a directory or off rank 0)."""

    def __init__(self, log_dir: str | os.PathLike[str] | None, *, enabled: bool = True) -> None:
        self.writer = None
        if log_dir is not None and enabled:
            self.writer = _summary_writer()(log_dir=str(log_dir))

    def step(self, step: int, *, loss: float, lr: float, tokens_per_s: float | None) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        if tokens_per_s is not None:
            self.writer.add_scalar("train/tokens_per_s", tokens_per_s, step)

    def evaluation(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in metrics.items():
            if name != "step":
                self.writer.add_scalar(f"eval/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def write_loss_png(path: str | os.PathLike[str], losses: Sequence[float],
                   evals: Sequence[Mapping[str, float]] = (), *, title: str = "") -> Path:
    """Draw the training loss per step (and evaluations) to `path`, published atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, lw=1, color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    names = sorted({k for e in evals for k in e if k != "step"})
    if names:
        twin = ax.twinx()
        for name in names:
            pts = [(e["step"], e[name]) for e in evals if name in e]
            twin.plot(*zip(*pts, strict=True), "o-", color="tab:orange", ms=3, label=name)
        twin.set_ylabel(", ".join(names))
    ax.set_title(title or "loss curve")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
