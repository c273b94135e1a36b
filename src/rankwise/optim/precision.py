"""Numerics around the update: one finiteness check over all gradients, stochastic rounding.

* `all_finite`: the optimizer checks every gradient of a step *before* touching any parameter
  or state, so a refused step (NaN/inf) leaves the model and the state bit-identical and a loop
  that skips the batch continues from a consistent point. One reduction per tensor (a sum: it
  is non-finite iff an entry is, barring an fp32 overflow of the sum itself) and one Python
  sync for the whole step, instead of a full-size boolean mask per tensor.
* `round_stochastic_`: fp32 -> bf16 with probability proportional to the distance to each
  neighbour (unbiased: E[round(x)] = x), by adding 16 uniform random bits below bf16's
  mantissa and truncating (Gupta et al. 2015, "Deep learning with limited numerical
  precision", §3, eq. 3; the bf16 bit trick of Zamirai et al. 2020). Updates far below one bf16
  ulp of the weight then still move it on average, where round-to-nearest drops them all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rankwise.optim import distributed as dist_


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when no tensor holds NaN/inf (DTensors: every rank's shard, all-reduced)."""
    if not tensors:
        return True
    local = [dist_.local(t) for t in tensors]
    dev = local[0].device  # (a model split across devices: the sums meet on the first one)
    sums = torch.stack([t.sum(dtype=torch.float32).to(dev, non_blocking=True) for t in local])
    bad = (~torch.isfinite(sums)).any()
    if any(dist_.is_dtensor(t) for t in tensors):  # pragma: no cover - needs a process group
        import torch.distributed as dist

        flag = bad.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = flag.bool()
    return not bool(bad)


def round_stochastic_(out: torch.Tensor, value: torch.Tensor, seed: int) -> torch.Tensor:
    """Write fp32 `value` into bf16 `out` by stochastic rounding (seeded: resumable).

    Adds uniform random bits to the 16 low bits of the fp32 pattern, then clears them: the
    result is the upper neighbour with probability (x - lo) / (hi - lo). Non-finite entries
    and values whose rounding would carry into the exponent's top are left to the carry (the
    pattern stays ordered, so x rounds to its neighbours only).
    """
    if out.dtype != torch.bfloat16:
        return out.copy_(value)
    bits = value.detach().to(torch.float32).contiguous().view(torch.int32)
    gen = torch.Generator(device=value.device).manual_seed(int(seed) % (2**63 - 1))
    noise = torch.randint(0, 1 << 16, bits.shape, generator=gen, dtype=torch.int32,
                          device=value.device)
    rounded = bits.add(noise).bitwise_and_(-65536)  # 0xFFFF0000: keep sign, exponent, 7 bits
    return out.copy_(rounded.view(torch.float32))  # exact: the low 16 bits are zero
