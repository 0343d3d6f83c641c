"""Anomaly-map overlays for the image anomaly-detection report (matplotlib imported lazily, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pick_examples(scores: np.ndarray, labels: np.ndarray, k: int = 3) -> dict[str, np.ndarray]:
    """Indices of the best and worst test images: anomalous images ranked highest ("best") and lowest
    ("worst", missed), and the normal images ranked highest (false alarms)."""
    order = np.argsort(-scores, kind="stable")
    anomalous = order[labels[order] == 1]
    normal = order[labels[order] == 0]
    best = anomalous[:k]
    worst = anomalous[k:][::-1][:k]  # never repeats a "best" image when there are few anomalous images
    return {"best": best, "worst": worst, "false alarm": normal[:k]}


def plot_overlays(runs, test, out_dir: str | Path, k: int = 3) -> list[Path]:
    """One PNG per detector with a map: each picked image, its mask outline and the anomaly map over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for run in runs:
        if run.maps is None:
            continue
        picks = pick_examples(run.scores, test.labels, k)
        rows = [(kind, i) for kind, index in picks.items() for i in index]
        fig, axes = plt.subplots(2, len(rows), figsize=(2.2 * len(rows), 4.6), squeeze=False)
        low, high = np.percentile(run.maps, [1, 99.9])
        for col, (kind, i) in enumerate(rows):
            image = test.images[i].transpose(1, 2, 0)
            for ax in axes[:, col]:
                ax.imshow(image)
                ax.set_xticks([])
                ax.set_yticks([])
                if test.masks is not None and test.masks[i].any():
                    ax.contour(test.masks[i], levels=[0.5], colors="lime", linewidths=0.8)
            axes[1, col].imshow(run.maps[i], cmap="jet", alpha=0.45, vmin=low, vmax=high)
            axes[0, col].set_title(f"{kind}\n{test.defects[i]} s={run.scores[i]:.3g}", fontsize=7)
        fig.suptitle(f"{run.detector}: top row image + mask (green), bottom row anomaly map", fontsize=9)
        fig.tight_layout()
        path = Path(out_dir) / f"overlays_{run.detector}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
