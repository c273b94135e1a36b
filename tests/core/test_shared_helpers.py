"""The helpers that used to be copied across modules now have one home in rankwise.linalg."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from rankwise import linalg
from rankwise.adapt.geometry import compute_dtype as geometry_compute_dtype
from rankwise.layers import FactorizedLinear
from rankwise.layers._base import check_rank, cpu_generator, kaiming_uniform, work_dtype


def test_one_compute_dtype_policy() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert linalg.compute_dtype(dtype) is torch.float32
    assert linalg.compute_dtype(torch.float64) is torch.float64
    # the former copies are the same function now
    assert geometry_compute_dtype is work_dtype is linalg.compute_dtype


def test_one_rank_check() -> None:
    assert check_rank is linalg.validate_rank
    assert linalg.validate_rank(3, 4, 5) == 3
    with pytest.raises(ValueError, match=r"rank 5 exceeds min\(m, n\) = 4.*choose rank <= 4"):
        FactorizedLinear(5, 4, rank=5)
    with pytest.raises(TypeError, match="rank must be an int"):
        FactorizedLinear(5, 4, rank=2.0)  # type: ignore[arg-type]


def test_one_seeded_generator() -> None:
    assert cpu_generator is linalg.make_generator
    a = torch.rand(5, generator=linalg.make_generator(7))
    b = torch.rand(5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)  # same seed, same stream as a plain CPU generator
    gen = torch.Generator()
    assert linalg.make_generator(gen) is gen and linalg.make_generator(None) is None
    with pytest.raises(ValueError, match="seed must be >= 0"):
        linalg.make_generator(-1)


def test_kaiming_uniform_is_the_lora_a_init() -> None:
    fan_in = 300
    gen = linalg.make_generator(0)
    a = linalg.kaiming_uniform((400, fan_in), fan_in, gen)
    bound = 1 / math.sqrt(fan_in)
    assert a.dtype is torch.float32 and a.abs().max() <= bound
    # U(-b, b) has variance b^2 / 3, nn.Linear's kaiming_uniform_(a=sqrt(5)) the same
    ref = nn.Linear(fan_in, 400).weight.detach()
    assert abs(a.var().item() - bound**2 / 3) < 0.02 * bound**2
    assert abs(ref.var().item() - a.var().item()) < 0.03 * bound**2
    # the inline form the adapters used, bit for bit
    inline = (torch.rand(400, fan_in, generator=linalg.make_generator(0)) * 2 - 1) * bound
    assert torch.equal(a, inline)
    assert kaiming_uniform is linalg.kaiming_uniform


def test_factorized_delta_weight_is_deprecated_for_dense_weight() -> None:
    layer = FactorizedLinear(6, 4, rank=2)
    want = layer.B.weight @ layer.A.weight
    assert torch.equal(layer.dense_weight(), want)
    with pytest.warns(DeprecationWarning, match="dense_weight"):
        assert torch.equal(layer.delta_weight(), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(layer.to_dense().weight, want.detach())
