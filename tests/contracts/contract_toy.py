"""The tiny models the contracts run on. Adapters: one layer of each kind an adapter can wrap.

Embedding -> Linear -> HF Conv1D -> LayerNorm, and a Conv2d on a second input: 4 adaptable
layers, ~1.5k parameters, fp64 so that identities hold to ~1e-12.
"""

from __future__ import annotations

import torch
from torch import nn

#: adaptable layer of the toy -> its geometry kind (rankwise.adapt.Geometry)
KINDS = {"emb": "embedding", "fc1": "linear", "c1d": "conv1d", "conv": "conv2d"}


class Toy(nn.Module):
    """Every layer kind an adapter can wrap: Embedding, Linear, HF Conv1D, Conv2d."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(seed)
        self.emb = nn.Embedding(20, 12)
        self.fc1 = nn.Linear(12, 16)
        self.c1d = Conv1D(10, 16)  # in 16 -> out 10, weight stored (in, out)
        self.norm = nn.LayerNorm(10)
        self.conv = nn.Conv2d(3, 6, kernel_size=3, padding=1)
        self.double().eval()

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc1(self.emb(ids)))
        return self.norm(self.c1d(h)), self.conv(img)


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, 20, (2, 5), generator=g),
            "img": torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)}


def data() -> list[dict[str, torch.Tensor]]:
    """Calibration batches for methods whose init reads activations or a first gradient."""
    return [batch(1), batch(2)]


def loss_fn(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    a, c = model(**b)
    return a.square().sum() + c.square().sum()


def run(model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(**b)


def assert_same(got, want, *, rtol: float, atol: float, what: str) -> None:
    for g, w, head in zip(got, want, ("token head", "conv head"), strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, h=head: f"{what} "
                                   f"({h}): {m}")


def tiny_llama(seed: int = 0):
    """A 2-block Llama (hidden 48, vocab 96) from a config: the compressors' toy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def calibration_ids() -> torch.Tensor:
    """(12, 24) token ids: 288 calibration tokens (compress_ asks for at least 128)."""
    return torch.randint(0, 96, (12, 24), generator=torch.Generator().manual_seed(7))
