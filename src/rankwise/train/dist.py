"""Several processes, one run: the process group, batch shards, gradient averaging, rank-0 I/O.

A training command started by ``torchrun --nproc_per_node N`` or ``accelerate launch
--num_processes N`` finds ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in its environment; `init` joins the process group (gloo on CPU, NCCL on CUDA).
The parallelism is data-parallel at a fixed *global* batch, so the run is the same computation
as the one-process run, split:

* every rank builds the same model (parameters are then broadcast from rank 0, so an init that
  drew from a per-process RNG cannot make the replicas differ);
* the global batch of B rows of step s (a function of s alone) is cut into N contiguous shards
  of B / N rows; rank r computes the mean loss of shard r;
* gradients are averaged over ranks (`average_gradients`, or FSDP2's reduce-scatter), so each
  rank applies the gradient of the global mean loss: for equal shard sizes
  mean_r(mean over shard r) = mean over the batch, which is why the loss curve equals the
  one-process run to float rounding;
* the logged loss is the rank average of the shard losses (the same global mean);
* only rank 0 writes files (`on_rank0` between barriers); every rank reads the checkpoint to
  resume.

Gradients are averaged by an explicit all-reduce rather than by wrapping the model in
``DistributedDataParallel``: several methods replace or resize parameters during training
(ReLoRA merges, Maestro shrinks, IncreLoRA grows its rank) and DDP fixes its parameter list at
construction. The sum is the same; only the overlap with backward is given up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "average_gradients",
    "barrier",
    "broadcast_parameters",
    "from_rank0_json",
    "init",
    "is_main",
    "mean_across",
    "on_rank0",
    "any_across",
    "rank",
    "shard_rows",
    "world_size",
]

T = TypeVar("T")


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init() -> bool:
    """Join the process group the launcher describes (no-op for a single process).

    Returns:
        True when this run has several processes.
    """
    dist = _dist()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return active()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return active()


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): the one process that writes files."""
    return rank() == 0


def barrier() -> None:
    if active():
        _dist().barrier()


def on_rank0(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 only, between barriers (so no rank reads a half-written file).

    An exception on rank 0 is re-raised there after the closing barrier, and the other ranks
    raise too, so no rank waits forever at the next collective.
    """
    barrier()
    value, error = None, None
    if is_main():
        try:
            value = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below on every rank
            error = exc
    if any_across(error is not None):
        if error is not None:
            raise error
        raise RuntimeError("rank 0 failed while writing (see its error)")
    return value


def any_across(flag: bool) -> bool:
    """True if `flag` is true on any rank (a MAX all-reduce; the flag itself elsewhere)."""
    if not active():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_device())
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return bool(t.item())


def mean_across(value: float) -> float:
    """The mean of `value` over ranks (the logged loss of a data-parallel step)."""
    if not active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    _dist().all_reduce(t)
    return float(t.item()) / world_size()


def _device() -> torch.device:
    dist = _dist()
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_rows(batch_size: int) -> slice:
    """This rank's contiguous part of a global batch of `batch_size` rows."""
    n = world_size()
    if batch_size % n:
        raise ValueError(f"the global batch of {batch_size} rows does not split evenly over "
                         f"{n} processes: choose a batch size that is a multiple of {n}")
    per = batch_size // n
    return slice(rank() * per, (rank() + 1) * per)


def broadcast_parameters(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical replicas at the start)."""
    if not active():
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point() or t.dtype in (torch.long, torch.int, torch.bool):
                _dist().broadcast(t.data, src=0)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks (one all-reduce per dtype bucket).

    Parameters without a gradient on every rank must be the same set on all ranks (they are: the
    replicas run the same code on equal-sized shards). DTensor (FSDP2) gradients are already
    reduced and are skipped.
    """
    if not active():
        return
    from rankwise.optim.distributed import is_dtensor

    buckets: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None and not is_dtensor(p.grad):
            buckets.setdefault(p.grad.dtype, []).append(p.grad)
    n = world_size()
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        _dist().all_reduce(flat)
        flat /= n
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def gather_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """`t` from every rank (same shape and dtype everywhere), in rank order."""
    if not active():
        return [t]
    out = [torch.empty_like(t) for _ in range(world_size())]
    _dist().all_gather(out, t.contiguous())
    return out


def from_rank0(value: float) -> float:
    """Rank 0's `value` on every rank (schedules that read a clock must agree)."""
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    _dist().broadcast(t, src=0)
    return float(t.item())


def from_rank0_json(value: T) -> T:
    """Rank 0's `value` (anything JSON can write) on every rank, rank 0 included.

    Sent as UTF-8 JSON text (never pickled), so every rank, rank 0 too, gets the same decoded
    value (tuples come back as lists, as they do from a JSON file). Without a process group the
    value is returned as it is.
    """
    if not active():
        return value
    from rankwise.io import _json_default

    device = _device()
    payload = json.dumps(value, default=_json_default).encode() if is_main() else b""
    size = torch.tensor([len(payload)], dtype=torch.long, device=device)
    _dist().broadcast(size, src=0)
    buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if is_main()
           else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    _dist().broadcast(buf, src=0)
    return json.loads(buf.cpu().numpy().tobytes().decode())
