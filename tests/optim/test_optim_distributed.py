"""DDP and FSDP2 (gloo, 2 local CPU processes) give the single-process result on the same
global batch. One spawn runs every case to keep the test short."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from optim_toy import ProjectedToy, toy_batch
from torch import nn

CASES = [("ddp", "galore_adamw"), ("ddp", "apollo"), ("fsdp2", "fira"), ("fsdp2", "dct_adamw"),
         ("fsdp2", "galore_adamw8bit")]
STEPS = 4


Net = ProjectedToy
_data = toy_batch


def _optimizer(name: str, model: nn.Module):
    import rankwise.optim as ro

    return ro.create(name, model, rank=4, update_proj_gap=2, lr=1e-2)


def _train(model: nn.Module, opt, rank: int = 0, world: int = 1) -> None:
    for step in range(STEPS):
        x, y = _data(step)
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel

        mesh = init_device_mesh("cpu", (world,))
        for kind, name in CASES:
            model = Net()
            if kind == "ddp":
                wrapped = DistributedDataParallel(model)
            else:
                for module in (model.attn, model.mlp, model.head):
                    fully_shard(module, mesh=mesh)
                wrapped = fully_shard(model, mesh=mesh)
            _train(wrapped, _optimizer(name, model), rank, world)
            full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                    for k, v in model.state_dict().items()}
            if rank == 0:
                torch.save(full, os.path.join(out_dir, f"{kind}_{name}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_and_fsdp2_equal_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        for kind, name in CASES:
            model = Net()
            _train(model, _optimizer(name, model))
            got = torch.load(os.path.join(tmp, f"{kind}_{name}.pt"), weights_only=True)
            # 8-bit codes can land on the other side of a rounding boundary when the gradient
            # differs in the last bits (summation order): one quantisation step, not a bug.
            atol = 1e-4 if "8bit" in name else 1e-5
            for key, value in model.state_dict().items():
                torch.testing.assert_close(got[key], value, rtol=1e-4, atol=atol,
                                           msg=lambda m, k=key, c=(kind, name): f"{c} {k}: {m}")
