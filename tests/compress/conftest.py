"""Tiny Llama / BERT models built from configs for the compress tests (no downloads)."""

from __future__ import annotations

import pytest
import torch
from compress_models import tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def calib_ids():
    return torch.randint(0, 96, (12, 24), generator=torch.Generator().manual_seed(7))
