"""Moment storage: fp32 tensors, or 8-bit blockwise codes (the 8-bit-state optimizers).

An optimizer reads a moment as a float32 tensor, updates it, and writes it back. At 32 bits
the tensor *is* the state (`read` returns it, `write` is then a no-op); at 8 bits the state
holds int8 codes (blocks, block_size) and one fp32 absmax scale per block under flat keys
``{name}_q_*``, so the state stays tensors-only. The codec is written in place here rather
than through `rankwise.linalg.quantize_blockwise` (which allocates a new QuantizedTensor and
checks finiteness on every call): it runs twice per moment per step, on every 8-bit
parameter including the embedding, and that path was 4x galore-torch's step
(benchmarks/results/optim.md).

Both moments are companded before the linear blockwise code, because a linear int8 code
rounds every entry below 1/254 of its block's largest to 0 and Adam's moments span many orders
of magnitude inside a block (Dettmers et al.'s 8-bit optimizers use a non-linear "dynamic" map
for the same reason). We store ``sign(M) |M|^(1/2)`` and ``V^(1/4)``: measured on 100 Adam steps
with heavy-tailed gradients (benchmarks/optim.py, "8-bit moments"), this brings the update error
vs fp32 from ~0.10 (M linear, V as sqrt(V)) to ~0.04, on par with torchao's dynamic-tree
AdamW8bit (~0.04), at about half its step time and without a tensor subclass in the state.
"""

from __future__ import annotations

import math
from typing import Any

import torch

_QMAX = 127.0  # symmetric int8 code: [-127, 127] x per-block scale (absmax / 127)


def _prefix(name: str) -> str:
    return f"{name}_q_"


def init(
    state: dict[str, Any],
    name: str,
    shape: tuple[int, ...],
    device: torch.device | str,
    bits: int,
    block_size: int,
    *,
    signed: bool = True,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Create a zero moment `name` of `shape` stored at `bits` (32: a `dtype` tensor, the
    parameter's dtype by default in the optimizer; or 8: int8 codes + fp32 block scales)."""
    for key in [k for k in state if k == name or k.startswith(_prefix(name))]:
        del state[key]
    if bits == 32:
        state[name] = torch.zeros(tuple(shape), dtype=dtype, device=device)
        return
    numel = math.prod(shape)
    blocks = max(1, math.ceil(numel / block_size))
    pre = _prefix(name)
    state[pre + "block"] = torch.tensor(int(block_size), dtype=torch.int64)
    state[pre + "shape"] = torch.tensor(list(shape), dtype=torch.int64)
    state[pre + "codes"] = torch.zeros(blocks, block_size, dtype=torch.int8, device=device)
    state[pre + "scales"] = torch.zeros(blocks, dtype=torch.float32, device=device)


def is_quantized(state: dict[str, Any], name: str) -> bool:
    """True when moment `name` is stored as 8-bit codes."""
    return name not in state and _prefix(name) + "block" in state


def read(state: dict[str, Any], name: str) -> torch.Tensor:
    """The moment as a tensor: the state tensor itself at 32 bits, decoded fp32 at 8 bits."""
    if name in state:
        return state[name]
    pre = _prefix(name)
    codes, scales = state[pre + "codes"], state[pre + "scales"]
    shape = tuple(int(d) for d in state[pre + "shape"].tolist())
    y = torch.mul(codes, scales[:, None])  # int8 x fp32 -> fp32: decode in one kernel
    y = y.view(-1)[: math.prod(shape)].view(shape)
    if name.endswith("_sq"):
        return y.square_().square_()  # V = (V^(1/4))^4
    return y.mul_(y.abs())  # M = sign(y) y^2


def write(state: dict[str, Any], name: str, value: torch.Tensor) -> None:
    """Store `value` (float) back into moment `name`, in place.

    Blockwise absmax int8 of the companded value: scale_b = max|y| / 127 per block,
    code = round(y / scale_b). `value` itself is left unchanged.
    """
    if name in state:
        if state[name] is not value:
            state[name].copy_(value)
        return
    pre = _prefix(name)
    codes, scales = state[pre + "codes"], state[pre + "scales"]
    y = value.float().reshape(-1)
    if name.endswith("_sq"):
        y = y.clamp(min=0).sqrt_().sqrt_()  # V^(1/4) >= 0 (a new tensor: value untouched)
        mag = y
    else:
        mag = y.abs().sqrt_()  # sqrt|M|
        y = torch.copysign(mag, y)  # sign(M) sqrt|M| in one kernel
    pad = codes.numel() - y.numel()
    if pad:
        y = torch.cat([y, y.new_zeros(pad)])
        mag = torch.cat([mag, mag.new_zeros(pad)])
    blocks = y.view(codes.shape)
    torch.amax(mag.view(codes.shape), dim=1, out=scales)
    scales.div_(_QMAX)
    safe = torch.where(scales > 0, scales, 1.0)
    codes.copy_(blocks.div_(safe[:, None]).round_())
