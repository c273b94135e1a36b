"""Adapters on a device under mixed precision: every registered method, bf16/fp16 autocast and a
half-precision base model (the paths that differ on a GPU).

* autocast: the forward stays within the dtype's rounding of the fp32 forward, the adapter
  tensors stay fp32 and their gradients are fp32 and finite (PEFT's autocast contract);
* half base: over a bf16/fp16 base the adapter tensors are fp32, the output has the base dtype
  and equals the same model computed in fp32 to the base dtype's rounding.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from gpu_devices import AUTOCAST, REL_ERROR, rel_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contracts"))
from contract_toy import Toy, batch, data, loss_fn  # noqa: E402
from registered import adapters  # noqa: E402
from test_adapter_contract import OPTIONS, RANK, perturb, targets_of  # noqa: E402

from rankwise import adapt  # noqa: E402

pytestmark = pytest.mark.gpu
METHODS = adapters()


def on(device: str, dtype: torch.dtype, b: dict) -> dict:
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in b.items()}


def adapted(name: str, device: str, dtype: torch.dtype) -> Toy:
    model = Toy().to(device, dtype)
    adapt.adapt_(model, name, target_modules=targets_of(name), loss_fn=loss_fn,
                 data=[on(device, dtype, b) for b in data()],
                 **({"rank": RANK} | OPTIONS.get(name, {})))
    perturb(model)
    return model.eval()


@pytest.mark.parametrize(("device", "dtype"), AUTOCAST)
@pytest.mark.parametrize("name", METHODS)
def test_autocast_forward_and_backward(name, device, dtype):
    model = adapted(name, device, torch.float32)
    b = on(device, torch.float32, batch())
    with torch.no_grad():
        ref = model(**b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rule-bearing methods warn when trained without rules
        with torch.autocast(device_type=device, dtype=dtype):
            out = model(**b)
            loss = sum(o.float().square().mean() for o in out)
        loss.backward()
    for got, want in zip(out, ref, strict=True):
        assert rel_error(got, want) <= REL_ERROR[dtype], f"{name}: {rel_error(got, want):.2e}"
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, f"{name}: {n} is {p.dtype}"
            assert p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()), n


@pytest.mark.parametrize(("device", "dtype"), AUTOCAST)
@pytest.mark.parametrize("name", METHODS)
def test_half_precision_base_keeps_fp32_adapters(name, device, dtype):
    model = adapted(name, device, dtype)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    reference = copy.deepcopy(model).float()  # the same values, computed in fp32
    with torch.no_grad():
        out = model(**on(device, dtype, batch()))
        ref = reference(**on(device, torch.float32, batch()))
    for got, want in zip(out, ref, strict=True):
        assert got.dtype == dtype
        assert rel_error(got, want) <= REL_ERROR[dtype], f"{name}: {rel_error(got, want):.2e}"
