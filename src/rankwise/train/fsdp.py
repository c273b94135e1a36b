"""FSDP2 for pretraining, and the states a checkpoint gathers from every process.

With ``fsdp=True`` under a launcher, each decoder layer and then the whole model are wrapped
with ``torch.distributed.fsdp.fully_shard``: parameters, gradients and the optimizer's
elementwise state are DTensors sharded on dim 0, and the gradients are reduce-scattered (the
mean over ranks, as `dist.average_gradients` computes for replicated runs). rankwise's
optimizers handle DTensor gradients (rankwise.optim.distributed): a projected matrix's gradient
is all-gathered, every rank computes the same low-rank update and keeps its own rows. Only
methods that keep dense ``nn.Linear`` weights are sharded (full, galore, fira); the layer
methods replace parameters during training and run replicated.

A checkpoint always holds *full* tensors (the model through torch.distributed.checkpoint's
``full_state_dict``, the optimizer state gathered by hand, below) in the layout of an unsharded
run, so it resumes on any number of processes, sharded or not. `StateAccess`
hides the difference from the loop: `collect` runs the collectives on every rank,
`model_view` / `optimizer_view` give rank 0 objects whose ``state_dict()`` is the gathered
state, and `model_loader` / `optimizer_loader` load a full state back into the shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.train import dist

__all__ = ["SHARDABLE", "Collected", "StateAccess", "check", "shard_model"]

#: methods whose weights stay dense nn.Linear parameters (the ones FSDP2 shards here)
SHARDABLE = ("full", "galore", "fira")


def check(config: Any) -> None:
    """Refuse ``fsdp`` for a method that replaces its layers' parameters during training."""
    if not getattr(config, "fsdp", False) or not dist.active():
        return
    if config.method not in SHARDABLE:
        raise ValueError(f"fsdp shards the dense methods {list(SHARDABLE)}; method "
                         f"{config.method!r} changes its layers during training: drop --fsdp "
                         "(it then trains replicated on every process)")


def shard_model(model: nn.Module) -> None:
    """fully_shard every decoder layer, then the root (embedding, norm, head)."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(getattr(model, "model", model), "layers", [])
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


@dataclass
class Collected:
    """What rank 0 writes: full states (sharded runs) and every rank's RNG (several ranks)."""

    model_state: dict[str, torch.Tensor] | None = None
    optimizer_state: dict[str, Any] | None = None
    rng_ranks: list[torch.Tensor] | None = None


class _View:
    """An object whose state_dict() is a gathered state (what save_checkpoint reads)."""

    def __init__(self, state: Any, param_groups: list[dict[str, Any]] | None = None) -> None:
        self._state, self.param_groups = state, param_groups or []

    def state_dict(self) -> Any:
        return self._state


class _ModelLoader:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> Any:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        return set_model_state_dict(self.model, state, options=_options(strict=strict))


class _OptimizerLoader:
    def __init__(self, model: nn.Module, optimizer: Any) -> None:
        self.model, self.optimizer = model, optimizer
        self.param_groups = optimizer.param_groups

    def load_state_dict(self, state: dict[str, Any]) -> None:
        as_dtensor = not _is_rankwise(self.optimizer)  # torch's optimizers keep DTensor state

        def place(value: torch.Tensor, param: torch.Tensor, projected: bool) -> torch.Tensor:
            return _to_local(value, param, projected, as_dtensor=as_dtensor)

        self.optimizer.load_state_dict(_map_state(self.optimizer, state, place))


# A sharded parameter's elementwise optimizer state is a DTensor (torch's optimizers) or a plain
# tensor of the local shard's shape (rankwise's, rankwise.optim.distributed); a projected
# parameter's state (low-rank moments, projector) is whole on every rank. torch's full-state
# helpers would save only rank 0's shard of rankwise's moments and shard the projector on load,
# so the state is gathered and placed by hand, keyed by parameter index as in an unsharded run
# (a checkpoint resumes sharded or not).
_PROJECTED = ("proj_seed", "proj_basis")


def _is_rankwise(optimizer: Any) -> bool:
    return type(optimizer).__module__.startswith("rankwise.")


