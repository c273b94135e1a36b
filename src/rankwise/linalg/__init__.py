"""rankwise.linalg: the one home of the low-rank math (pure tensor functions, no nn.Module).

Only code in this package calls torch.linalg.{svd, eigh, cholesky, qr} or torch.svd_lowrank
(a ruff rule bans them elsewhere). Conventions: weights are (out, in) = (m, n); a factorised
layer is B (m, r) @ A (r, n); factorisations run in fp32 (fp64 input stays fp64) and Grams,
Cholesky and eigh in fp64; results come back in that compute dtype for the caller to cast.

Modules: svd (exact/truncated/randomized SVD, balanced factors), bases (DCT, Haar, column
selection), project (GaLore one-sided projections), rank (break-even, ratio/energy/budget rules,
allocation), random (seeded generators, Kaiming init), subspace (subspace iteration for one-sided
bases), whiten (Cholesky/eigh whiteners), compute dtype and argument checks (_checks), quant (blockwise int8/int4), spectral (diagnostic
metrics; imported lazily as rankwise.linalg.spectral).
"""

from __future__ import annotations

import importlib
from typing import Any

from rankwise.linalg._checks import all_finite, compute_dtype, validate_rank
from rankwise.linalg.bases import dct_basis, random_orthonormal, select_aligned_columns
from rankwise.linalg.complete import complete, observed_values, sparse_top_singular_vectors
from rankwise.linalg.lu import lu
from rankwise.linalg.project import project_down, project_up, projection_side
from rankwise.linalg.quant import QuantizedTensor, dequantize_blockwise, quantize_blockwise
from rankwise.linalg.random import kaiming_uniform, make_generator
from rankwise.linalg.rank import (
    allocate,
    break_even_rank,
    factorized_params,
    heavy_tail_rank,
    rank_for_budget,
    rank_for_energy,
    rank_for_ratio,
)
from rankwise.linalg.sampling import (
    inclusion_probabilities,
    leverage_scores,
    lewis_weights,
    lp_regression,
    sample_rows,
    sampled_regression,
    select_calibration_tokens,
    weighted_gram,
)
from rankwise.linalg.subspace import top_right_subspace
from rankwise.linalg.svd import (
    default_oversample,
    low_rank_approx,
    orthonormalize,
    randomized_svd,
    split_factors,
    svd,
    svdvals,
    truncated_svd,
)
from rankwise.linalg.whiten import (
    cholesky,
    cholesky_whitener,
    eigh,
    eigh_whitener,
    inverse_lower,
    solve_lower_right,
    symmetrize_,
)

__all__ = [
    "all_finite",
    "complete",
    "compute_dtype",
    "kaiming_uniform",
    "validate_rank",
    "observed_values",
    "sparse_top_singular_vectors",
    "inclusion_probabilities",
    "leverage_scores",
    "lewis_weights",
    "lp_regression",
    "sample_rows",
    "sampled_regression",
    "select_calibration_tokens",
    "weighted_gram",
    "lu",
    "QuantizedTensor",
    "allocate",
    "break_even_rank",
    "cholesky",
    "cholesky_whitener",
    "dct_basis",
    "default_oversample",
    "dequantize_blockwise",
    "eigh",
    "eigh_whitener",
    "factorized_params",
    "heavy_tail_rank",
    "inverse_lower",
    "solve_lower_right",
    "symmetrize_",
    "low_rank_approx",
    "make_generator",
    "orthonormalize",
    "project_down",
    "project_up",
    "projection_side",
    "quantize_blockwise",
    "random_orthonormal",
    "randomized_svd",
    "rank_for_budget",
    "rank_for_energy",
    "rank_for_ratio",
    "select_aligned_columns",
    "spectral",
    "split_factors",
    "svd",
    "svdvals",
    "top_right_subspace",
    "truncated_svd",
]


def __getattr__(name: str) -> Any:
    # spectral (owned separately) loads on first use: `rankwise.linalg.spectral.effective_rank(S)`.
    if name == "spectral":
        module = importlib.import_module("rankwise.linalg.spectral")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'rankwise.linalg' has no attribute {name!r}")
