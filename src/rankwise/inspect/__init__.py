"""Spectral diagnostics of a model: per-matrix rank metrics, representations, model updates.

    from rankwise.inspect import inspect_model, write_outputs
    result = inspect_model(model, tokenizer=tok, texts=texts, name="smollm2-135m")
    paths = write_outputs(result, "inspect-smollm2-135m")   # JSON, table, PNGs, report.html

Submodules: weights (per-matrix metrics), representations (RankMe, Matrix Nuclear-Norm),
compare (rank of W1 - W0), plots (PNG), report (text tables, self-contained HTML).
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.inspect.compare import UpdateAnalysis, compare_weights
from rankwise.inspect.weights import WeightAnalysis, analyze_weights, quick_table_data

__all__ = [
    "InspectResult",
    "UpdateAnalysis",
    "WeightAnalysis",
    "analyze_weights",
    "compare_weights",
    "inspect_model",
    "quick_table_data",
    "summarize",
    "write_outputs",
]

logger = logging.getLogger(__name__)

HEATMAP_METRICS = ("erank_ratio", "stable_rank", "energy90", "alpha", "farms_alpha")
UPDATE_HEATMAP_METRICS = ("update_rank", "update_erank", "relative_update")


@dataclass
class InspectResult:
    """Everything `inspect_model` measured (representations and update are optional)."""

    name: str
    weights: WeightAnalysis
    representations: dict[str, Any] | None = None
    update: UpdateAnalysis | None = None
    quick: bool = False


def inspect_model(
    model: nn.Module | Mapping[str, torch.Tensor],
    *,
    name: str = "model",
    tokenizer: Any = None,
    texts: Sequence[str] | None = None,
    compare_to: nn.Module | Mapping[str, torch.Tensor] | None = None,
    quick: bool = False,
    welore_reduction: float = 0.5,
    max_texts: int = 16,
    max_length: int = 256,
    progress: bool = True,
) -> InspectResult:
    """Run the diagnostics: weights always; representations when tokenizer and texts are given;
    the update W1 - W0 when `compare_to` (the second model) is given."""
    weights = analyze_weights(model, quick=quick, welore_reduction=welore_reduction, progress=progress)
    result = InspectResult(name=name, weights=weights, quick=quick)
    if tokenizer is not None and texts and isinstance(model, nn.Module) and not quick:
        from rankwise.inspect.representations import hidden_states, representation_metrics

        states = hidden_states(
            model, tokenizer, texts, max_length=max_length, max_texts=max_texts, progress=progress
        )
        result.representations = representation_metrics(states)
    if compare_to is not None:
        result.update = compare_weights(model, compare_to, progress=progress)
    return result


def _median(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(result: InspectResult) -> dict[str, Any]:
    """The headline numbers shown on top of the report and in the JSON."""
    rows = result.weights.rows
    summary: dict[str, Any] = {"model": result.name, "matrices": len(rows)}
    summary["median erank / full"] = _median([r["erank_ratio"] for r in rows])
    if not result.quick:
        summary["median alpha"] = _median([r.get("alpha") for r in rows])
        summary["median FARMS alpha"] = _median([r.get("farms_alpha") for r in rows])
        classed = [r for r in rows if r.get("welore")]
        if classed:
            lrc = sum(r["welore"] == "LRC" for r in classed)
            summary["WeLore low-rank fraction"] = lrc / len(classed)
            summary["WeLore tau"] = result.weights.welore_tau
    rep = result.representations
    if rep:
        summary["RankMe"] = rep["rankme"]
        summary["RankMe / dim"] = rep["rankme_ratio"]
        summary["MNN / L"] = rep["mnn_per_token"]
        summary["nuclear norm / L"] = rep["nuclear_per_token"]
    if result.update:
        ranks = [r["update_rank"] for r in result.update.rows]
        summary["matrices compared"] = len(ranks)
        summary["median update rank"] = _median(ranks)
    return summary


def to_json(result: InspectResult) -> dict[str, Any]:
    """A JSON-ready dict of the result (spectra go to spectra.safetensors, not here)."""
    out: dict[str, Any] = {
        "model": result.name,
        "summary": summarize(result),
        "welore": {"tau": result.weights.welore_tau, "reduction": result.weights.welore_reduction},
        "matrices": result.weights.rows,
    }
    if result.representations:
        out["representations"] = {k: v for k, v in result.representations.items() if k != "spectrum"}
    if result.update:
        u = result.update
        out["update"] = {
            "matrices": u.rows,
            "only_in_first": u.only_in_first,
            "only_in_second": u.only_in_second,
            "shape_mismatch": u.shape_mismatch,
        }
    return out


def write_outputs(result: InspectResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write inspect.json, table.txt, spectra.safetensors, the PNG plots and report.html into
    `out_dir`, published atomically (rankwise.io.publish_dir); returns their final paths."""
    from rankwise import io

    with io.publish_dir(out_dir) as tmp:
        paths = _write_outputs(result, tmp)
    return {k: Path(out_dir) / p.relative_to(tmp) for k, p in paths.items()}


