"""What healing trains on and against: the loss `(student, batch) -> loss` and the batches.

Healing that recovers *general* quality, not the quality on the healing text only:

* loss ``"distill"``: knowledge distillation from the dense model, `KL(p_teacher || p_student)`
  on every next-token distribution (Hinton et al., 2015; the logit loss of PELA, Guo et al.,
  2023) plus `alpha` x PELA's block-feature MSE, normalised per block by the teacher's mean
  square. The target is the dense model's whole distribution, so a step on any text pulls the
  student back towards the teacher's behaviour, not towards that text.
* loss ``"lm"``: the causal-LM cross-entropy on the text (specialises to the text).

and three sources of healing text (`heal_data`):

* ``"teacher"``: sequences sampled from the dense model with LLM-QAT's recipe
  (rankwise.data.teacher): no user data; every evaluation domain stays held out;
* ``"mixture"``: windows from several embedded domains in equal shares
  (rankwise.data.domains.mixture_batches);
* ``"text"``: the user's text (or the python-docs train split), as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from rankwise.linalg import make_generator
from rankwise.pipeline.healing import distill_loss

__all__ = ["HEAL_DATA", "MIXTURE", "distill_loss", "distill_loss_fn", "lm_loss_fn", "teacher_batches"]

HEAL_DATA: tuple[str, ...] = ("text", "mixture", "teacher")
# The default mixture: the user's text (python-docs) and modern English (fortunes); the
# literary domain (devils-dictionary) stays held out, so the mixture's effect off its domains shows.
MIXTURE: tuple[str, ...] = ("python-docs", "fortunes")

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def distill_loss_fn(teacher: nn.Module, alpha: float = 1.0) -> LossFn:
    """`(student, ids) -> loss`: distillation from `teacher` (run without gradients)."""
    teacher.eval()

    def loss(student: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_out = teacher(ids, output_hidden_states=bool(alpha))
        return distill_loss(student(ids, output_hidden_states=bool(alpha)), t_out, alpha)

    return loss


def lm_loss_fn() -> LossFn:
    """`(student, ids) -> loss`: the causal-LM cross-entropy on `ids`."""
    def loss(student: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return student(ids, labels=ids).loss

    return loss


def teacher_batches(sequences: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of cached teacher sequences (each used once per pass)."""
    n = sequences.shape[0]
    if n < batch_size:
        raise ValueError(f"{n} teacher sequences are fewer than one batch of {batch_size}: generate more "
                         "(teacher_samples) or lower heal_batch_size")
    gen = make_generator(seed)  # one seeded-generator helper (rankwise.linalg)
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield sequences[order[i:i + batch_size]]


def domains_of(heal_data: str, text: Any, mixture: Sequence[str] = MIXTURE) -> list[str]:
    """The embedded domains a healing source reads (the others stay held out)."""
    if heal_data == "teacher":
        return []
    if heal_data == "mixture":
        return list(mixture)
    from rankwise.data.domains import DOMAINS

    name = "python-docs" if text is None else text
    return [name] if isinstance(name, str) and name in DOMAINS else []
