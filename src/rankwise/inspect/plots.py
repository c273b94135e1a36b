"""PNG plots of spectra and per-layer metric heatmaps (matplotlib, Agg canvas, no pyplot state).

Every function returns the PNG bytes and, when `path` is given, also writes them atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rankwise._optional import require
from rankwise.inspect.weights import short_kinds

METRIC_LABELS = {
    "erank_ratio": "effective rank / full rank",
    "erank": "effective rank",
    "stable_rank": "stable rank",
    "energy90": "energy rank 90 %",
    "alpha": "alpha (WeightWatcher)",
    "farms_alpha": "alpha (FARMS)",
    "update_rank": "rank of W1 - W0",
    "update_erank": "effective rank of W1 - W0",
    "relative_update": "||W1 - W0||_F / ||W0||_F",
}


def _figure(width: float, height: float) -> Any:
    require("matplotlib", purpose="inspect plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str] | None) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    if path is not None:
        from rankwise.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return data


def _groups(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Rows grouped by kind (module role), in first-seen order; non-block rows under 'other'."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["kind"] if r["block"] is not None else "other", []).append(r)
    if "other" in groups:  # embeddings / heads after the per-layer kinds
        groups["other"] = groups.pop("other")
    return groups


def plot_spectra(
    rows: Sequence[Mapping[str, Any]],
    spectra: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str = "Singular values per layer",
) -> bytes:
    """One panel per module kind: s_i / s_1 against i (log-log), one line per layer, colour = depth."""
    rows = [r for r in rows if spectra[r["name"]].numel() and float(spectra[r["name"]][0]) > 0]
    if not rows:
        raise ValueError("every spectrum is zero (e.g. no matrix changed): nothing to plot")
    groups = _groups(rows)
    cols = min(4, len(groups))
    nrows = math.ceil(len(groups) / cols)
    fig = _figure(4.0 * cols, 3.2 * nrows)
    fig.suptitle(title)
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    blocks = [r["block"] for r in rows if r["block"] is not None]
    top = max(blocks) if blocks else 1
    for k, (kind, members) in enumerate(groups.items()):
        ax = fig.add_subplot(nrows, cols, k + 1)
        for r in members:
            S = spectra[r["name"]].double()
            if S.numel() == 0 or float(S[0]) <= 0:
                continue
            y = (S / S[0]).clamp_min(1e-12).numpy()
            colour = cmap((r["block"] or 0) / max(top, 1)) if r["block"] is not None else None
            label = None if r["block"] is not None else r["name"]
            ax.loglog(range(1, len(y) + 1), y, color=colour, lw=0.9, label=label)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("index i", fontsize=8)
        ax.set_ylabel("s_i / s_1", fontsize=8)
        ax.tick_params(labelsize=7)
        if kind == "other" and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    if blocks:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        sm = ScalarMappable(norm=Normalize(0, top), cmap=cmap)
        fig.colorbar(sm, ax=fig.axes, label="layer", shrink=0.8)
    return _save(fig, path)


def plot_heatmaps(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str = "Per-layer metrics",
) -> bytes:
    """One heatmap per metric: layers (rows) x module kinds (columns); blank where not defined."""
    block_rows = [r for r in rows if r["block"] is not None]
    if not block_rows:
        raise ValueError("no per-layer matrices (names with a layer index) to draw a heatmap of")
    kinds = list(dict.fromkeys(r["kind"] for r in block_rows))
    blocks = sorted({r["block"] for r in block_rows})
    metrics = [m for m in metrics if any(r.get(m) is not None for r in block_rows)]
    if not metrics:
        raise ValueError("none of the requested metrics has a value: run the full analysis")
    cols = min(5, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig = _figure(max(3.2 * cols, 6), 0.9 + nrows * (1.3 + 0.15 * len(blocks)))
    fig.suptitle(title)
    bi = {b: i for i, b in enumerate(blocks)}
    ki = {k: j for j, k in enumerate(kinds)}
    short = short_kinds(kinds)
    for n, metric in enumerate(metrics):
        grid = torch.full((len(blocks), len(kinds)), float("nan"), dtype=torch.float64)
        for r in block_rows:
            if r.get(metric) is not None:
                grid[bi[r["block"]], ki[r["kind"]]] = float(r[metric])
        ax = fig.add_subplot(nrows, cols, n + 1)
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=9)
        ax.set_xticks(range(len(kinds)), short, rotation=45, ha="right", fontsize=7)
        step = max(1, len(blocks) // 10)
        ax.set_yticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize=7)
        ax.set_ylabel("layer", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.9)
    return _save(fig, path)


def plot_representation_spectrum(
    S: torch.Tensor,
    path: str | os.PathLike[str] | None = None,
    *,
    title: str = "Singular values of the representations",
) -> bytes:
    """Normalised singular values of the stacked token representations Z (log-log)."""
    fig = _figure(5.5, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    S = S.double()
    y = (S / S[0]).clamp_min(1e-12).numpy()
    ax.loglog(range(1, len(y) + 1), y, color="tab:blue")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("index i", fontsize=8)
    ax.set_ylabel("s_i / s_1", fontsize=8)
    return _save(fig, path)
