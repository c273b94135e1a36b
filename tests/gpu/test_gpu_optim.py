"""Low-rank optimizers with parameters on a device, every registered preset:

* the state lives where the parameter lives (no silent host round trips), tensors only;
* a state saved from the device and loaded with ``map_location="cpu"`` (the portable way)
  moves back onto the device on `load_state_dict` and resumes bit-exactly;
* on CUDA, the allocator sees the low-rank state: GaLore's persistent optimizer memory is a
  fraction of AdamW's on the same model (the method's reason to exist).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from gpu_devices import devices, needs_cuda
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contracts"))
from registered import optimizers  # noqa: E402
from test_optimizer_contract import OPTIONS, Toy, batch  # noqa: E402

import rankwise.optim as ro  # noqa: E402

pytestmark = pytest.mark.gpu
PRESETS = optimizers()


def make(name: str, device: str):
    model = Toy().to(device)
    if name == "gradnormlorp":
        ro.apply_weight_norm(model)
    options = {"rank": 4, "update_proj_gap": 3, "lr": 1e-2} | OPTIONS.get(name, {})
    return model, ro.create(name, model, **{k: v for k, v in options.items() if v is not None})


def train(model, opt, steps: int, device: str, start: int = 0) -> None:
    for i in range(start, start + steps):
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()


@pytest.mark.parametrize("device", devices(cpu=False))
@pytest.mark.parametrize("name", PRESETS)
def test_state_lives_on_the_parameters_device(name, device):
    model, opt = make(name, device)
    train(model, opt, 4, device)
    for p, st in opt.state.items():
        for key, value in st.items():
            assert isinstance(value, torch.Tensor), f"{name}: {key} is {type(value).__name__}"
            assert value.device == p.device, f"{name}: state {key} on {value.device}, param on {p.device}"


@pytest.mark.parametrize("device", devices(cpu=False))
@pytest.mark.parametrize("name", PRESETS)
def test_resume_from_a_host_copy_is_bit_exact_on_the_device(name, device):
    model, opt = make(name, device)
    train(model, opt, 8, device)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model, opt = make(name, device)
    train(model, opt, 4, device)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True, map_location="cpu")
    model, opt = make(name, device)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    assert all(v.device == p.device for p, st in opt.state.items() for v in st.values())
    train(model, opt, 4, device, start=4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), f"{name}: {key} differs after resume"


class Wide(nn.Module):
    """Four 1024 x 1024 projected linears (16.8 M weights): state dominates the allocator."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleList(nn.Linear(1024, 1024, bias=False) for _ in range(2))
        self.mlp = nn.ModuleList(nn.Linear(1024, 1024, bias=False) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.attn, *self.mlp]:
            x = torch.tanh(layer(x))
        return x


def persistent_state_bytes(build) -> int:
    """CUDA bytes still allocated after one step, beyond parameters + gradients."""
    torch.manual_seed(0)
    model = Wide().cuda()
    model(torch.randn(8, 1024, device="cuda")).square().mean().backward()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    opt = build(model)
    opt.step()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before


@needs_cuda
def test_galore_state_on_the_device_is_a_fraction_of_adamw():
    adamw = persistent_state_bytes(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3))
    galore = persistent_state_bytes(lambda m: ro.create("galore_adamw", m, rank=128))
    # AdamW: 2 moments of 1024² fp32 per matrix (8 MiB); GaLore at rank 128: P (1024 x 128) +
    # 2 moments (128 x 1024) = 1.5 MiB, 3/16 of AdamW's (bound: 0.45, room for counters/caches)
    assert adamw >= 2 * 4 * 4 * 1024 * 1024
    assert galore <= 0.45 * adamw, f"GaLore {galore} B vs AdamW {adamw} B"
