"""Devices the GPU suite runs on: `cuda` when present (skipped with a reason otherwise), `cpu`
where the same property is meaningful there too (so the suite is exercised on every machine)."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device: run `make test-gpu` on a GPU machine"
needs_cuda = pytest.mark.skipif(not CUDA, reason=NO_CUDA)


def devices(*, cpu: bool = True) -> list:
    """pytest params: "cpu" (optional) and "cuda" (skipped without a GPU)."""
    params = [pytest.param("cuda", marks=needs_cuda, id="cuda")]
    return ([pytest.param("cpu", id="cpu")] if cpu else []) + params


#: (device, autocast dtype): bf16 on CPU (torch's CPU autocast dtype), bf16 and fp16 on CUDA
AUTOCAST = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, marks=needs_cuda, id="cuda-bf16"),
    pytest.param("cuda", torch.float16, marks=needs_cuda, id="cuda-fp16"),
]

#: relative error ||y_autocast − y_fp32|| / ||y_fp32|| allowed per autocast dtype (bf16 keeps
#: 8 mantissa bits, fp16 11: a few roundings of 2^-9 / 2^-12 on each matmul)
REL_ERROR = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())
