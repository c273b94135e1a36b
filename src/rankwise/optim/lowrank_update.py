"""The per-parameter update of `LowRankOptimizer`, once the gradient is known to be finite.

For a projected (m, n) weight at step t (0-based, before the step), in the state dtype
(`groups.state_dtype`: the parameter's own by default):

1. if t % T == 0 (or first call): refresh the projector from G; apply the moment policy;
2. R = down(G); Adam (or Adafactor, or SGD-momentum) on R gives N (low-rank), step size eta;
3. delta = scale * up(N) [+ residual term] (or G * s for APOLLO scaling);
4. W -= eta * delta, with decoupled decay before (torch style) or after (galore style).

The weight is written once per step by in-place ops (``addcmul_``; the low-rank part by one
GEMM and one add, `Projector.add_up_`, or ``addmm_`` with no (m, n) temporary for matrices
over 2^24 entries), or, with ``stochastic_rounding`` on a bf16 weight, into
an fp32 copy rounded back stochastically (`precision.round_stochastic_`); a Q-GaLore quantised
weight (qweight.py) is always updated through a dequantised fp32 copy and re-quantised.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rankwise.optim import distributed as dist_
from rankwise.optim import full_gradient, qstate, qstate_fused, qweight
from rankwise.optim import functional as ofn
from rankwise.optim.groups import state_dtype
from rankwise.optim.precision import round_stochastic_
from rankwise.optim.projector import Projector

# (full, alpha, mult, low_term): W += alpha * full * mult + up(low_term), None terms left out
Delta = tuple[torch.Tensor | None, float, torch.Tensor | None, torch.Tensor | None]


def init_counters(state: dict[str, Any]) -> None:
    """Create the 0-d int64 ``step`` / ``moment_step`` counters of a parameter's state."""
    if "step" not in state:
        state["step"] = torch.tensor(0, dtype=torch.int64)
        state["moment_step"] = torch.tensor(0, dtype=torch.int64)


def _target(w: torch.Tensor, group: dict) -> torch.Tensor:
    """What the update writes into: `w`, or an fp32 copy to round back stochastically (a bf16
    weight with ``stochastic_rounding``; a quantised weight's proxy, qweight.py: always)."""
    store = qweight.store_of(w)
    if store is not None:
        return store.dequantize(torch.float32)
    if group["stochastic_rounding"] and w.dtype == torch.bfloat16:
        return w.float()
    return w


def _commit(w: torch.Tensor, target: torch.Tensor, state: dict, seed: int) -> None:
    if target is w:
        return
    seed = seed * 1_000_003 + int(state["step"])
    store = qweight.store_of(w)
    if store is not None:  # Q-GaLore: W + dW back to int8/int4 by stochastic rounding
        store.requantize_(target, seed)
    else:
        round_stochastic_(w, target, seed)


def plain_adamw(p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict, seed: int) -> None:
    """AdamW (torch or galore style) on an unprojected parameter, moments in the state dtype
    (or 8-bit codes for tensors of at least ``min_8bit_size`` entries)."""
    init_counters(state)
    w, g = dist_.local(p), dist_.local(grad)
    dtype = state_dtype(p, group)
    bits = group["state_bits"] if g.numel() >= group["min_8bit_size"] else 32
    if "exp_avg" not in state and not qstate.is_quantized(state, "exp_avg"):
        qstate.init(state, "exp_avg", g.shape, g.device, bits, group["block_size"], signed=True,
                    dtype=dtype)
        qstate.init(state, "exp_avg_sq", g.shape, g.device, bits, group["block_size"],
                    signed=False, dtype=dtype)
    beta1, beta2 = group["betas"]
    lr, wd, style = group["lr"], group["weight_decay"], group["adam_style"]
    state["step"] += 1
    state["moment_step"] += 1
    k = int(state["moment_step"])
    target = _target(w, group)
    if bits == 8 and target is w and (style == "torch" or not wd):
        upd = qstate_fused.adam_update(state, g, beta1=beta1, beta2=beta2, eps=group["eps"],
                                       k=k, alpha=-lr / (1.0 - beta1**k), style=style,
                                       param=w, decay=1.0 - lr * wd)
        if upd is not None:  # one compiled pass over codes, scales, G (and W)
            if upd is not w:
                ofn.decoupled_decay_(w, lr, wd)
                w.add_(upd.to(w.dtype))
            return
    m, v = qstate.read(state, "exp_avg"), qstate.read(state, "exp_avg_sq")
    if _fusable(w, g, m, target, group):
        _fused_adamw(w, g.to(m.dtype), m, v, k, group)
        qstate.write(state, "exp_avg", m)
        qstate.write(state, "exp_avg_sq", v)
        return
    if style == "torch":
        ofn.decoupled_decay_(target, lr, wd)
    ofn.adam_moments_(m, v, g.to(m.dtype), beta1, beta2)
    denom, step_size = ofn.adam_denom(v, k, lr=lr, beta1=beta1, beta2=beta2,
                                      eps=group["eps"], style=style)
    target.addcdiv_(m.to(target.dtype), denom.to(target.dtype), value=-step_size)
    qstate.write(state, "exp_avg", m)
    qstate.write(state, "exp_avg_sq", v)
    if style == "galore" and wd:
        target.add_(target, alpha=-lr * wd)
    _commit(w, target, state, seed)


