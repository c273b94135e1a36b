"""INT8 / INT4 weights trained in place: Q-GaLore's quantised weights (Zhang et al. 2024, §3.4).

Q-GaLore keeps each projected linear's weight only as low-bit codes plus one scale per group
of ``group_size`` consecutive entries; the forward (and backward) dequantise on the fly, and
after each optimizer step the full-precision ``W + dW`` is re-quantised with *stochastic
rounding* (round up with probability equal to the fractional part), so that E[Q(W)] = W and an
update smaller than half a quantisation step still moves the weight on average (§3.4,
"stochastic rounding"; with round-to-nearest such updates are all lost).

`quantize_weights_(model, bits=8, group_size=256)` swaps target ``nn.Linear`` modules for
`QuantizedWeightLinear`. The codec is `rankwise.linalg.quantize_blockwise` ("absmax": symmetric,
scale = max|W_group| / (2^(bits-1) - 1); 4-bit codes packed two per byte). What the optimizer
sees is ``module.weight``: a *proxy* parameter of the weight's shape and dtype whose storage is
one element (an expanded 0-d tensor), so it costs nothing and receives the full-precision
gradient dL/dW through `_QuantizedMatmul`. `LowRankOptimizer` recognises a proxy
(`store_of`), applies its update to the dequantised fp32 weight and writes it back with
`QuantizedWeightLinear.requantize_` (lowrank_update's ``_target`` / ``_commit``), seeded by
(parameter, step) so that resume is exact. Other optimizers must not step a proxy.

Model state_dict: ``weight_codes`` and ``weight_scales`` buffers (the proxy is left out), so
``model.load_state_dict`` restores the weights bit-exactly into a model quantised the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

__all__ = ["QuantizedWeightLinear", "quantized_weight_bytes", "quantize_weights_", "store_of"]

_ATTR = "_rankwise_qweight"  # the proxy parameter -> its QuantizedWeightLinear


def quantized_weight_bytes(shape: Sequence[int], bits: int = 8, group_size: int = 256) -> int:
    """Bytes of a (m, n) weight stored as `bits`-bit codes + one fp32 scale per group."""
    numel = math.prod(int(d) for d in shape)
    groups = math.ceil(numel / group_size)
    return groups * group_size * bits // 8 + 4 * groups


def _check(bits: Any, group_size: Any) -> None:
    if bits not in (8, 4) or isinstance(bits, bool):
        raise ValueError(f"bits={bits!r}: quantised weights are stored in 8 or 4 bits "
                         "(Q-GaLore: 8); pass bits=8 or bits=4")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive int (Q-GaLore: 256)")
    if bits == 4 and group_size % 2:
        raise ValueError(f"4-bit codes are packed two per byte: group_size {group_size} must "
                         "be even (e.g. 256)")


class _QuantizedMatmul(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantised from codes, recomputed in backward (nothing but x is
    saved); the gradient of W goes to the proxy parameter, in the proxy's dtype."""

    @staticmethod
    def forward(ctx, x, proxy, bias, module):  # noqa: ANN001, ANN205 - autograd signature
        w = module.dequantize(x.dtype)
        ctx.save_for_backward(x)
        ctx.module, ctx.proxy_dtype, ctx.has_bias = module, proxy.dtype, bias is not None
        ctx.version = module.weight_codes._version  # a step between forward and backward
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        module = ctx.module
        if module.weight_codes._version != ctx.version:
            raise RuntimeError("the quantised weight changed between forward and backward "
                               "(an optimizer step ran in between): step after backward")
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ module.dequantize(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = (g2.mT @ x.reshape(-1, x.shape[-1])).to(ctx.proxy_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None


class QuantizedWeightLinear(nn.Module):
    """A linear layer whose weight lives as int8 (or packed int4) codes + fp32 group scales.

    Args:
        linear: the ``nn.Linear`` to replace (its weight is quantised round-to-nearest once).
        bits: 8 or 4.
        group_size: entries per scale (consecutive in the row-major weight; Q-GaLore: 256).
        stochastic: re-quantise after each step by stochastic rounding (Q-GaLore's default);
            False rounds to nearest (small updates are then lost: for comparison only).
    """

    def __init__(self, linear: nn.Linear, *, bits: int = 8, group_size: int = 256,
                 stochastic: bool = True) -> None:
        super().__init__()
        _check(bits, group_size)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantizedWeightLinear replaces an nn.Linear, got "
                            f"{type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size, self.stochastic = bits, group_size, bool(stochastic)
        w = linear.weight.detach()
        q = self._codec().quantize_blockwise(w.float(), bits=bits, block_size=group_size)
        self.register_buffer("weight_codes", q.data)
        self.register_buffer("weight_scales", q.scales)
        self.weight = nn.Parameter(self._proxy(w.dtype, w.device),
                                   requires_grad=linear.weight.requires_grad)
        setattr(self.weight, _ATTR, self)
        self.bias = linear.bias

    @staticmethod
    def _codec() -> Any:
        from rankwise import linalg

        return linalg

    def _proxy(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.zeros((), dtype=dtype, device=device).expand(self.out_features,
                                                                  self.in_features)

    def _q(self) -> Any:
        return self._codec().QuantizedTensor(
            self.weight_codes, self.weight_scales, (self.out_features, self.in_features),
            self.bits, self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) rebuilt from codes and scales, in `dtype`."""
        return self._codec().dequantize_blockwise(self._q(), dtype)

    @torch.no_grad()
    def requantize_(self, value: torch.Tensor, seed: int) -> None:
        """Store the (out, in) float `value` as the new weight: fresh group scales, then
        stochastic rounding seeded by `seed` (or round-to-nearest if not `stochastic`)."""
        gen = None
        if self.stochastic:
            gen = torch.Generator(device=value.device).manual_seed(int(seed) % (2**63 - 1))
        q = self._codec().quantize_blockwise(value.float(), bits=self.bits,
                                             block_size=self.group_size,
                                             stochastic=self.stochastic, generator=gen)
        self.weight_codes.copy_(q.data)
        self.weight_scales.copy_(q.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizedMatmul.apply(x, self.weight, self.bias, self)

    def weight_bytes(self) -> int:
        """Bytes held for the weight: codes + scales (the proxy's one element excluded)."""
        return sum(t.numel() * t.element_size() for t in (self.weight_codes, self.weight_scales))

    # -- the proxy stays one element through .to() / .half(); scales stay fp32
    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        super()._apply(fn, recurse)
        self.weight.data = self._proxy(self.weight.dtype, self.weight.device)
        if self.weight_scales.dtype != torch.float32:
            self.weight_scales = self.weight_scales.float()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight", None)  # the proxy holds no value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: ANN001
        state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
        proxy = self._parameters.pop("weight")
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
        finally:
            self._parameters["weight"] = proxy

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
                f"stochastic={self.stochastic}")


def store_of(p: torch.Tensor) -> QuantizedWeightLinear | None:
    """The `QuantizedWeightLinear` whose proxy is `p`, or None for an ordinary parameter."""
    return getattr(p, _ATTR, None)


def quantize_weights_(
    model: nn.Module,
    *,
    bits: int = 8,
    group_size: int = 256,
    target_modules: str | Sequence[str] | None = None,
    stochastic: bool = True,
) -> list[str]:
    """Replace target linears of `model` by `QuantizedWeightLinear` (in place; Q-GaLore's INT8
    weights). Default targets: GaLore's projected matrices (linears named ``*attn*`` /
    ``*mlp*``); `target_modules` takes PEFT's vocabulary. Returns the replaced names.

    Build the optimizer *after* this call (``rankwise.optim.create("q_galore_adamw8bit",
    model, ...)``): the proxies are the new parameters.
    """
    _check(bits, group_size)
    if target_modules is None:
        named = {n: m for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and ("attn" in n or "mlp" in n)}
        if not named:
            raise ValueError("no nn.Linear named *attn* or *mlp* in the model: pass "
                             "target_modules=[...] naming the linears to quantise")
    else:
        from rankwise.surgery import find_modules

        named = find_modules(model, target_modules, types=[nn.Linear])
    bad = [n for n, m in named.items() if not isinstance(m, nn.Linear)]
    if bad:
        raise TypeError(f"quantize_weights_ replaces nn.Linear modules only; {bad[:3]} are "
                        "not: name linear layers in target_modules")
    for name, module in named.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedWeightLinear(module, bits=bits, group_size=group_size,
                                                     stochastic=stochastic))
    return list(named)
