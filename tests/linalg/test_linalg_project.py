"""GaLore one-sided projections (GaLore, Zhao et al. 2024:
down(G) = G Pᵀ or Pᵀ G on the shorter side, up = its transpose)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.linalg import project_down, project_up, projection_side, truncated_svd

PROPS = settings(max_examples=25, deadline=None)


@PROPS
@given(m=st.integers(1, 64), n=st.integers(1, 64))
def test_side_rule_projects_the_smaller_dimension(m: int, n: int) -> None:
    side = projection_side((m, n))
    assert side == ("right" if m >= n else "left")  # GaLore std: shape[0] >= shape[1] -> right
    assert projection_side(torch.Size([3, m, n])) == side  # leading dims ignored


@PROPS
@given(m=st.integers(2, 12), n=st.integers(2, 12), seed=st.integers(0, 999), data=st.data())
def test_top_singular_projector_gives_eckart_young(m: int, n: int, seed: int, data: st.DataObject) -> None:
    """back(proj(G)) with P = top-r singular vectors on the chosen side is the best rank-r
    approximation of G; shapes follow the side rule (projector min(m,n) x r, state max x r)."""
    r = data.draw(st.integers(1, min(m, n)))
    G = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    U, S, Vh = truncated_svd(G, r)
    side = projection_side(G.shape)
    P = U if side == "left" else Vh.mT
    assert P.shape == (min(m, n), r)
    R = project_down(G, P, side)
    assert R.shape == ((r, n) if side == "left" else (m, r))
    torch.testing.assert_close(project_up(R, P, side), (U * S) @ Vh)


@pytest.mark.parametrize("side", ["left", "right"])
def test_full_rank_orthogonal_projector_is_lossless_and_batched(side: str) -> None:
    G = torch.randn(3, 6, 6, dtype=torch.float64)
    P = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64)).Q
    R = project_down(G, P, side)
    assert R.shape == G.shape
    torch.testing.assert_close(project_up(R, P, side), G)
    for i in range(3):
        torch.testing.assert_close(R[i], project_down(G[i], P, side))


def test_projection_errors() -> None:
    G = torch.randn(8, 5)
    with pytest.raises(ValueError, match="needs P with 5 rows"):
        project_down(G, torch.randn(8, 2), "right")
    with pytest.raises(ValueError, match="side must be 'left' or 'right'"):
        project_down(G, torch.randn(8, 2), "up")
    with pytest.raises(ValueError, match=r"needs R \(\.\.\., m, 2\)"):
        project_up(torch.randn(8, 3), torch.randn(5, 2), "right")
    with pytest.raises(ValueError, match="matrix shape"):
        projection_side((5,))