def _map_state(optimizer: Any, state: dict[str, Any], fn: Any) -> dict[str, Any]:
    """`state` (an optimizer state_dict) with fn(value, param, projected) on every tensor."""
    ids = [i for g in state["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    by_id = dict(zip(ids, params, strict=True))
    out = {}
    for pid, st in state["state"].items():
        projected = any(k in st for k in _PROJECTED)
        out[pid] = {k: fn(v, by_id[pid], projected) if isinstance(v, torch.Tensor) else v
                    for k, v in st.items()}
    return {"state": out, "param_groups": state["param_groups"]}


def _to_full(value: torch.Tensor, param: torch.Tensor, projected: bool) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    from rankwise.optim.distributed import is_dtensor

    if is_dtensor(value):
        return value.full_tensor().cpu()
    if (is_dtensor(param) and not projected and value.dim() > 0
            and value.shape == param.to_local().shape):
        whole = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                   shape=param.shape, stride=param.stride())
        return whole.full_tensor().cpu()
    return value.cpu()


def _to_local(value: torch.Tensor, param: torch.Tensor, projected: bool, *,
              as_dtensor: bool) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    from rankwise.optim.distributed import is_dtensor, shard_like

    if is_dtensor(param) and not projected and tuple(value.shape) == tuple(param.shape) \
            and value.dim() > 0:
        part = shard_like(value.to(param.to_local().device), param).clone()
        if as_dtensor:
            return DTensor.from_local(part, param.device_mesh, param.placements, run_check=False,
                                      shape=param.shape, stride=param.stride())
        return part
    return value


class StateAccess:
    """Checkpoint access to a model and optimizer that may be sharded (module docstring).

    Args:
        rebuild: returns a fresh unsharded model of the same structure (the dense export of a
            sharded run loads the gathered weights into it).
    """

    def __init__(self, model: nn.Module, optimizer: Any, *, sharded: bool,
                 rebuild: Any | None = None) -> None:
        self.model, self.optimizer, self.sharded, self.rebuild = model, optimizer, sharded, rebuild

    def collect(self, step: int) -> Collected:
        """Run on every rank: gather full states (sharded) and the per-rank RNG states."""
        out = Collected()
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            out.model_state = get_model_state_dict(self.model, options=_options(cpu_offload=True))
            out.optimizer_state = _map_state(self.optimizer, self.optimizer.state_dict(), _to_full)
        if dist.active():
            out.rng_ranks = dist.gather_tensors(torch.get_rng_state())
        return out

    def model_view(self, collected: Collected | None) -> Any:
        if collected is not None and collected.model_state is not None:
            return _View(collected.model_state)
        return self.model

    def optimizer_view(self, collected: Collected | None) -> Any:
        if collected is not None and collected.optimizer_state is not None:
            return _View(collected.optimizer_state, self.optimizer.param_groups)
        return self.optimizer

    def extra(self, collected: Collected | None) -> dict[str, Any]:
        """The checkpoint's extra entries from `collected` (per-rank RNG states)."""
        if collected is None or collected.rng_ranks is None:
            return {}
        return {"rng_ranks": collected.rng_ranks}

    def model_loader(self) -> Any:
        return _ModelLoader(self.model) if self.sharded else self.model

    def optimizer_loader(self) -> Any:
        return _OptimizerLoader(self.model, self.optimizer) if self.sharded else self.optimizer

    def restore_rank_rng(self, extra: dict[str, Any]) -> None:
        """Give each rank its own saved RNG state (the checkpoint's "rng" is rank 0's)."""
        states = extra.get("rng_ranks")
        if dist.active() and states is not None and len(states) == dist.world_size():
            torch.set_rng_state(states[dist.rank()].to(torch.uint8))

    def dense_model(self, collected: Collected | None) -> nn.Module:
        """The model to export: itself, or (sharded) a fresh copy holding the gathered weights."""
        if not self.sharded:
            return self.model
        model = self.rebuild()
        model.load_state_dict(collected.model_state)
        return model


def memory(model: nn.Module, optimizer: Any) -> dict[str, int]:
    """Bytes of weights and optimizer state held by this process (a DTensor counts its shard)."""
    from torch.utils._pytree import tree_map

    from rankwise import profiling
    from rankwise.optim.distributed import local

    def to_local(x: Any) -> Any:
        return local(x) if isinstance(x, torch.Tensor) else x

    weights = [local(t) for t in [*model.parameters(), *model.buffers()]]
    state = tree_map(to_local, list(optimizer.state.values()))
    out = {"weights": profiling.tensor_bytes(weights), "optimizer": profiling.tensor_bytes(state)}
    out["total"] = out["weights"] + out["optimizer"]
    return out
