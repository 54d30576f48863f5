"""Pictures people would rather look at than read: the CKA heatmap with the block boundary."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from .artifacts import AnalysisReport, DepthReport


def plot_cka(matrix: np.ndarray, report: AnalysisReport, path: Path) -> None:
    """Heatmap of CKA over layers 0..L (0 = embeddings), undefined cells grey, the late block outlined."""
    size = len(matrix)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * size, 0.8 + 0.5 * size), dpi=120)
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#bbbbbb")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=1, origin="upper")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=f"CKA ({report.cka_estimator})")
    if size <= 25:
        for i in range(size):
            for j in range(size):
                if not np.isnan(matrix[i, j]):
                    color = "black" if matrix[i, j] > 0.6 else "white"
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    labels = ["emb"] + [str(k) for k in range(1, size)]
    ax.set_xticks(range(size), labels)
    ax.set_yticks(range(size), labels)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    start = report.boundary - 0.5
    ax.add_patch(plt.Rectangle((start, start), size - 0.5 - start, size - 0.5 - start,
                               fill=False, edgecolor="#00d0ff", linewidth=2.5))
    ax.axvline(start, color="#00d0ff", linestyle="--", linewidth=1)
    ax.axhline(start, color="#00d0ff", linestyle="--", linewidth=1)
    name = Path(report.model).name or report.model
    ax.set_title(
        f"{name} on {report.task} ({report.split}, n={report.n_examples}, {report.representation})\n"
        f"late block starts at layer {report.boundary}: keep {report.boundary} of "
        f"{report.total_layers} · full-model {report.metric.name} {report.metric.value:.4f}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_depths(report: DepthReport, path: Path) -> None:
    """Calibration metric versus kept depth: no further tuning, healed where computed, and the depth chosen."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    depths = [s.depth for s in report.scores]
    ax.plot(depths, [s.metric for s in report.scores], "o-", label="fine-tuned head (no further tuning)")
    healed = {"head": "head re-fitted", "top": f"top {report.heal_layers} layer(s) + head distilled",
              "whole": "every kept layer + head distilled"}
    points = [(s.depth, s.metric_healed) for s in report.scores if s.metric_healed is not None]
    if points:
        ax.plot(*zip(*sorted(points)), "s-", label=healed.get(report.heal, report.heal))
    ax.axhline(report.full_metric, color="grey", linewidth=1, label=f"full model ({report.total_layers} layers)")
    ax.axhspan(report.full_metric - report.tolerance, report.full_metric, color="grey", alpha=0.15,
               label=f"tolerance {report.tolerance:g}")
    ax.axvline(report.boundary, color="#00a0c0", linestyle="--", linewidth=1, label=f"CKA boundary ({report.boundary})")
    ax.axvline(report.depth, color="#d04000", linewidth=2, label=f"kept: {report.depth}")
    ax.set_xticks(range(1, report.total_layers + 1))
    ax.set_xlabel("layers kept")
    ax.set_ylabel(f"{report.metric_name} ({report.calibration}, n={report.n_calibration})")
    ax.set_title(f"metric versus depth · heal={report.heal}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
