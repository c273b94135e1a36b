"""Rank of a model's representations on text: RankMe and the Matrix Nuclear-Norm.

The last hidden states of the base model (no LM head; the MNN paper uses AutoModel) are taken
per text, R_t (L_t tokens, d). Reported:
- RankMe (Garrido et al. 2023) of all tokens stacked, Z (N, d), N capped at 25 600 (the paper's
  sample count): how many directions the representation space really uses.
- MNN / L (Li et al. 2024): per text, the L_{1,2} norm of the centred, row-normalised R_t over its
  length, averaged over texts, next to the exact nuclear norm / L of the same matrix, so that
  one can see how closely the SVD-free surrogate tracks it on this model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rankwise.linalg import spectral

logger = logging.getLogger(__name__)

RANKME_MAX_TOKENS = 25_600


@torch.no_grad()
def hidden_states(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int = 256,
    max_texts: int = 16,
    min_tokens: int = 8,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Last hidden states of the base model, one (L, d) fp32 tensor per text (first max_length tokens).

    Texts shorter than min_tokens are skipped; one text per forward pass, so no padding enters.
    """
    from tqdm.auto import tqdm

    if not texts:
        raise ValueError("no texts given: pass a list of strings (e.g. rankwise.data.load_corpus(...))")
    base = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        for text in tqdm(list(texts)[:max_texts], desc="representations", unit="text", disable=not progress):
            enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            ids = enc["input_ids"].to(device)
            if ids.shape[1] < min_tokens:
                continue
            mask = enc.get("attention_mask")
            kwargs = {"attention_mask": mask.to(device)} if mask is not None else {}
            result = base(input_ids=ids, **kwargs)
            hidden = getattr(result, "last_hidden_state", None)
            if hidden is None:
                hidden = result[0]
            out.append(hidden[0].detach().float().cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError(f"every text was shorter than {min_tokens} tokens: pass longer texts")
    return out


def representation_metrics(states: Sequence[torch.Tensor]) -> dict[str, Any]:
    """RankMe of the stacked tokens and mean per-text MNN / L next to the exact ||R||_* / L.

    states: per-text hidden states, each (L_t, d). Returns floats plus "spectrum", the singular
    values of the stacked Z (for plots).
    """
    if not states:
        raise ValueError("no hidden states given: run hidden_states(...) on at least one text")
    dims = {int(s.shape[1]) for s in states}
    if len(dims) != 1:
        raise ValueError(f"hidden states have different widths {sorted(dims)}: pass one model's states")
    Z = torch.cat(list(states))[:RANKME_MAX_TOKENS].to(torch.float32)
    S = spectral.singular_values(Z)[0].float()
    d = dims.pop()
    mnn, nuc = [], []
    for R in states:
        L = R.shape[0]
        mnn.append(spectral.matrix_nuclear_norm(R) / L)
        nuc.append(spectral.nuclear_norm(R, normalize=True) / L)
    mnn_mean = sum(mnn) / len(mnn)
    nuc_mean = sum(nuc) / len(nuc)
    rm = spectral.rankme(S)
    return {
        "n_texts": len(states),
        "n_tokens": int(Z.shape[0]),
        "dim": d,
        "rankme": rm,
        "rankme_ratio": rm / min(d, int(Z.shape[0])),
        "erank_energy": spectral.effective_rank(S, form="energy"),
        "mnn_per_token": mnn_mean,
        "nuclear_per_token": nuc_mean,
        "mnn_over_nuclear": mnn_mean / nuc_mean if nuc_mean > 0 else None,
        "spectrum": S,
    }