def _fusable(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, target: torch.Tensor,
             group: dict) -> bool:
    """torch's fused AdamW kernel (one pass over W, G, M, V) applies when the weight is updated
    in place in the moments' dtype; galore-style decay (after the update) is not its order."""
    return (hasattr(torch, "_fused_adamw_") and target is w and not dist_.is_dtensor(w)
            and w.dtype == m.dtype and g.dtype in (m.dtype, torch.float32, torch.bfloat16)
            and w.is_contiguous() and g.shape == w.shape and w.device.type in ("cpu", "cuda")
            and (group["adam_style"] == "torch" or not group["weight_decay"]))


def _fused_adamw(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, k: int,
                 group: dict) -> None:
    """AdamW through ``torch._fused_adamw_`` (the kernel of ``torch.optim.AdamW(fused=True)``).

    The galore style (eps on sqrt(V), bias correction in the step size) is the same update with
    eps' = eps / sqrt(1 - beta2^k): lr sqrt(bc2)/bc1 * M/(sqrt(V) + eps) =
    lr/bc1 * M/(sqrt(V)/sqrt(bc2) + eps/sqrt(bc2)).
    """
    beta1, beta2 = group["betas"]
    eps = group["eps"]
    if group["adam_style"] == "galore":
        eps = eps / math.sqrt(1.0 - beta2**k)
    step = torch.tensor(float(k), device=w.device)
    torch._fused_adamw_([w], [g.contiguous()], [m], [v], [], [step], lr=group["lr"],
                        beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=eps,
                        amsgrad=False, maximize=False)


def lowrank_step(p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict,
                 proj: Projector, seed: int) -> None:
    """Steps 1-4 of the module docstring for one projected parameter."""
    g = dist_.full(grad).to(state_dtype(p, group))  # (m, n): projection needs every row
    t = int(state["step"]) if "step" in state else 0
    due = proj.due(t, group["update_proj_gap"])
    old = None
    if group["moment_policy"] == "reproject" and proj.initialized and due:
        old = proj.basis().float().clone()
    if proj.maybe_update(g, t, group["update_proj_gap"]):
        on_refresh(proj, group, state, old, g.device, g.dtype)
    low = proj.down(g)  # R: (m, r) right / (r, n) left
    init_counters(state)
    state["step"] += 1
    state["moment_step"] += 1
    k = int(state["moment_step"])
    lr, wd, scale = group["lr"], group["weight_decay"], group["scale"]
    full, alpha, mult = None, 1.0, None
    if group["rule"] == "adafactor":
        low_term = adafactor_low(low, group, state, k).mul_(-scale)
        decay_before = True
    elif group["rule"] == "sgd":  # linear, so any full-rank orthogonal P gives plain SGD
        buf = state["momentum_buffer"]
        buf.mul_(group["betas"][0]).add_(low)
        low_term, decay_before = buf.mul(-lr * scale), True
    else:
        full, alpha, mult, low_term = adam_delta(g, low, proj, group, state, k)
        decay_before = group["adam_style"] == "torch"
    w = dist_.local(p)
    target = _target(w, group)
    if decay_before:
        ofn.decoupled_decay_(target, lr, wd)
    _apply(target, p, proj, (full, alpha, mult, low_term))
    if not decay_before and wd:
        target.add_(target, alpha=-lr * wd)
    _commit(w, target, state, seed)


