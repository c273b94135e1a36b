"""Fault injection: kill a writer at chosen points, then check that nothing was lost.

`run_killed(fn, k)` forks; the child runs `fn()` and dies by SIGKILL (or, with
`interrupt=True`, raises KeyboardInterrupt as Ctrl-C would) just before its k-th file-system
operation (rename, replace, fsync, unlink, rmdir, mkdir: the points where a writer's on-disk
state changes). `count_ops(fn)` runs it whole in a child and returns how many there were, so
a test can kill a writer between every pair of its operations. Forking keeps this fast: the
models and imports are already in memory (no interpreter start per kill).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

_OPS = ("rename", "replace", "fsync", "unlink", "rmdir", "mkdir")


def _hook(k: int, interrupt: bool) -> list[int]:
    count = [0]

    def wrap(fn: Callable) -> Callable:
        def inner(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                if interrupt:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return inner

    for name in _OPS:
        setattr(os, name, wrap(getattr(os, name)))
    return count


def run_killed(fn: Callable[[], object], k: int, *, interrupt: bool = False) -> str:
    """Run `fn` in a forked child stopped before its k-th file-system operation.

    Returns "killed" (SIGKILL), "interrupted" (KeyboardInterrupt reached the top), or
    "done:<ops>" when `fn` finished first. A child that fails otherwise fails the test.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(r)
            torch.set_num_threads(1)
            count = _hook(k, interrupt)
            try:
                fn()
                os.write(w, f"done:{count[0]}".encode())
                code = 0
            except KeyboardInterrupt:
                os.write(w, b"interrupted")
                code = 0
        except BaseException:  # noqa: BLE001 - report to the parent
            traceback.print_exc(file=sys.stderr)
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as fh:
        said = fh.read().decode()
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return "killed"
    assert os.WEXITSTATUS(status) == 0, f"the writer failed in the child (stderr above): {said!r}"
    return said


def count_ops(fn: Callable[[], object]) -> int:
    """How many file-system operations `fn` makes (run whole in a child)."""
    said = run_killed(fn, 0)
    assert said.startswith("done:"), said
    return int(said.split(":")[1])


def kill_points(n: int, how_many: int = 8, seed: int = 0) -> list[int]:
    """The first and last operation and `how_many` others drawn at random (seeded)."""
    import random

    inner = list(range(2, n))
    picks = random.Random(seed).sample(inner, min(how_many, len(inner)))
    return sorted({1, n, *picks})


def leftovers(root: Path) -> list[str]:
    """Temporary or half-deleted entries anywhere under `root`."""
    import re

    temp = re.compile(r"\.rankwise-(tmp|old|gone|trash|probe)-|\.tmp$|^\.tmp-")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if temp.search(p.name))


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def calib_ids(seed: int = 7) -> torch.Tensor:
    return torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(seed))


def compressed_llama(seed: int = 0):
    from rankwise.compress import compress_

    model = tiny_llama(seed)
    compress_(model, "lord", 0.3, calibration=calib_ids(), progress=False)
    return model


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
