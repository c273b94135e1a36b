"""The tiny model every adapter contract runs on: one layer of each kind an adapter can wrap.

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
