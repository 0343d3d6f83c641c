"""Selective classification: risk-coverage curves, AURC and E-AURC.

Geifman, Uziel & El-Yaniv, "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers", ICLR 2019:
samples are accepted in order of confidence; at coverage ``k/n`` the selective risk is the error rate among the
``k`` accepted samples. AURC is the mean selective risk over coverages; E-AURC subtracts the AURC of an oracle
that accepts all correct predictions first (computed exactly for the discrete case, not with the continuous
approximation ``r + (1 - r) ln(1 - r)``). Ties in the rejection score are accepted together: the risk of a
tied group is evaluated once, at the group's end, weighted by its size.

``rejection_scores`` follow the detector convention: higher = reject first (e.g. an OOD score or ``-MSP``).
``errors`` is the per-sample loss, ``True``/1 for a misclassified sample.
"""

from __future__ import annotations

import numpy as np


def _check(rejection_scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(rejection_scores, dtype=np.float64).ravel()
    losses = np.asarray(errors, dtype=np.float64).ravel()
    if scores.size == 0 or scores.shape != losses.shape:
        raise ValueError(f"need equally many scores and errors (>0), got {scores.size} and {losses.size}")
    if not (np.isfinite(scores).all() and np.isfinite(losses).all()):
        raise ValueError("rejection scores and errors must be finite")
    return scores, losses


def risk_coverage_curve(rejection_scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and selective risk at each distinct threshold, from the most confident group upwards."""
    scores, losses = _check(rejection_scores, errors)
    order = np.argsort(scores, kind="mergesort")
    scores, losses = scores[order], losses[order]
    ends = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    accepted = ends + 1.0
    risk = np.cumsum(losses)[ends] / accepted
    return accepted / scores.size, risk


def aurc(rejection_scores: np.ndarray, errors: np.ndarray) -> float:
    """Area under the risk-coverage curve (lower is better)."""
    coverage, risk = risk_coverage_curve(rejection_scores, errors)
    return float(np.sum(np.diff(np.r_[0.0, coverage]) * risk))


def oracle_aurc(errors: np.ndarray) -> float:
    """AURC of the perfect ranking: every correct prediction accepted before any error."""
    losses = np.sort(np.asarray(errors, dtype=np.float64).ravel())
    k = np.arange(1, losses.size + 1)
    return float(np.mean(np.cumsum(losses) / k))


def eaurc(rejection_scores: np.ndarray, errors: np.ndarray) -> float:
    """Excess AURC over the oracle ranking."""
    return aurc(rejection_scores, errors) - oracle_aurc(errors)
