"""Horizontal fusion: layers that read the same input run their first matmul as one.

In a factorised transformer block the attention projections q, k, v read the same hidden state,
and so do the MLP's gate and up projections. Each FactorizedLinear costs two matmuls
(`y = B (A x)`), so q/k/v cost six small matmuls where the dense model had three. When decoding
one token at a time every matmul is a matrix-vector product whose time is mostly fixed cost
(dispatch, reading the weight once), so the number of operations matters as much as the bytes.
Horizontal fusion (as in TensorRT / FasterTransformer's fused QKV GEMM) concatenates the first
matrices of the siblings, `[A_q; A_k; A_v]`, runs one linear on the shared input and splits the
result: the six matmuls become four (one fused + three `B`s), gate/up's four become three. A
sibling kept dense joins the fused matmul with its whole weight (its slice is then its output).

Exactness: each output element of the fused matmul is the same dot product over the input
dimension as in the separate matmul (rows of the concatenated weight are the members' rows,
biases join as a concatenated bias with zeros for the `A` rows), so in exact arithmetic the
outputs are those of the unfused model (`tests/layers/test_fused.py` checks bit equality with
integer-valued float64 tensors). In floating point a BLAS may block the wider matmul's sums
differently, so logits agree to the last bits of the dtype (about 1e-6 relative in fp32;
single-token decoding was bit-equal on the machine measured) and greedy generations match.

Groups are found by running one forward and grouping the linears that receive *the same input
tensor object* (no name tables: any architecture whose siblings share an input tensor fuses).
Fusion is a runtime transform for inference: parameters and the state dict are unchanged (the
fused weight is a separate, non-persistent copy of the members' first matrices), so a fused
model saves and reloads as before; call `unfuse_` before training it.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers.factorized import FactorizedLinear

__all__ = ["FusedGroup", "find_sibling_groups", "fuse_siblings_", "fused_groups", "unfuse_"]

_ATTR = "_rankwise_fused"


class FusedGroup:
    """One fused matmul for sibling linears; serves each member its slice of the result.

    The first member called with an input computes `x [W_1; ...; W_k]^T (+ [b_1; ...; b_k])` and
    keeps the slices until every member has taken its own (a member called with another input,
    or after the input changed in place, recomputes).
    """

    def __init__(self, names: list[str], modules: list[nn.Module]) -> None:
        weights, biases, self.factorized = [], [], []
        for m in modules:
            fact = isinstance(m, FactorizedLinear)
            w = m.A.weight if fact else m.weight
            b = getattr(m, "bias", None) if not fact else None
            weights.append(w.detach())
            biases.append(b.detach() if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            self.factorized.append(fact)
        self.names = list(names)
        self.weight = torch.cat(weights).contiguous()
        has_bias = any(not f and getattr(m, "bias", None) is not None for f, m in zip(self.factorized, modules,
                                                                                       strict=True))
        self.bias = torch.cat(biases).contiguous() if has_bias else None
        self.sizes = [w.shape[0] for w in weights]
        self._key: tuple[Any, int] | None = None
        self._parts: tuple[torch.Tensor, ...] = ()
        self._served = 0

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        version = -1 if x.is_inference() else x._version  # inference tensors have no version counter
        if self._key is None or self._key[0] is not x or self._key[1] != version:
            self._parts = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
            self._key, self._served = (x, version), 0
        out = self._parts[index]
        self._served += 1
        if self._served >= len(self.sizes):  # every member served: release the input and slices
            self._key, self._parts, self._served = None, (), 0
        return out


def _fused_forward(module: nn.Module, group: FusedGroup, index: int):
    if group.factorized[index]:
        def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return self.B(group.part(index, x))
    else:
        def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return group.part(index, x)
    return types.MethodType(forward, module)


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """FactorizedLinear layers and plain nn.Linear layers that are not a factor of one."""
    inner = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, FactorizedLinear) for c in ("A", "B")}
    return {n: m for n, m in model.named_modules()
            if isinstance(m, FactorizedLinear) or (type(m) is nn.Linear and n not in inner)}


@torch.no_grad()
def find_sibling_groups(model: nn.Module, example: torch.Tensor | None = None) -> list[list[str]]:
    """Names of linears (FactorizedLinear or nn.Linear) that one forward of `example` feeds the
    same input tensor, in call order; only groups of two or more with a factorised member."""
    layers = _candidates(model)
    if example is None:
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 2)
        example = torch.randint(0, vocab, (1, 4), generator=torch.Generator().manual_seed(0))
    seen: dict[int, tuple[torch.Tensor, list[str]]] = {}
    hooks = []

    def hook(name: str):
        def pre(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            seen.setdefault(id(x), (x, []))[1].append(name)  # the tensor is kept alive: ids stay unique
        return pre

    for name, m in layers.items():
        hooks.append(m.register_forward_pre_hook(hook(name)))
    was = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    groups = [names for _, names in seen.values() if len(names) > 1]
    return [g for g in groups if len(set(g)) == len(g) and any(isinstance(layers[n], FactorizedLinear) for n in g)]


def fuse_siblings_(model: nn.Module, example: torch.Tensor | None = None) -> list[list[str]]:
    """Fuse the first matmuls of every sibling group of `model` in place; returns the groups.

    Idempotent (a fused model is unfused first). `example`: input ids for the discovery forward
    (default: 4 token ids, enough for a decoder's structure).
    """
    unfuse_(model)
    groups = find_sibling_groups(model, example)
    for names in groups:
        modules = [model.get_submodule(n) for n in names]
        group = FusedGroup(names, modules)
        for i, m in enumerate(modules):
            m.forward = _fused_forward(m, group, i)
            setattr(m, _ATTR, group)
    return groups


def fused_groups(model: nn.Module) -> list[list[str]]:
    """The fused groups currently active in `model` (empty when not fused)."""
    found: dict[int, list[str]] = {}
    for m in model.modules():
        group = getattr(m, _ATTR, None)
        if group is not None:
            found[id(group)] = group.names
    return list(found.values())


def unfuse_(model: nn.Module) -> int:
    """Give every fused member its own forward back; returns how many were fused."""
    count = 0
    for m in model.modules():
        if getattr(m, _ATTR, None) is not None:
            del m.forward
            delattr(m, _ATTR)
            count += 1
    return count
