"""Q-GaLore's INT8/INT4 weights (Zhang et al. 2024, §3.4): stochastic re-quantisation after
each step, int8 storage, training and exact resume."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import rankwise.optim as ro
from rankwise.optim.qweight import QuantizedWeightLinear, quantized_weight_bytes, store_of


def _layer(out=8, inp=32, bits=8, group=32, stochastic=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=gen))
    return QuantizedWeightLinear(lin, bits=bits, group_size=group, stochastic=stochastic)


def test_stochastic_requantisation_is_unbiased():
    q = _layer()
    w0 = q.dequantize()
    step = q.weight_scales.repeat_interleave(32).view(8, 32)  # one code step per entry
    value = w0 + torch.rand(8, 32, generator=torch.Generator().manual_seed(1)) * step * 0.9
    draws = []
    for seed in range(2000):
        q.requantize_(value, seed)
        draws.append(q.dequantize())
    draws = torch.stack(draws)
    assert not torch.equal(draws[0], value)  # each draw is on the grid...
    err = (draws.mean(0) - value).abs() / step
    assert float(err.max()) < 0.08  # ...and their mean is the value (sd 0.011 steps)
    nearest = _layer(stochastic=False)
    nearest.requantize_(value, 0)
    assert float(((nearest.dequantize() - value).abs() / step).mean()) > 0.1  # biased


@pytest.mark.parametrize("stochastic", [True, False])
def test_updates_below_half_a_code_step_still_move_the_weight(stochastic):
    q = _layer(out=64, inp=64, group=64, stochastic=stochastic)
    w0 = q.dequantize()
    lr = 0.2 * float(q.weight_scales.median())  # every Adam step moves W by lr = 0.2 code steps
    opt = ro.LowRankOptimizer([q.weight], lr=lr, eps=1e-12)
    steps = 20
    for _ in range(steps):
        q.weight.grad = torch.ones(64, 64)
        opt.step()
    moved = float((w0 - q.dequantize()).mean()) / (steps * lr)
    if stochastic:  # Q-GaLore's point: the expected weight follows the fp update
        assert 0.85 < moved < 1.15
    else:  # round-to-nearest loses every one of them
        assert abs(moved) < 0.25


@pytest.mark.parametrize(("bits", "per_byte"), [(8, 1), (4, 2)])
def test_weight_is_stored_in_int8_codes(bits, per_byte):
    lin = nn.Linear(64, 48)
    q = QuantizedWeightLinear(lin, bits=bits, group_size=256)
    assert q.weight_codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.weight_codes.nbytes == 64 * 48 // per_byte  # 3072 entries = 12 groups of 256
    assert q.weight_scales.dtype == torch.float32 and q.weight_scales.numel() == 12
    assert q.weight_bytes() == quantized_weight_bytes((48, 64), bits, 256) == (
        64 * 48 // per_byte + 4 * 12)
    assert q.weight.untyped_storage().nbytes() == q.weight.element_size()  # proxy: 1 element
    q.float()
    assert q.weight.untyped_storage().nbytes() == 4 and q.weight_scales.dtype == torch.float32
    torch.testing.assert_close(q.dequantize(), lin.weight.detach(), rtol=0,
                               atol=float(q.weight_scales.max()) / 2 + 1e-7)


def test_forward_and_gradients_are_those_of_the_dequantised_linear():
    q = _layer()
    ref = nn.Linear(32, 8)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize())
        ref.bias.copy_(q.bias)
    x = torch.randn(3, 5, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    q(x).square().sum().backward()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(q(x), ref(x2))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(q.weight.grad, ref.weight.grad)
    torch.testing.assert_close(q.bias.grad, ref.bias.grad)
    assert store_of(q.weight) is q and store_of(ref.weight) is None


def _train(model, opt, batch, steps, start=0):
    losses = []
    for i in range(start, start + steps):
        x, y = batch(i % 4)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _qmodel(tiny, bits=8):
    model = tiny()
    names = ro.quantize_weights_(model, bits=bits, group_size=32)
    assert names == ["attn", "mlp"]
    return model


@pytest.mark.parametrize("bits", [8, 4])
def test_q_galore_trains_a_tiny_model_with_quantised_weights(tiny, batch, bits):
    model = _qmodel(tiny, bits)
    opt = ro.create("q_galore_adamw8bit", model, rank=4, lr=0.02, update_proj_gap=10)
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(model.attn.weight),
                                                              id(model.mlp.weight)}
    codes0 = model.attn.weight_codes.clone()
    losses = _train(model, opt, batch, 40)
    assert not torch.equal(codes0, model.attn.weight_codes)
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])


def test_resume_from_state_dicts_is_exact(tiny, batch):
    model = _qmodel(tiny)
    opt = ro.create("q_galore_adamw8bit", model, rank=4, lr=0.02, update_proj_gap=3)
    _train(model, opt, batch, 5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    assert not any(k.endswith("attn.weight") for k in model.state_dict())  # the proxy stays out
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twin = _qmodel(tiny)
    twin.load_state_dict(saved["model"])
    opt2 = ro.create("q_galore_adamw8bit", twin, rank=4, lr=0.02, update_proj_gap=3)
    opt2.load_state_dict(saved["opt"])
    _train(model, opt, batch, 4, start=5)
    _train(twin, opt2, batch, 4, start=5)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bad_input_is_refused_with_the_fix(tiny):
    with pytest.raises(ValueError, match="8 or 4"):
        ro.quantize_weights_(tiny(), bits=3)
    with pytest.raises(ValueError, match="even"):
        ro.quantize_weights_(tiny(), bits=4, group_size=5)
    with pytest.raises(TypeError, match="LayerNorm.*not one of Linear"):
        ro.quantize_weights_(tiny(), target_modules=["norm"])
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantizedWeightLinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="target_modules"):
        ro.quantize_weights_(nn.Sequential(nn.Linear(2, 2)))
    q = _layer()
    q(torch.randn(2, 32)).sum().backward()  # a step between forward and backward is refused
    out = q(torch.randn(2, 32)).sum()
    q.requantize_(q.dequantize(), 0)
    with pytest.raises(RuntimeError, match="between forward and backward"):
        out.backward()
