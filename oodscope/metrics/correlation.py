"""Rank correlations: ID accuracy vs OOD AUROC across models (the ``correlation`` protocol) and a detector's score
vs a per-example density metric (the ``density`` protocol). scipy is imported lazily."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation of two equally long sequences; NaN (undefined, no warning) when either side is
    constant."""
    from scipy.stats import spearmanr

    if np.ptp(np.asarray(a, dtype=np.float64)) == 0 or np.ptp(np.asarray(b, dtype=np.float64)) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def rank_correlations(accuracy: Sequence[float], auroc: Sequence[float]) -> dict[str, float]:
    """Spearman's rho and Kendall's tau of two per-model sequences, with their two-sided p-values.

    Args:
        accuracy: ID accuracy of each model.
        auroc: an OOD AUROC of each model (same order).

    Returns:
        ``spearman``, ``spearman_p``, ``kendall``, ``kendall_p``; all NaN when either sequence is constant (e.g.
        every model equally accurate).

    Raises:
        ValueError: when the lengths differ or there are fewer than 3 models.
    """
    from scipy.stats import kendalltau, spearmanr

    accuracy, auroc = np.asarray(accuracy, dtype=np.float64), np.asarray(auroc, dtype=np.float64)
    if accuracy.shape != auroc.shape or accuracy.size < 3:
        raise ValueError(f"rank correlations need the same number (>= 3) of accuracies and AUROCs, got "
                         f"{accuracy.size} and {auroc.size}: pass more models with --ensemble")
    if np.ptp(accuracy) == 0 or np.ptp(auroc) == 0:  # a constant sequence has no rank correlation
        nan = float("nan")
        return {"spearman": nan, "spearman_p": nan, "kendall": nan, "kendall_p": nan}
    rho, p_rho = spearmanr(accuracy, auroc)
    tau, p_tau = kendalltau(accuracy, auroc)
    return {"spearman": float(rho), "spearman_p": float(p_rho), "kendall": float(tau), "kendall_p": float(p_tau)}
