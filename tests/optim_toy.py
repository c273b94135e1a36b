"""The tiny model the optimizer tests share (a module of its own, importable from every test
folder: tests/ is on the import path through its conftest.py).

Names follow GaLore's target rule: the *attn* and *mlp* linears are projected, the LayerNorm and
the head form the plain group.
"""

from __future__ import annotations

import torch
from torch import nn


class ProjectedToy(nn.Module):
    """attn/mlp linears (projected), a LayerNorm and a head (plain group), seeded weights."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.attn = nn.Linear(16, 12)
        self.mlp = nn.Linear(12, 24)
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 3, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.mlp(torch.tanh(self.attn(x))))))


def toy_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (8, 16), y (8,)), the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 16, generator=gen), torch.randint(0, 3, (8,), generator=gen)