def _write_outputs(result: InspectResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    from rankwise import io
    from rankwise.inspect import plots, report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    columns = report.QUICK_COLUMNS if result.quick else report.WEIGHT_COLUMNS
    rows = result.weights.rows

    paths["json"] = out / "inspect.json"
    io.write_json(paths["json"], to_json(result))
    table = report.format_table(rows, columns)
    if result.update:
        table += "\n\n" + report.format_table(result.update.rows, report.UPDATE_COLUMNS)
    paths["table"] = out / "table.txt"
    io.write_text(paths["table"], table + "\n")
    paths["spectra"] = out / "spectra.safetensors"
    io.save_tensors(paths["spectra"], {k: v.float() for k, v in result.weights.spectra.items()})

    images: dict[str, bytes] = {}
    paths["spectra_png"] = out / "spectra.png"
    images["Singular values per layer"] = plots.plot_spectra(rows, result.weights.spectra, paths["spectra_png"])
    if any(r["block"] is not None for r in rows):
        paths["heatmaps_png"] = out / "heatmaps.png"
        images["Per-layer metrics"] = plots.plot_heatmaps(rows, HEATMAP_METRICS, paths["heatmaps_png"])
    if result.representations:
        paths["representations_png"] = out / "representations.png"
        images["Representation spectrum"] = plots.plot_representation_spectrum(
            result.representations["spectrum"], paths["representations_png"]
        )
    if result.update and any(r["update_spectral_norm"] > 0 for r in result.update.rows):
        u = result.update
        paths["update_spectra_png"] = out / "update_spectra.png"
        images["Singular values of W1 - W0"] = plots.plot_spectra(
            u.rows, u.spectra, paths["update_spectra_png"], title="Singular values of W1 - W0"
        )
        if any(r["block"] is not None for r in u.rows):
            paths["update_heatmaps_png"] = out / "update_heatmaps.png"
            images["Update metrics per layer"] = plots.plot_heatmaps(
                u.rows, UPDATE_HEATMAP_METRICS, paths["update_heatmaps_png"], title="W1 - W0 per layer"
            )
    paths["html"] = out / "report.html"
    io.write_text(
        paths["html"],
        report.render_html(
            summarize(result),
            rows,
            images,
            columns=columns,
            update_rows=result.update.rows if result.update else None,
            notes=_NOTES,
        ),
    )
    return paths


_NOTES = (
    "erank: effective rank exp(H(p)), p = s / sum(s) (Roy & Vetterli 2007); erank(E) uses "
    "p = s^2 / sum(s^2). stable: sum(s^2) / s_1^2. E90 / E99: rank holding 90 % / 99 % of sum(s^2).",
    "alpha: power-law exponent of the eigenvalue spectrum s^2 (continuous MLE, xmin by the "
    "Kolmogorov-Smirnov scan, as WeightWatcher); alpha < 2 reads over-trained, 2-6 well trained, "
    "> 6 random-like. FARMS: the same fit on the pooled spectrum of 100 x 200 submatrices with "
    "xmin at the median eigenvalue, which removes the bias of alpha on the matrix aspect ratio.",
    "WeLore: singular values min-max normalised per matrix; one global threshold tau gives the "
    "target rank reduction over the block matrices; a matrix is a low-rank component (LRC) when "
    "it loses rank at tau and its kept rank is below the break-even rank mn / (m + n).",
    "RankMe: exp(H(s / ||s||_1 + 1e-7)) of the stacked last hidden states of the corpus tokens. "
    "MNN / L: per text, the sum of the top min(L, d) column norms of the centred, row-normalised "
    "hidden states over L (Matrix Nuclear-Norm), next to the exact nuclear norm / L.",
)
