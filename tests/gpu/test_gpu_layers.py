"""Parameterised / factorised layers on a device under mixed precision, every registered layer
method: the autocast forward stays within the dtype's rounding of the fp32 forward, gradients
reach the fp32 factors finite, and `to_dense_` on the device keeps the outputs."""

from __future__ import annotations

import pytest
import torch
from gpu_devices import AUTOCAST, REL_ERROR, devices, rel_error
from torch import nn

from rankwise import layers as rl

pytestmark = pytest.mark.gpu


def _methods() -> list[str]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contracts"))
    from registered import layers

    return layers()


METHODS = _methods()
OPTIONS: dict[str, dict] = {
    "factorized": {"rank": 8, "allow_no_saving": True},
    "relora": {"rank": 8, "dropout": 0.0},
    "sltrain": {"rank": 8, "density": 0.1},
    "lost": {"rank": 8, "density": 0.25},
    "sst": {"rank": 8},
    "monarch": {"nblocks": 4},
}


def converted(name: str, device: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 48)).to(device)
    rl.convert_(model, name, target_modules=["0", "2"], **OPTIONS.get(name, {}))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):  # move zero-initialised factors
        model(torch.randn(16, 64, generator=g).to(device)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model


def inputs(device: str) -> torch.Tensor:
    return torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize(("device", "dtype"), AUTOCAST)
@pytest.mark.parametrize("name", METHODS)
def test_autocast_forward_and_backward(name, device, dtype):
    model = converted(name, device)
    with torch.no_grad():
        ref = model(inputs(device))
    with torch.autocast(device_type=device, dtype=dtype):
        out = model(inputs(device))
        loss = out.float().square().mean()
    loss.backward()
    assert rel_error(out, ref) <= REL_ERROR[dtype], f"{name}: {rel_error(out, ref):.2e}"
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.dtype == torch.float32 and p.device.type == device, n
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {n}"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", METHODS)
def test_to_dense_on_the_device_keeps_the_outputs(name, device):
    model = converted(name, device).eval()
    with torch.no_grad():
        want = model(inputs(device))
        rl.to_dense_(model)
        assert all(p.device.type == device for p in model.parameters())
        torch.testing.assert_close(model(inputs(device)), want, rtol=1e-4, atol=1e-5)
