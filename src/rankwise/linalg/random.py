"""Seeded randomness shared by every rankwise module: generators from seeds and the standard
initial draws, so a seed means the same stream everywhere and no module touches torch's global RNG
unless asked to (``seed=None``).

Kaiming-uniform init (He et al. 2015, "Delving Deep into Rectifiers", eq. 16 with the leaky-ReLU
gain) is what ``nn.Linear`` and PEFT's LoRA ``A`` use: ``kaiming_uniform_(W, a=√5)`` has gain
g = √(2 / (1 + a²)) = √(1/3), std g / √fan_in and bound √3 · std, i.e.

    W_ij ~ U(−1/√fan_in, 1/√fan_in).
"""

from __future__ import annotations

import math

import torch

from rankwise.linalg._checks import validate_int

__all__ = ["Seed", "kaiming_uniform", "make_generator"]

#: a seed (int), a ready generator, or None for torch's global RNG
Seed = int | torch.Generator | None


def make_generator(seed: Seed, device: torch.device | str | None = None) -> torch.Generator | None:
    """A torch.Generator from a seed: None -> None (global RNG), a generator -> itself, an int
    >= 0 -> a new generator on `device` (CPU by default: draws happen on CPU, then move)."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    seed = validate_int(seed, "seed", minimum=0)
    gen = torch.Generator(device=device if device is not None else "cpu")
    gen.manual_seed(seed)
    return gen


def kaiming_uniform(shape: tuple[int, ...] | torch.Size, fan_in: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """U(−1/√fan_in, 1/√fan_in) of `shape` in fp32 on CPU (see the module docstring), drawn as
    ``(rand · 2 − 1) · bound`` from `generator` (None: the global RNG)."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(tuple(shape), generator=generator) * 2 - 1) * bound
