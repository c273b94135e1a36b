"""SVD-based projectors: GaLore's exact top-r subspace and its randomized counterpart."""

from __future__ import annotations

from typing import Any

import torch

from rankwise.optim.projector import Projector


def _linalg() -> Any:
    from rankwise import linalg

    return linalg


class SVDProjector(Projector):
    """GaLore's projector: top-r singular vectors of the current gradient (exact SVD)."""

    kind = "svd"

    def _compute(self, grad: torch.Tensor, step: int) -> None:
        u, _, vh = _linalg().truncated_svd(grad, self.rank)
        self._store(vh if self.side == "right" else u, self.options.get("dtype") or grad.dtype)


class RandomizedSVDProjector(Projector):
    """Top-r subspace by randomized subspace iteration (Halko et al. 2011): O(mnr), no full SVD.

    Options:

    * ``method`` "subspace" (default): `rankwise.linalg.top_right_subspace`, the
      one-sided iteration Z <- orth(GᵀG Z) with QRs on the small side only (a projector needs
      one side of the SVD); "hmt": `rankwise.linalg.randomized_svd` (two-sided HMT 4.4).
    * ``power_iters``: 2 (subspace: steps of GᵀG; hmt: HMT's q);
    * ``oversample``: None = rankwise.linalg's max(10, r/8);
    * ``warm_start`` (True, subspace only): from the second refresh on, start from the previous
      basis (plus ``oversample`` Gaussian columns) and run ``warm_power_iters`` (1) steps:
      subspace iteration continued across refreshes, as the gradient subspace moves slowly.

    The Gaussian columns are seeded from the projector's seed and refresh count, so replicas
    and resumed runs draw the same sketch.
    """

    kind = "randomized"

    def _compute(self, grad: torch.Tensor, step: int) -> None:
        dtype = self.options.get("dtype") or grad.dtype
        method = self.options.get("method", "subspace")
        if method == "hmt":
            u, _, vh = _linalg().randomized_svd(
                grad, self.rank, oversample=self.options.get("oversample"),
                power_iters=int(self.options.get("power_iters", 2)), seed=self.current_seed())
            self._store(vh if self.side == "right" else u, dtype)
            return
        if method != "subspace":
            raise ValueError(f"randomized projector method {method!r} is unknown: "
                             "choose 'subspace' or 'hmt'")
        from rankwise.linalg import top_right_subspace

        mat = grad if self.side == "right" else grad.mT  # basis side = columns of `mat`
        start, iters = None, int(self.options.get("power_iters", 2))
        # (a quantised wrapper keeps no float basis: it starts cold every time)
        if self.options.get("warm_start", True) and "proj_basis" in self.state:
            prev = self.state["proj_basis"].float()
            start = prev if self.side == "right" else prev.mT
            iters = int(self.options.get("warm_power_iters", 1))
        v = top_right_subspace(mat, self.rank, oversample=self.options.get("oversample"),
                               power_iters=iters, start=start, seed=self.current_seed())
        self._store(v if self.side == "right" else v.mT, dtype)
