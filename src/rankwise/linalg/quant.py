"""Blockwise int8 / int4 quantisation for projectors, optimizer states and weights.

A tensor is flattened and cut into blocks of `block_size` consecutive elements (the last block is
padded with its own last value, which changes neither its max nor its min); each block gets one
fp32 scale. Two schemes:

- "absmax" (symmetric, default; bitsandbytes-style): s = max|x| / qmax with qmax = 2^(bits-1) - 1
  (127 or 7), q = round(x / s) in [-qmax, qmax], x^ = s q. Deterministic rounding errs by at most
  s / 2 per element, and values already on the grid (x = s q) round-trip exactly.
- "minmax" (asymmetric, Q-GaLore's projector and weight quantiser, Zhang et al. 2024):
  s = max(max - min, 1e-5) / (2^bits - 1), z = clamp(-round(min / s), 0, 2^bits - 1),
  q = clamp(round(x / s) + z, 0, 2^bits - 1), x^ = s (q - z). Stores one uint8 zero point per
  block too. Within s / 2 when the block holds both signs (min <= 0 <= max); an all-positive or
  all-negative block clamps z and can err by many s (as in Q-GaLore).

Storage: bits=8 -> one byte per element (int8 for absmax, uint8 for minmax); bits=4 -> two values
per uint8 (element 2i in the low nibble, 2i+1 in the high nibble; absmax stores q + 8).
Stochastic rounding (Q-GaLore's weights): round(v) becomes floor(v + u), u ~ U[0, 1), which is
unbiased: E[x^] = x (inside the grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from rankwise.linalg._checks import raise_if_nonfinite, validate_int

__all__ = ["QuantizedTensor", "dequantize_blockwise", "quantize_blockwise"]

Scheme = Literal["absmax", "minmax"]


@dataclass(frozen=True, eq=False)  # eq on tensors would be ambiguous
class QuantizedTensor:
    """A blockwise-quantised tensor: plain tensors and ints only (safe for state_dict/safetensors).

    Attributes:
        data: int8 (8-bit absmax) or uint8 (8-bit minmax; 4-bit packed, 2 per byte) (numel,).
        scales: fp32 (num_blocks,) one scale per block.
        shape: the original shape.
        bits: 8 or 4.
        block_size: elements per block.
        zeros: uint8 (num_blocks,) zero points for the "minmax" scheme, None for "absmax".
    """

    data: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]
    bits: int
    block_size: int
    zeros: torch.Tensor | None = None

    @property
    def scheme(self) -> Scheme:
        return "absmax" if self.zeros is None else "minmax"

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantised form (data + scales + zero points)."""
        total = self.data.numel() * self.data.element_size() + self.scales.numel() * 4
        return total + (0 if self.zeros is None else self.zeros.numel())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reconstructed tensor x^ (shape) in `dtype`."""
        return dequantize_blockwise(self, dtype)

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Tensors (data, scales, shape as int64, zeros if any) and ints (bits, block_size)."""
        out: dict[str, torch.Tensor | int] = {
            "data": self.data,
            "scales": self.scales,
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "bits": self.bits,
            "block_size": self.block_size,
        }
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor | int]) -> QuantizedTensor:
        """Inverse of state_dict (ints may also come back as 0-d tensors)."""
        try:
            shape = tuple(int(v) for v in torch.as_tensor(state["shape"]).reshape(-1).tolist())
            return cls(
                data=state["data"],  # type: ignore[arg-type]
                scales=state["scales"],  # type: ignore[arg-type]
                shape=shape,
                bits=int(state["bits"]),
                block_size=int(state["block_size"]),
                zeros=state.get("zeros"),  # type: ignore[arg-type]
            )
        except KeyError as exc:
            raise ValueError(f"quantised state is missing {exc}: was it saved by QuantizedTensor.state_dict?") from None


def quantize_blockwise(
    x: torch.Tensor,
    bits: int = 8,
    block_size: int = 256,
    *,
    scheme: Scheme = "absmax",
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> QuantizedTensor:
    """Quantise x blockwise to `bits` (8 or 4) with one fp32 scale per `block_size` elements.

    Args:
        x: any-shape real floating tensor, finite.
        bits: 8 or 4 (4-bit values are packed two per byte; block_size must then be even).
        block_size: elements per block (>= 1). Q-GaLore: 256; bitsandbytes 8-bit Adam: 2048.
        scheme: "absmax" (symmetric) or "minmax" (asymmetric with zero point); module doc.
        stochastic: stochastic rounding floor(v + u) instead of round-to-nearest.
        generator: RNG for stochastic rounding (None: global RNG).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError("x is empty: nothing to quantise")
    raise_if_nonfinite(x, "x")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    block_size = validate_int(block_size, "block_size", minimum=1)
    if bits == 4 and block_size % 2:
        raise ValueError(f"4-bit packing needs an even block_size, got {block_size}: use e.g. 256")
    if scheme not in ("absmax", "minmax"):
        raise ValueError(f"scheme must be 'absmax' or 'minmax', got {scheme!r}")

    flat = x.detach().reshape(-1).to(torch.float32)
    n_blocks = math.ceil(flat.numel() / block_size)
    pad = n_blocks * block_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    blocks = flat.view(n_blocks, block_size)

    if scheme == "absmax":
        qmax = 2 ** (bits - 1) - 1
        scales = blocks.abs().amax(1) / qmax  # (n_blocks,)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = _round(blocks / safe[:, None], stochastic, generator).clamp_(-qmax, qmax)
        zeros = None
        if bits == 8:
            data = q.to(torch.int8).reshape(-1)
        else:
            data = _pack4((q + 8).to(torch.uint8).reshape(-1))
    else:
        levels = 2**bits - 1
        lo, hi = blocks.amin(1), blocks.amax(1)
        scales = (hi - lo).clamp_min(1e-5) / levels
        z = torch.round(-lo / scales).clamp_(0, levels)
        q = (_round(blocks / scales[:, None], stochastic, generator) + z[:, None]).clamp_(0, levels)
        zeros = z.to(torch.uint8)
        data = q.to(torch.uint8).reshape(-1)
        if bits == 4:
            data = _pack4(data)
    return QuantizedTensor(data, scales.contiguous(), tuple(x.shape), bits, block_size, zeros)


def dequantize_blockwise(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct the tensor (q.shape) in `dtype` from a QuantizedTensor."""
    n_blocks = q.scales.numel()
    if q.bits == 4:
        values = _unpack4(q.data).to(torch.float32)
    else:
        values = q.data.to(torch.float32)
    if values.numel() != n_blocks * q.block_size:
        raise ValueError(
            f"corrupt QuantizedTensor: {values.numel()} values for {n_blocks} blocks of {q.block_size}"
        )
    values = values.view(n_blocks, q.block_size)
    if q.zeros is None:
        if q.bits == 4:
            values = values - 8
        out = values * q.scales[:, None]
    else:
        out = (values - q.zeros.to(torch.float32)[:, None]) * q.scales[:, None]
    numel = math.prod(q.shape)
    return out.reshape(-1)[:numel].reshape(q.shape).to(dtype)


def _round(v: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
    if not stochastic:
        return torch.round(v)
    u = torch.rand(v.shape, generator=generator, dtype=v.dtype, device=generator.device if generator else v.device)
    return torch.floor(v + u.to(v.device))


def _pack4(nibbles: torch.Tensor) -> torch.Tensor:
    """(2k,) uint8 values in [0, 15] -> (k,) uint8: element 2i low nibble, 2i+1 high nibble."""
    pairs = nibbles.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def _unpack4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack4: (k,) uint8 -> (2k,) uint8 in [0, 15]."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
