"""Spectral diagnostics: pure metric functions over singular values, eigenvalues and matrices.

Every function takes either a 1-D tensor of singular values (any order) or a 2-D matrix, whose
singular values are then computed in fp32 (fp64 when the matrix is fp64). Metrics are returned
as Python floats/ints, computed in fp64. This module gathers them under one name
(``rankwise.linalg.spectral.effective_rank(S)``); each family lives in its own module, whose
docstring gives the definitions with their papers and equations:

- `rankwise.linalg.spectral_ranks`: singular values, numerical / effective (Roy & Vetterli 2007)
  / stable / energy rank.
- `rankwise.linalg.powerlaw`: the ESD lambda = s^2 and its heavy-tail exponent alpha (Martin &
  Mahoney 2021; Clauset, Shalizi & Newman 2009 MLE + KS scan), plain and FARMS (Hu et al. 2025).
- `rankwise.linalg.welore`: WeLore's global threshold and LRC / N-LRC classes (Jaiswal et al.
  2024).
- `rankwise.linalg.representations`: RankMe (Garrido et al. 2023) and the Matrix Nuclear-Norm
  (Li et al. 2024) of embeddings.
"""

from __future__ import annotations

from rankwise.linalg.powerlaw import (
    EVALS_THRESH,
    PowerLawFit,
    esd,
    farms_alpha,
    farms_esd,
    powerlaw_alpha,
)
from rankwise.linalg.representations import (
    matrix_nuclear_norm,
    normalize_representations,
    nuclear_norm,
    rankme,
)
from rankwise.linalg.spectral_ranks import (
    effective_rank,
    energy_rank,
    numerical_rank,
    singular_values,
    stable_rank,
)
from rankwise.linalg.welore import welore_class, welore_drop, welore_threshold

__all__ = [
    "EVALS_THRESH",
    "PowerLawFit",
    "effective_rank",
    "energy_rank",
    "esd",
    "farms_alpha",
    "farms_esd",
    "matrix_nuclear_norm",
    "normalize_representations",
    "nuclear_norm",
    "numerical_rank",
    "powerlaw_alpha",
    "rankme",
    "singular_values",
    "stable_rank",
    "welore_class",
    "welore_drop",
    "welore_threshold",
]
