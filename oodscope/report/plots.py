"""Figures for reports. matplotlib is imported here, lazily, with the non-interactive Agg backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_score_distributions(results, path: str | Path, bins: int = 40, dpi: int = 80) -> Path:
    """One panel per detector: histograms (log-scale density, step lines, the ID test filled) of the ID test
    scores and of every OOD set's scores; written atomically."""
    from matplotlib.ticker import LogLocator, NullLocator

    from ..safeio import write_atomic
    from .html import _pyplot, png_bytes

    plt = _pyplot()
    detectors = list(results.scores)
    columns = min(3, len(detectors))
    rows = -(-len(detectors) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, detector in zip(axes.flat, detectors):
        by_set = results.scores[detector]
        values = np.concatenate(list(by_set.values()))
        low, high = np.percentile(values, [0.5, 99.5])
        edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
        for index, (dataset, scores) in enumerate(by_set.items()):
            is_id = dataset == results.id_name
            density, _ = np.histogram(np.clip(scores, edges[0], edges[-1]), bins=edges, density=True)
            density = np.where(density > 0, density, np.nan)  # empty bins: gaps on the log axis
            color = "0.3" if is_id else f"C{index}"
            ax.stairs(density, edges, baseline=None, color=color, linewidth=1.3,
                      label=f"{dataset} (ID)" if is_id else dataset)
            if is_id:
                ax.stairs(density, edges, fill=True, color=color, alpha=0.25, linewidth=0)
        ax.set_yscale("log")  # a saturated detector piles most scores in one bin: linear counts hide the rest
        ax.yaxis.set_major_locator(LogLocator(numticks=5))
        ax.yaxis.set_minor_locator(NullLocator())  # minor log ticks cost more to draw than the data
        ax.set_xlim(edges[0], edges[-1])
        ax.set_title(detector, fontsize=9)
        ax.set_xlabel("score (higher = more OOD)", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(detectors):]:
        ax.axis("off")
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.5 / (3.0 * rows), top=1 - 0.3 / (3.0 * rows), wspace=0.2,
                        hspace=0.45)  # tight_layout is slow
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, png_bytes(fig, dpi))
    plt.close(fig)
    return path
