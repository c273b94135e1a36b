"""Shared tiny model and batches for the optimizer tests (as fixtures: no test packages)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class Tiny(nn.Module):
    """Names follow GaLore's rule: *attn* and *mlp* linears are projected, the rest not."""

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


def tiny_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 16, generator=gen), torch.randint(0, 3, (8,), generator=gen)


@pytest.fixture
def tiny():
    """The Tiny model class (call it for a fresh, identically initialised model)."""
    return Tiny


@pytest.fixture
def batch():
    """batch(i) -> (x (8, 16), y (8,)), the same for the same i."""
    return tiny_batch