def _apply(w: torch.Tensor, p: torch.Tensor, proj: Projector, delta: Delta) -> None:
    """``w += alpha * full * mult + up(low_term)`` in place (one pass, one GEMM)."""
    full, alpha, mult, low_term = delta
    if full is not None and mult is not None and not dist_.is_dtensor(p):
        w.addcmul_(full.to(w.dtype), mult.to(w.dtype), value=alpha)  # one pass, no temp
    elif full is not None:
        full = full * mult if mult is not None else full
        w.add_(dist_.shard_like(full, p).to(w.dtype), alpha=alpha)
    if low_term is not None:
        if dist_.is_dtensor(p) or w.dtype != low_term.dtype:
            w.add_(dist_.shard_like(proj.up(low_term), p).to(w.dtype))
        else:
            proj.add_up_(w, low_term)


def adam_delta(g: torch.Tensor, low: torch.Tensor, proj: Projector, group: dict, state: dict,
               k: int) -> Delta:
    """Adam in the subspace; returns ``(full, alpha, mult, low_term)`` with the update
    ``W += alpha * full * mult + up(low_term)`` (None terms left out; `mult` broadcasts:
    a per-channel or 0-d scale, so that the product is never formed)."""
    beta1, beta2 = group["betas"]
    scale = group["scale"]
    if group["scaling"] is None and group["residual"] == "drop":
        upd = qstate_fused.adam_update(state, low, beta1=beta1, beta2=beta2, eps=group["eps"],
                                       k=k, alpha=-group["lr"] * scale / (1.0 - beta1**k),
                                       style=group["adam_style"])
        if upd is not None:  # 8-bit moments: decode, Adam and encode in one compiled pass
            return None, 1.0, None, upd.to(g.dtype)
    m, v = qstate.read(state, "exp_avg"), qstate.read(state, "exp_avg_sq")
    low_m = low.to(m.dtype)
    if group["scaling"] is None and group["residual"] == "drop" and hasattr(
            torch, "_fused_adamw_") and low_m.device.type in ("cpu", "cuda"):
        # GaLore: the low-rank step is AdamW's update of a zero "parameter" (one fused pass
        # over M, V, R instead of eight); scale folds into the lr
        step = torch.zeros_like(low_m)
        _fused_adamw(step, low_m.contiguous(), m, v, k,
                     {**group, "lr": group["lr"] * scale, "weight_decay": 0.0})
        _write_moments(state, m, v)
        return None, 1.0, None, step.to(g.dtype)
    ofn.adam_moments_(m, v, low_m, beta1, beta2)
    denom, eta = ofn.adam_denom(v, k, lr=group["lr"], beta1=beta1, beta2=beta2,
                                eps=group["eps"], style=group["adam_style"])
    if group["scaling"] is None and group["residual"] == "drop":
        # (-eta * M) / denom, then up: the same arithmetic as torch's addcdiv, so an
        # identity projector reproduces torch.optim.AdamW bit for bit.
        step = m.mul(-eta).div_(denom)
        _write_moments(state, m, v)
        return None, 1.0, None, (step.mul_(scale) if scale != 1.0 else step).to(g.dtype)
    n = (m / denom).to(g.dtype)
    _write_moments(state, m, v)
    if group["scaling"] is not None:  # APOLLO: scale the raw gradient, no back-projection
        return (g, -eta, full_gradient.apollo_scale(g, low, n, proj, group, state), None)
    residual = group["residual"]
    if residual == "fira":
        return full_gradient.fira(g, low, n, proj, group, state, eta)
    if residual in ("sign", "sgd"):  # FRUGAL: state-free rule on what the subspace misses
        res = proj.residual(g, low)  # G - up(R), one GEMM into a new buffer
        res = res.sign_() if residual == "sign" else res
        return res, -group["lr"] * group["residual_scale"], None, n.mul_(-eta * scale)
    return None, 1.0, None, n.mul_(-eta * scale)


