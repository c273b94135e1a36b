"""DTensor glue so the optimizers run on FSDP2-sharded parameters (and plainly elsewhere).

FSDP2 (`torch.distributed.fsdp.fully_shard`) turns each parameter and its gradient into a
DTensor sharded on dim 0. Elementwise rules (AdamW on norms, embeddings) run on the local
shard as they are. A projected matrix needs the whole gradient (an SVD or a column score sees
every row), so `full` all-gathers it, every rank computes the same full-size update from the
same data (projectors are seeded per parameter, never per rank), and `shard_like` keeps the
rows this rank owns: a Replicate -> Shard redistribution is a local slice, no communication.
The low-rank moments are therefore replicated on each rank: the memory they save is already
the point, and the update stays exactly the single-process one.

DDP needs nothing here: its gradients are already all-reduced when `step()` runs.
"""

from __future__ import annotations

import torch


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_dtensor(t: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2 parameter or gradient)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or `t` itself."""
    return t.to_local() if is_dtensor(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered for a DTensor), or `t` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(full_value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of a full-size `full_value` that matches `param`'s local shard."""
    if not is_dtensor(param):
        return full_value
    from torch.distributed.tensor import DTensor, Replicate

    mesh = param.device_mesh
    replicated = DTensor.from_local(
        full_value, mesh, [Replicate()] * mesh.ndim, run_check=False
    )
    return replicated.redistribute(mesh, param.placements).to_local()
