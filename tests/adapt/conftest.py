"""Tiny models shared by the adapter tests (built from code or config, never downloaded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class Toy(nn.Module):
    """Every layer kind an adapter can wrap: Embedding, Linear, HF Conv1D, Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(20, 12)
        self.fc1 = nn.Linear(12, 16)
        self.c1d = Conv1D(10, 16)  # in 16 -> out 10, weight stored (in, out) = (16, 10)
        self.norm = nn.LayerNorm(10)
        self.conv = nn.Conv2d(3, 6, kernel_size=3, padding=1)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc1(self.emb(ids)))
        return self.norm(self.c1d(h)), self.conv(img)


def toy_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (2, 5), generator=g), torch.randn(2, 3, 5, 5, generator=g)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def perturb_adapters(model: nn.Module, scale: float = 0.1, seed: int = 3) -> None:
    """Move every adapter parameter away from its init, as training would."""
    from rankwise.adapt import adapter_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.adapter.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.fixture
def perturb():
    """`perturb(model, scale=0.1, seed=3)`: move adapter parameters off their init."""
    return perturb_adapters


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (2, 5), images (2, 3, 5, 5)) for `Toy`."""
    return toy_inputs()


@pytest.fixture
def make_llama():
    """`make_llama(seed=0)`: a tiny LlamaForCausalLM (hidden 32, 2 layers) from a config."""
    return tiny_llama


@pytest.fixture
def toy() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


@pytest.fixture
def llama():
    return tiny_llama()
