"""Shared tiny model and batches for the optimizer tests (as fixtures: no test packages)."""

from __future__ import annotations

import pytest
import torch
from optim_toy import ProjectedToy, toy_batch

Tiny = ProjectedToy


def tiny_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return toy_batch(100 + i)


@pytest.fixture
def tiny():
    """The Tiny model class (call it for a fresh, identically initialised model)."""
    return Tiny


@pytest.fixture
def batch():
    """batch(i) -> (x (8, 16), y (8,)), the same for the same i."""
    return tiny_batch
