"""Figures for reports. matplotlib is imported here, lazily, with the non-interactive Agg backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_score_distributions(results, path: str | Path, bins: int = 40) -> Path:
    """One panel per detector: histograms of the ID test scores and of every OOD set's scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            ax.hist(np.clip(scores, edges[0], edges[-1]), bins=edges, density=True, histtype="stepfilled" if is_id
                    else "step", alpha=0.35 if is_id else 0.9, linewidth=1.4, color="0.3" if is_id else f"C{index}",
                    label=f"{dataset} (ID)" if is_id else dataset)
        ax.set_title(detector)
        ax.set_xlabel("score (higher = more OOD)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(detectors):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
