"""Rank rules and allocation: closed forms (the rank that removes a
fraction ρ of m n: r = ⌊(1 − ρ) m n / (m + n)⌋), WeLore (Jaiswal et al. 2024), budgets."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.linalg import (
    allocate,
    break_even_rank,
    factorized_params,
    heavy_tail_rank,
    rank_for_budget,
    rank_for_energy,
    rank_for_ratio,
)

PROPS = settings(max_examples=25, deadline=None)
dims = st.integers(1, 5000)


@PROPS
@given(m=dims, n=dims)
def test_break_even_is_the_largest_saving_rank(m: int, n: int) -> None:
    r = break_even_rank(m, n)
    assert r * (m + n) < m * n <= (r + 1) * (m + n)


def test_closed_forms() -> None:
    assert break_even_rank(4096, 4096) == 2047  # mn/(m+n) = 2048 exactly: 2048 saves nothing
    assert break_even_rank(4096, 11008) == 2985  # 2985.2
    assert rank_for_ratio(4096, 4096, 0.2) == 1638
    assert rank_for_ratio(4096, 4096, 0.4) == 1228
    assert rank_for_ratio(4096, 11008, 0.2) == 2388
    assert rank_for_ratio(4096, 11008, 0.4) == 1791
    assert rank_for_ratio(5, 5, 0.2) == 2  # 0.8 * 25 / 10 = 2 exactly: no off-by-one-ulp floor
    assert factorized_params(10, 20, 3) == 90 and factorized_params(10, 20, None) == 200


@PROPS
@given(m=dims, n=dims, ratio=st.floats(0.0, 0.95))
def test_rank_for_ratio_closed_form(m: int, n: int, ratio: float) -> None:
    keep = 1 - Fraction(repr(ratio))
    expected = int(keep * m * n / (m + n))
    if expected < 1:
        with pytest.raises(ValueError, match="leaves rank 0"):
            rank_for_ratio(m, n, ratio)
        return
    r = rank_for_ratio(m, n, ratio)
    assert r == expected
    assert r * (m + n) <= keep * m * n < (r + 1) * (m + n)  # removes at least `ratio`, minimally


def test_rank_for_energy_closed_form() -> None:
    S = torch.tensor([1.0, 3.0, 2.0])  # energies 9, 4, 1 of 14, any order
    assert rank_for_energy(S, 9 / 14) == 1
    assert rank_for_energy(S, 0.65) == 2
    assert rank_for_energy(S, 13 / 14) == 2
    assert rank_for_energy(S, 1.0) == 3


@PROPS
@given(s=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=20), energy=st.floats(1e-6, 1.0))
def test_rank_for_energy_brute_force(s: list[float], energy: float) -> None:
    S = torch.tensor(s, dtype=torch.float64)
    e = sorted((x * x for x in s), reverse=True)
    total = sum(e)
    r = rank_for_energy(S, energy)
    if total == 0:
        assert r == 1
        return
    assert sum(e[:r]) >= energy * total * (1 - 1e-12)  # keeps enough energy
    assert r == 1 or sum(e[: r - 1]) < energy * total * (1 + 1e-12)  # and is the smallest such r


@PROPS
@given(s=st.lists(st.floats(0.0, 10.0), min_size=2, max_size=30), tau=st.floats(0.0, 1.0))
def test_heavy_tail_rank_counts_normalised_values(s: list[float], tau: float) -> None:
    """WeLore: k = len - #{(s - min)/(max - min) < tau}, monotone in tau, >= 1."""
    S = torch.tensor(s, dtype=torch.float64)
    lo, hi = min(s), max(s)
    dropped = 0 if hi == lo else sum((x - lo) / (hi - lo) < tau for x in s)
    k = heavy_tail_rank(S, tau)
    assert k == len(s) - dropped and k >= 1
    assert heavy_tail_rank(S, min(1.0, tau + 0.1)) <= k


def test_heavy_tail_drops_more_of_a_power_law_than_a_linear_spectrum() -> None:
    j = torch.arange(1, 101, dtype=torch.float64)
    assert heavy_tail_rank(1 / j, 0.1) < heavy_tail_rank(101 - j, 0.1)
    assert heavy_tail_rank(torch.ones(50), 0.9) == 50  # flat: nothing drops


@PROPS
@given(
    shapes=st.lists(st.tuples(st.integers(2, 300), st.integers(2, 300)), min_size=1, max_size=5),
    keep=st.floats(0.05, 1.0),
)
def test_rank_for_budget_fits(shapes: list[tuple[int, int]], keep: float) -> None:
    named = {f"w{i}": s for i, s in enumerate(shapes)}
    total = sum(m * n for m, n in shapes)
    budget = max(1, int(keep * total))
    if any(int(Fraction(budget, total) * m * n / (m + n)) < 1 for m, n in shapes) and budget < total:
        with pytest.raises(ValueError, match="leaves rank 0"):
            rank_for_budget(named, budget)
        return
    ranks = rank_for_budget(named, budget)
    assert sum(factorized_params(*named[k], r) for k, r in ranks.items()) <= budget
    for k, r in ranks.items():
        assert r is None or 1 <= r <= break_even_rank(*named[k])


