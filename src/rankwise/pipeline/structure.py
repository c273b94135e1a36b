"""Structure helpers: fold EoRA paths into factors, count target parameters, list ranks.

An EoRA path over a factorised layer, `y = B_b (A_b x) + B_c (A_c x) + bias`, is itself a
factorised layer of rank `r_b + r_c` with `A = [A_b; A_c]` and `B = [B_b, B_c]`: folding it
keeps the parameter count exactly (`(r_b + r_c)(m + n)`), removes one matmul pair per layer
(latency), and leaves plain FactorizedLinear layers for healing and export.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from rankwise.layers.factorized import FactorizedLinear

__all__ = ["fold_compensation", "layer_table", "module_params", "target_params"]


def fold_compensation(model: nn.Module) -> int:
    """Replace every CompensatedLinear over a FactorizedLinear by one FactorizedLinear; returns the count."""
    from rankwise import surgery
    from rankwise.compress.eora import CompensatedLinear

    folded = 0
    for fqn, module in list(model.named_modules()):
        if not isinstance(module, CompensatedLinear) or not isinstance(module.base_layer, FactorizedLinear):
            continue
        base = module.base_layer
        A = torch.cat([base.A.weight.detach(), module.lora_A.weight.detach()], dim=0)
        B = torch.cat([base.B.weight.detach(), module.lora_B.weight.detach()], dim=1)
        bias = base.B.bias.detach() if base.B.bias is not None else None
        surgery.replace_module(model, fqn, FactorizedLinear.from_factors(B, A, bias))
        folded += 1
    return folded


def module_params(module: nn.Module) -> int:
    """Parameters of one (possibly wrapped) layer, each tensor once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def target_params(model: nn.Module, fqns: Iterable[str]) -> int:
    """Total parameters of the layers at `fqns` (the compression targets)."""
    return sum(module_params(model.get_submodule(f)) for f in fqns)


def layer_table(model: nn.Module, dense_shapes: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """Per target: fqn, shape, kind (factorized / compensated / dense), rank(s), parameters."""
    from rankwise.compress.eora import CompensatedLinear

    rows = []
    for fqn, (m, n) in dense_shapes.items():
        mod = model.get_submodule(fqn)
        row: dict[str, Any] = {"fqn": fqn, "out": m, "in": n, "params": module_params(mod)}
        if isinstance(mod, CompensatedLinear):
            base = mod.base_layer
            row |= {"kind": "compensated", "compensation_rank": mod.rank,
                    "rank": (base.rank if isinstance(base, FactorizedLinear) else None)}
        elif isinstance(mod, FactorizedLinear):
            row |= {"kind": "factorized", "rank": mod.rank, "compensation_rank": 0}
        else:
            row |= {"kind": "dense", "rank": None, "compensation_rank": 0}
        rows.append(row)
    return rows
