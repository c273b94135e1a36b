"""One fused pass for Adam on 8-bit moments: decode, update, re-encode (qstate.py's codec).

The eager path (`qstate.read` -> Adam -> `qstate.write`) runs ~15 elementwise passes over
each moment (decode, the companding powers, block absmax, divide, round, cast), and on a
memory-bound step that was 1.6x galore-torch's fp32 step (benchmarks/results/optim.md). Here
the same arithmetic is one function compiled by ``torch.compile`` (inductor fuses it into a
couple of loops: C++ on CPU, Triton on GPU): the codes, the scales and the gradient are read
once, the new codes and scales written once, and the update returned. The compand is qstate's
(M stored as sign(M)|M|^(1/2), V as V^(1/4); block absmax / 127 scales).

Used for moments of at least `MIN_FUSED` entries (smaller ones are not worth a compile, and
stay on the eager path); the first call compiles (seconds; once per process and dtype). When
torch.compile is unavailable or fails (no C++ compiler), or ``RANKWISE_COMPILE=0`` is set,
`adam_update` returns None and the caller takes the eager path: the two agree to rounding
(tests/optim/test_optim_fused.py).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

MIN_FUSED = 16384  # entries: below this the eager codec costs less than a compiled call
_QMAX = 127.0
_compiled: Any = None
_disabled = os.environ.get("RANKWISE_COMPILE", "1") == "0"


def _adam8(g: torch.Tensor, mc: torch.Tensor, ms: torch.Tensor, vc: torch.Tensor,
           vs: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, inv_sqrt_bc2: torch.Tensor,
           eps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Adam on (blocks, block_size) codes: returns alpha * M / (sqrt(V) / sqrt(bc2) + eps)
    and writes the new codes and scales in place."""
    y = mc.to(torch.float32) * ms[:, None]
    m = y * y.abs()
    z = vc.to(torch.float32) * vs[:, None]
    z = z * z
    v = z * z
    m = m + (1.0 - b1) * (g - m)  # torch's lerp form, as _fused_adamw_
    v = b2 * v + (1.0 - b2) * g * g
    out = alpha * m / (v.sqrt() * inv_sqrt_bc2 + eps)
    ym = m.abs().sqrt()
    sm = ym.amax(1) / _QMAX
    mc.copy_(torch.round(torch.copysign(ym, m) / torch.where(sm > 0, sm, 1.0)[:, None]))
    ms.copy_(sm)
    yv = v.clamp(min=0).sqrt().sqrt()
    sv = yv.amax(1) / _QMAX
    vc.copy_(torch.round(yv / torch.where(sv > 0, sv, 1.0)[:, None]))
    vs.copy_(sv)
    return out


def _adam8_into(w: torch.Tensor, decay: torch.Tensor, *args: torch.Tensor) -> None:
    """`_adam8` that also writes the weight: w <- w * decay + update (no update tensor)."""
    w.copy_(w * decay + _adam8(*args))


def _kernel(into: bool) -> Any:
    global _compiled
    if _compiled is None:
        _compiled = (torch.compile(_adam8, dynamic=True),
                     torch.compile(_adam8_into, dynamic=True))
    return _compiled[1 if into else 0]


def adam_update(state: dict[str, Any], g: torch.Tensor, *, beta1: float, beta2: float,
                eps: float, k: int, alpha: float, style: str, param: torch.Tensor | None = None,
                decay: float = 1.0) -> torch.Tensor | None:
    """Adam's step on the 8-bit moments ``exp_avg`` / ``exp_avg_sq`` of `state` (qstate
    layout) for gradient `g` at moment step `k`, in one fused pass (moments updated in place).

    Returns ``alpha * M / (sqrt(V) / sqrt(bc2) + eps')`` shaped like `g` (the caller passes
    alpha = -lr / bc1: torch's AdamW step; eps' = eps for the "torch" style, eps / sqrt(bc2)
    for "galore", whose eps is added to sqrt(V): the identity of
    `lowrank_update._fused_adamw`), or None when the fused path does not apply (fp32 moments,
    fewer than `MIN_FUSED` entries, torch.compile unavailable). With `param` (a contiguous
    fp32 tensor of g's size filling whole blocks) the pass also applies
    ``param <- param * decay + update`` and returns `param`: the weight is read and written
    once, and no update-sized tensor is allocated (the embedding's is 113 MB on SmolLM2)."""
    global _disabled
    pre_m, pre_v = "exp_avg_q_", "exp_avg_sq_q_"
    if _disabled or pre_m + "codes" not in state or g.numel() < MIN_FUSED:
        return None
    mc, ms = state[pre_m + "codes"], state[pre_m + "scales"]
    vc, vs = state[pre_v + "codes"], state[pre_v + "scales"]
    if mc.shape != vc.shape or g.device != mc.device:
        return None
    bc2 = 1.0 - beta2**k
    eps_ = eps / math.sqrt(bc2) if style == "galore" else eps
    flat = g.reshape(-1).to(torch.float32)
    pad = mc.numel() - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    scalars = torch.tensor([beta1, beta2, 1.0 / math.sqrt(bc2), eps_, alpha, decay],
                           dtype=torch.float32, device=g.device).unbind()
    args = (flat.view(mc.shape), mc, ms, vc, vs, *scalars[:5])
    into = (param is not None and not pad and param.dtype == torch.float32
            and param.is_contiguous() and param.device == mc.device)
    try:
        if into:
            _kernel(True)(param.view(mc.shape), scalars[5], *args)
            return param
        out = _kernel(False)(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, once
        _disabled = True
        logger.warning("fused 8-bit Adam unavailable (%s: %s); using the eager codec",
                       type(exc).__name__, exc)
        return None
    return out.view(-1)[: g.numel()].view(g.shape)
