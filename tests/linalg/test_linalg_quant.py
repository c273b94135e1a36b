"""Blockwise int8/int4 quantisation (Q-GaLore, Zhang et al. 2024:
its projector and weight quantisers)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.linalg import QuantizedTensor, dequantize_blockwise, quantize_blockwise

PROPS = settings(max_examples=25, deadline=None)


def _per_element_scale(q: QuantizedTensor) -> torch.Tensor:
    numel = math.prod(q.shape)
    return q.scales.repeat_interleave(q.block_size)[:numel].reshape(q.shape)


@PROPS
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    bits=st.sampled_from([4, 8]),
    block=st.sampled_from([2, 8, 64, 256]),
    seed=st.integers(0, 2**16),
)
def test_absmax_error_at_most_half_a_step(shape: list[int], bits: int, block: int, seed: int) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3
    q = quantize_blockwise(x, bits=bits, block_size=block)
    x_hat = q.dequantize()
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    s = _per_element_scale(q)
    assert bool(((x - x_hat).abs() <= s / 2 * (1 + 1e-5) + 1e-12).all())
    # the block's absmax is on the grid: it round-trips exactly (up to fp32 rounding of s * qmax)
    qmax = 2 ** (bits - 1) - 1
    torch.testing.assert_close(q.scales * qmax, _block_absmax(x, block), rtol=1e-6, atol=0)


def _block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, block).abs().amax(1)


@pytest.mark.parametrize("bits", [4, 8])
def test_grid_values_round_trip_exactly(bits: int) -> None:
    qmax = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(0)
    ints = torch.randint(-qmax, qmax + 1, (10, 32), generator=g)
    ints[:, 0] = qmax  # every block's absmax is qmax * s
    s = 2.0 ** torch.randint(-6, 4, (10, 1), generator=g)
    x = (ints * s).float()
    assert torch.equal(quantize_blockwise(x, bits=bits, block_size=32).dequantize(), x)


def test_int4_packs_two_per_byte() -> None:
    x = torch.tensor([7.0, -7.0, 1.0, 0.0])  # absmax 7 -> s = 1, q = 7, -7, 1, 0 -> stored q + 8
    q = quantize_blockwise(x, bits=4, block_size=4)
    assert q.data.dtype == torch.uint8 and q.data.numel() == 2
    assert q.data.tolist() == [15 | (1 << 4), 9 | (8 << 4)]  # element 2i low nibble, 2i+1 high
    assert torch.equal(q.dequantize(), x)
    big = torch.randn(1000)
    assert quantize_blockwise(big, bits=4).data.numel() * 2 == quantize_blockwise(big, bits=8).data.numel()
    assert quantize_blockwise(big, bits=4).nbytes < quantize_blockwise(big, bits=8).nbytes


@PROPS
@given(n=st.integers(2, 600), bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_minmax_matches_q_galore_formula(n: int, bits: int, seed: int) -> None:
    """Q-GaLore: s = max(max-min, 1e-5)/(2^b - 1), z = clamp(-round(min/s)), q = clamp(round(x/s)+z);
    error <= s/2 when the block holds both signs."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    x[0], x[-1] = -abs(float(x[0])) - 0.1, abs(float(x[-1])) + 0.1  # both signs in every block
    q = quantize_blockwise(x, bits=bits, block_size=n + (n % 2), scheme="minmax")
    levels = 2**bits - 1
    s = (x.max() - x.min()).clamp_min(1e-5) / levels
    z = torch.round(-x.min() / s).clamp(0, levels)
    ref = (torch.round(x / s) + z).clamp(0, levels)
    torch.testing.assert_close(q.dequantize(), s * (ref - z))
    assert bool(((x - q.dequantize()).abs() <= s / 2 * (1 + 1e-5)).all())


def test_minmax_one_signed_block_clamps_zero_point() -> None:
    """An all-positive block puts z at 0 and clamps like Q-GaLore: the error can exceed s/2."""
    x = torch.linspace(10.0, 11.0, 16)
    q = quantize_blockwise(x, bits=4, block_size=16, scheme="minmax")
    assert q.zeros is not None and int(q.zeros[0]) == 0
    assert float((x - q.dequantize()).abs().max()) > float(q.scales[0])


@pytest.mark.parametrize(("bits", "scheme"), [(8, "absmax"), (4, "absmax"), (4, "minmax")])
def test_stochastic_rounding_is_unbiased(bits: int, scheme: str) -> None:
    """Card §2 test 2: the mean of dequant(SR(x)) over 10^4 draws -> x. Per element the SR variance
    is <= s^2/4, so the mean is within 4.5 sigma = 4.5 (s/2)/100 for all 64 elements (seeded).
    minmax clamps q to [0, 2^b - 1], which biases values within one step of the block's min/max
    (as in Q-GaLore): those are left out there."""
    draws, block = 10_000, 64
    x = torch.randn(block, generator=torch.Generator().manual_seed(1))
    q = quantize_blockwise(x.repeat(draws), bits=bits, block_size=block, scheme=scheme, stochastic=True,
                           generator=torch.Generator().manual_seed(2))
    samples = q.dequantize().view(draws, block)
    s = float(q.scales[0])  # every block holds the same values, hence the same scale
    assert bool(((samples - x).abs() <= s * (1 + 1e-5)).all())  # within one step
    inner = torch.ones_like(x, dtype=torch.bool)
    if scheme == "minmax":
        inner = (x - x.min() > s) & (x.max() - x > s)
    assert int(inner.sum()) > block // 2
    err = (samples.mean(0) - x).abs()[inner]
    assert bool((err <= 4.5 * (s / 2) / math.sqrt(draws)).all())
    det = quantize_blockwise(x, bits=bits, block_size=block, scheme=scheme).dequantize()
    assert not torch.equal(samples[0], samples[1]) and not torch.equal(samples.mean(0), det)


def test_state_dict_round_trip_through_safetensors(tmp_path) -> None:  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    x = torch.randn(5, 77)
    for kwargs in ({"bits": 8}, {"bits": 4}, {"bits": 4, "scheme": "minmax"}):
        q = quantize_blockwise(x, block_size=64, **kwargs)
        state = q.state_dict()
        assert all(isinstance(v, torch.Tensor | int) for v in state.values())
        tensors = {k: v if isinstance(v, torch.Tensor) else torch.tensor(v) for k, v in state.items()}
        save_file(tensors, tmp_path / "q.safetensors")
        back = QuantizedTensor.from_state_dict(load_file(tmp_path / "q.safetensors"))
        assert torch.equal(dequantize_blockwise(back), q.dequantize())
        assert back.shape == (5, 77) and back.scheme == q.scheme


def test_zero_block_and_errors() -> None:
    x = torch.zeros(300)
    x[280:] = 1.0
    q = quantize_blockwise(x, block_size=256)
    assert float(q.scales[0]) == 0.0 and torch.equal(q.dequantize(), x)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_blockwise(x, bits=3)
    with pytest.raises(ValueError, match="even block_size"):
        quantize_blockwise(x, bits=4, block_size=3)
    with pytest.raises(ValueError, match="NaN"):
        quantize_blockwise(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="floating"):
        quantize_blockwise(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="missing"):
        QuantizedTensor.from_state_dict({"data": q.data})