def _write_moments(state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
    qstate.write(state, "exp_avg", m)
    qstate.write(state, "exp_avg_sq", v)


def adafactor_low(low: torch.Tensor, group: dict, state: dict, k: int) -> torch.Tensor:
    """Adafactor (factored second moment, Shazeer & Stern 2018) on the projected gradient."""
    return ofn.adafactor_update_(
        low,
        state["exp_avg_sq_row"],
        state["exp_avg_sq_col"],
        state.get("exp_avg"),
        k,
        lr=group["lr"],
        beta1=group["adafactor_beta1"],
        decay_rate=group["decay_rate"],
        clip_threshold=group["clip_threshold"],
    )


def on_refresh(proj: Projector, group: dict, state: dict, old: torch.Tensor | None, device,
               dtype: torch.dtype) -> None:
    """Create moments on the first refresh; apply the moment policy on later ones."""
    shape = proj.low_shape
    zeros = {"device": device, "dtype": dtype}
    if group["rule"] == "adafactor":
        if "exp_avg_sq_row" not in state or group["moment_policy"] == "reset":
            state["exp_avg_sq_row"] = torch.zeros(shape[0], **zeros)
            state["exp_avg_sq_col"] = torch.zeros(shape[1], **zeros)
            if group["adafactor_beta1"] is not None:
                state["exp_avg"] = torch.zeros(shape, **zeros)
            state["moment_step"] = torch.tensor(0, dtype=torch.int64)
        return
    if group["rule"] == "sgd":
        if "momentum_buffer" not in state or group["moment_policy"] == "reset":
            state["momentum_buffer"] = torch.zeros(shape, **zeros)
        elif old is not None:
            buf = state["momentum_buffer"]
            rot = ofn.rotation(old, proj.basis(), proj.side).to(buf.dtype)
            buf.copy_(buf @ rot if proj.side == "right" else rot @ buf)
        return
    first = "exp_avg" not in state and not qstate.is_quantized(state, "exp_avg")
    if first or group["moment_policy"] == "reset":
        bits, block = group["state_bits"], group["block_size"]
        qstate.init(state, "exp_avg", shape, device, bits, block, signed=True, dtype=dtype)
        qstate.init(state, "exp_avg_sq", shape, device, bits, block, signed=False, dtype=dtype)
        state["moment_step"] = torch.tensor(0, dtype=torch.int64)
    elif old is not None:
        m, v = qstate.read(state, "exp_avg"), qstate.read(state, "exp_avg_sq")
        ofn.rotate_moments_(m, v, ofn.rotation(old, proj.basis(), proj.side), proj.side)
        _write_moments(state, m, v)


def active_blocks(n: int, density: float, order: str, period: int, seed: int) -> set[int]:
    """Indices (of a group's n matrices) that run AdamW during switch period `period`:
    ``max(1, round(n * density))`` of them, chosen as FRUGAL's BlockOptimizer does (random,
    ascending / descending cyclic, or mirror: pairs from both ends), as a function of the
    period only, so that resume needs no extra state."""
    a = max(1, round(n * float(density)))
    if order == "random":
        gen = torch.Generator().manual_seed((int(seed) * 7919 + period) % (2**63 - 1))
        return set(torch.randperm(n, generator=gen)[:a].tolist())
    if order == "ascending":
        return {(period * a + i) % n for i in range(a)}
    if order == "descending":
        return {(n - 1 - period * a - i) % n for i in range(a)}
    half, pairs = max(n // 2, 1), max(a // 2, 1)  # mirror
    picked = set()
    for i in range(pairs):
        j = (period * pairs + i) % half
        picked |= {j, n - 1 - j}
    return picked


def block_step(p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict, index: int,
               seed: int) -> None:
    """FRUGAL block-wise (Zmushko et al. 2024, Algorithm 1 with a block projection): all
    moments are dropped at each switch (t % T == 0); an active matrix then takes AdamW, an
    inactive one ``W -= lr * residual_scale * sign(G)`` (or G for residual="sgd"; nothing
    for "drop"), with decoupled decay on both."""
    init_counters(state)
    t, gap = int(state["step"]), int(group["update_proj_gap"])
    if t % gap == 0:
        for key in [k for k in state if k.startswith("exp_avg")]:
            del state[key]
        state["moment_step"] = torch.tensor(0, dtype=torch.int64)
    chosen = active_blocks(len(group["params"]), group["block_density"], group["block_order"],
                           t // gap, group["seed"])
    if index in chosen:
        plain_adamw(p, grad, group, state, seed)
        return
    state["step"] += 1
    w = dist_.local(p)
    target = _target(w, group)
    ofn.decoupled_decay_(target, group["lr"], group["weight_decay"])
    rule = group["residual"]
    if rule != "drop":
        g = dist_.local(grad)
        step = g.sign() if rule == "sign" else g
        target.add_(step.to(target.dtype), alpha=-group["lr"] * group["residual_scale"])
    _commit(w, target, state, seed)
