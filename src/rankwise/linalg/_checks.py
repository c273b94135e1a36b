"""Shared input validation for rankwise.linalg: every error names the problem and the fix.

Also holds the dtype policy of the package (`compute_dtype`): factorisations run in fp32 at least
(fp16/bf16 are upcast, fp64 stays fp64); Grams, Cholesky and eigh run in fp64.
"""

from __future__ import annotations

import numbers

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a factorisation runs in: fp64 stays fp64, everything else becomes fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def validate_matrix(
    A: object,
    name: str = "A",
    *,
    batched: bool = True,
    check_finite: bool = True,
) -> torch.Tensor:
    """Check that `A` is a real floating matrix (..., m, n) with m, n >= 1 and, optionally, finite.

    Args:
        A: the candidate tensor.
        name: how the error messages call it.
        batched: allow leading batch dimensions (..., m, n); else exactly 2-D.
        check_finite: scan for NaN/Inf (one pass over A).

    Returns:
        A itself (for chaining).

    Raises:
        TypeError: not a tensor, or not a real floating dtype.
        ValueError: wrong number of dimensions, an empty dimension, or NaN/Inf entries.
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}: wrap it with torch.as_tensor")
    if A.dtype not in _FLOATS:
        raise TypeError(
            f"{name} has dtype {A.dtype}; rankwise.linalg needs a real floating tensor "
            f"(float16/bfloat16/float32/float64): call {name}.float() first"
        )
    if A.ndim < 2 or (not batched and A.ndim != 2):
        want = "a matrix (..., m, n)" if batched else "a 2-D matrix (m, n)"
        raise ValueError(f"{name} must be {want}, got shape {tuple(A.shape)}: reshape it")
    if A.shape[-1] == 0 or A.shape[-2] == 0:
        raise ValueError(f"{name} has an empty dimension (shape {tuple(A.shape)}): pass a non-empty matrix")
    if check_finite:
        raise_if_nonfinite(A, name)
    return A


def all_finite(A: torch.Tensor, rows: int = 256) -> bool:
    """Whether every entry of `A` is finite, without a full-size temporary.

    `torch.isfinite(A)` materialises |A| and two boolean masks of A's size (about 1.3x an fp64
    Gram: 330 MB for n = 5632, the peak of streaming SVD-LLM). A NaN or Inf makes the fp64 sum
    non-finite, so a finite sum proves the matrix finite in one reduction; only a sum that is not
    finite (a NaN/Inf, or a real overflow) is checked exactly, `rows` rows at a time.
    """
    if A.numel() == 0:
        return True
    if bool(torch.isfinite(A.sum(dtype=torch.float64))):
        return True
    flat = A.reshape(-1, A.shape[-1]) if A.dim() > 1 else A.reshape(1, -1)
    return all(bool(torch.isfinite(flat[i:i + rows]).all()) for i in range(0, flat.shape[0], rows))


def raise_if_nonfinite(A: torch.Tensor, name: str = "A") -> None:
    """Raise ValueError when `A` holds NaN or Inf (the usual cause: a diverged upstream loss)."""
    if not all_finite(A):
        n_nan = int(torch.isnan(A).sum())
        n_inf = int(torch.isinf(A).sum())
        raise ValueError(
            f"{name} contains NaN ({n_nan}) or Inf ({n_inf}) entries: check the input / upstream "
            "loss (a diverged step or an fp16 overflow) before factorising"
        )


def validate_square(S: object, name: str = "S") -> torch.Tensor:
    """Check that `S` is a finite real floating square matrix (..., n, n)."""
    S = validate_matrix(S, name)
    if S.shape[-1] != S.shape[-2]:
        raise ValueError(
            f"{name} must be square (..., n, n), got shape {tuple(S.shape)}: pass the Gram X X^T "
            "(in_features x in_features), not the activations"
        )
    return S


def validate_int(value: object, name: str, *, minimum: int = 0) -> int:
    """Check that `value` is an integer (not a bool) >= minimum and return it as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def validate_rank(rank: object, m: int, n: int, name: str = "rank") -> int:
    """Check 1 <= rank <= min(m, n) for an (m, n) matrix and return it as int."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(rank).__name__} ({rank!r})")
    rank = int(rank)
    limit = min(m, n)
    if rank <= 0:
        raise ValueError(f"{name} must be positive (>= 1), got {rank}: choose 1 <= {name} <= {limit}")
    if rank > limit:
        raise ValueError(
            f"{name} {rank} exceeds min(m, n) = {limit} for a ({m}, {n}) matrix: "
            f"choose {name} <= {limit}"
        )
    return rank


def validate_fraction(value: object, name: str, *, low: float, high: float, high_open: bool) -> float:
    """Check low <= value <= high (or < high when high_open) and return it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    value = float(value)
    bad = not (low <= value < high) if high_open else not (low <= value <= high)
    if bad or value != value:  # the second test catches NaN
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {value}")
    return value


def validate_shape(shape: object, name: str = "shape") -> tuple[int, int]:
    """Check a (m, n) pair of positive ints and return it as a tuple."""
    try:
        m, n = shape  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (m, n) = (out_features, in_features), got {shape!r}") from None
    m = validate_int(m, f"{name}[0]", minimum=1)
    n = validate_int(n, f"{name}[1]", minimum=1)
    return m, n