def _spectrum(n: int, decay: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.arange(1, n + 1, dtype=torch.float64) ** -decay * (1 + 0.1 * torch.rand(n, generator=g))


@PROPS
@given(
    shapes=st.lists(st.tuples(st.integers(8, 96), st.integers(8, 96)), min_size=1, max_size=4),
    decays=st.lists(st.floats(0.0, 2.0), min_size=4, max_size=4),
    ratio=st.floats(0.05, 0.9),
    policy=st.sampled_from(["uniform", "energy", "welore"]),
    seed=st.integers(0, 999),
)
def test_allocate_meets_budget_and_break_even(shapes, decays, ratio, policy, seed) -> None:  # noqa: ANN001
    named = {f"layer{i}": s for i, s in enumerate(shapes)}
    spectra = {k: _spectrum(min(s), decays[i], seed + i) for i, (k, s) in enumerate(named.items())}
    total = sum(m * n for m, n in shapes)
    floor = sum(m + n for m, n in shapes)
    try:
        ranks = allocate(spectra, named, ratio, policy)
    except ValueError as exc:  # only legitimate when the ratio is out of reach
        assert "out of reach" in str(exc) or "rank 0" in str(exc)
        assert (1 - ratio) * total < floor or policy == "uniform"
        return
    kept = sum(factorized_params(*named[k], r) for k, r in ranks.items())
    assert kept <= (1 - ratio) * total + 1e-9
    for k, r in ranks.items():
        assert r is None or 1 <= r <= break_even_rank(*named[k])
    if policy == "uniform":
        assert ranks == {k: rank_for_ratio(*s, ratio) for k, s in named.items()}
    factored = {k: r for k, r in ranks.items() if r is not None}
    if policy == "energy" and factored:  # one common energy level e explains every rank
        fr = {k: torch.cumsum(spectra[k].sort(descending=True).values ** 2, 0) for k in factored}
        fr = {k: v / v[-1] for k, v in fr.items()}
        low = max((float(fr[k][r - 2]) for k, r in factored.items() if r >= 2), default=0.0)
        high = min(float(fr[k][r - 1]) for k, r in factored.items())
        assert low < high + 1e-12
    if policy == "welore" and factored:  # one common threshold tau explains every rank
        nt = {}
        for k in factored:
            s = spectra[k].sort(descending=True).values
            nt[k] = (s - s[-1]) / (s[0] - s[-1])
        low = max((float(nt[k][r]) for k, r in factored.items() if r < nt[k].numel()), default=-1.0)
        high = min(float(nt[k][r - 1]) for k, r in factored.items())
        assert low < high


def test_allocate_gives_fast_decay_less_rank() -> None:
    shapes = {"fast": (64, 64), "slow": (64, 64)}
    spectra = {"fast": _spectrum(64, 2.0, 0), "slow": _spectrum(64, 0.3, 1)}
    for policy in ("energy", "welore"):
        ranks = allocate(spectra, shapes, 0.7, policy)
        assert ranks["fast"] is not None and ranks["slow"] is not None
        assert ranks["fast"] < ranks["slow"], policy


def test_allocate_ratio_zero_keeps_everything_dense() -> None:
    assert allocate(None, {"a": (10, 20)}, 0.0) == {"a": None}
    assert allocate(None, {"sq": (4096, 4096)}, 0.0) == {"sq": None}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 1.0}, r"\[0.0, 1.0\)"),
        ({"ratio": -0.1}, r"\[0.0, 1.0\)"),
        ({"policy": "magic"}, "policy must be"),
        ({"policy": "energy", "spectra": None}, "needs spectra"),
        ({"policy": "energy", "spectra": {"a": torch.ones(5)}}, "full spectrum"),
        ({"policy": "welore", "spectra": {"b": torch.ones(10)}}, "same matrices"),
        ({"policy": "energy", "spectra": {"a": -torch.ones(10)}}, "negative"),
        ({"policy": "energy", "ratio": 0.99}, "out of reach"),
        ({"shapes": {"a": (10, 0)}}, "must be >= 1"),
    ],
)
def test_allocate_errors(kwargs: dict, match: str) -> None:
    args = {"spectra": {"a": torch.rand(10)}, "shapes": {"a": (10, 20)}, "ratio": 0.5, "policy": "uniform"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        allocate(args["spectra"], args["shapes"], args["ratio"], args["policy"])


def test_rank_rule_errors() -> None:
    with pytest.raises(ValueError, match="leaves rank 0"):
        rank_for_ratio(4, 4, 0.9)
    with pytest.raises(ValueError, match="energy must be > 0"):
        rank_for_energy(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        heavy_tail_rank(torch.tensor([1.0, float("nan")]), 0.5)
    with pytest.raises(TypeError, match="must be an int"):
        break_even_rank(4.5, 3)
