"""Worker for test_shrink_distributed.py: `rankwise shrink` on every rank of
``torchrun --nproc_per_node N`` (the CLI's `main`, as ``torchrun --no-python rankwise shrink``
runs it), recording what each rank did to the output directory.

    python -m torch.distributed.run --nproc_per_node 2 tests/pipeline/shrink_worker.py ROOT MODEL TEXT

Scenarios, in order, each rank writing ROOT/<scenario>-rank<r>.json:

* ``full``: one shrink run into ROOT/full;
* ``interrupted``: the same into ROOT/resume, with SIGINT raised on the last rank in the middle
  of healing step 2 (Ctrl-C on one process);
* ``resumed``: the same command with --resume, where the compress and compensate stages must
  not run again on any rank.

Every rank records the renames, replaces and mkdirs it made under the output directory (all of
rankwise's writes end in one of them), so the test can check that rank 0 alone wrote.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch


def shrink_args(model: str, text: str, out: Path) -> list[str]:
    """A shrink command that runs in seconds on the tiny model (4 healing steps, global batch 4)."""
    return ["shrink", model, "--out", str(out), "--ratio", "0.3", "--method", "svd-llm",
            "--allocation", "uniform", "--calibration", text, "--n-samples", "4", "--seq-len", "64",
            "--text", text, "--select-tokens", "1024", "--compensation-ranks", "4",
            "--heal-method", "lowrank", "--heal-minutes", "0", "--heal-steps", "4", "--heal-lr", "1e-3",
            "--heal-batch-size", "4", "--heal-seq-len", "64", "--eval-tokens", "512", "--no-latency",
            "--no-progress", "--json"]


class Writes:
    """Record (while active) the file-system operations of this process under `root`."""

    OPS = ("rename", "replace", "mkdir")

    def __init__(self, root: Path) -> None:
        self.root, self.seen, self.real = str(root), [], {}

    def __enter__(self) -> Writes:
        for name in self.OPS:
            real = self.real[name] = getattr(os, name)

            def hooked(*args, _name=name, _real=real, **kwargs):
                paths = [os.fspath(a) for a in args[:2] if isinstance(a, str | os.PathLike)]
                if any(p.startswith(self.root) for p in paths):
                    self.seen.append([_name, *paths])
                return _real(*args, **kwargs)

            setattr(os, name, hooked)
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self.real.items():
            setattr(os, name, real)


def run(argv: list[str], out: Path) -> dict:
    from rankwise.cli import main

    with Writes(out) as writes:
        code = main(argv)
    return {"code": code, "writes": writes.seen}


def interrupt_healing_on_last_rank():
    """SIGINT to this process during healing step 2, on the last rank only; returns the undo."""
    from rankwise.pipeline import healing
    from rankwise.train import dist

    real = healing.HealStep.forward

    def forward(self, step):
        if step == 2 and dist.rank() == dist.world_size() - 1:
            signal.raise_signal(signal.SIGINT)
        return real(self, step)

    healing.HealStep.forward = forward
    return lambda: setattr(healing.HealStep, "forward", real)


def refuse_recomputing() -> list[str]:
    """Record any call of the compress or compensate stage (a resume must reuse them)."""
    from rankwise.pipeline import stages

    calls: list[str] = []
    for name in ("compress_stage", "compensate_stage"):
        real = getattr(stages, name)
        setattr(stages, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    return calls


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    root, model, text = Path(argv[0]), argv[1], argv[2]
    from rankwise.train import dist

    dist.init()
    r = dist.rank()
    records = {"full": run(shrink_args(model, text, root / "full"), root / "full")}
    undo = interrupt_healing_on_last_rank()
    records["interrupted"] = run(shrink_args(model, text, root / "resume"), root / "resume")
    undo()
    records["interrupted"]["stages_on_disk"] = sorted(json.loads(
        (root / "resume" / ".rankwise-pipeline" / "state.json").read_text())["stages"])
    records["interrupted"]["files"] = sorted(p.name for p in (root / "resume").iterdir())
    dist.barrier()
    calls = refuse_recomputing()
    records["resumed"] = run([*shrink_args(model, text, root / "resume"), "--resume"], root / "resume")
    records["resumed"]["recomputed"] = calls
    for name, record in records.items():
        (root / f"{name}-rank{r}.json").write_text(json.dumps(record))
    dist.barrier()
    if dist.active():
        import torch.distributed as tdist

        tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
