"""Per-example prototypicality metrics of Carlini, Erlingsson & Papernot, "Distribution Density, Tails, and
Outliers in Machine Learning: Metrics and Applications" (arXiv:1910.13427, 2019), on model outputs. The ``density``
protocol (:mod:`oodscope.protocols.density`) orients them so that higher = more prototypical and correlates them
with the detectors' scores (:func:`oodscope.metrics.correlation.spearman`). scipy is imported lazily."""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np


def true_label_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Softmax probability of the true label, per row (float64): the paper's *conf* metric."""
    from scipy.special import softmax

    probabilities = softmax(np.asarray(logits, dtype=np.float64), axis=1)
    return probabilities[np.arange(len(labels)), np.asarray(labels)]


def mean_pairwise_js(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """Mean over model pairs of the Jensen-Shannon divergence (nats) of their per-row output distributions (the
    paper's *agr* metric is its negative).

    Raises:
        ValueError: with fewer than two models.
    """
    if len(probabilities) < 2:
        raise ValueError("ensemble agreement needs at least two models")
    p = [np.clip(np.asarray(q, dtype=np.float64), 1e-300, None) for q in probabilities]

    def kl(a, b):
        return (a * (np.log(a) - np.log(b))).sum(axis=1)

    pairs = [(a, b) for a, b in combinations(p, 2)]
    return np.mean([0.5 * kl(a, (a + b) / 2) + 0.5 * kl(b, (a + b) / 2) for a, b in pairs], axis=0)


def symmetric_kl(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per row, ``KL(p || q) + KL(q || p) = sum_k (p_k - q_k)(log p_k - log q_k)`` (nats) of the softmax
    distributions ``p``, ``q`` of the logits ``before`` and ``after`` (the holdout-retraining metric is its
    negative).

    Raises:
        ValueError: when the shapes differ, are not ``(N, classes)``, or a logit is NaN or inf.
    """
    from scipy.special import log_softmax

    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape or before.ndim != 2:
        raise ValueError(f"symmetric_kl: need two (N, classes) logit arrays of one shape, got {before.shape} and "
                         f"{after.shape}")
    if not (np.isfinite(before).all() and np.isfinite(after).all()):
        raise ValueError("symmetric_kl: the logits contain NaN or inf (a diverged fine-tuning?); rerun it with a "
                         "lower lr")
    log_p, log_q = log_softmax(before, axis=1), log_softmax(after, axis=1)
    return ((np.exp(log_p) - np.exp(log_q)) * (log_p - log_q)).sum(axis=1)


def strongest_private_level(correct: np.ndarray, noise_multipliers: Sequence[float],
                            share: float = 0.9) -> np.ndarray:
    """Per example, the largest noise multiplier at which at least ``share`` of that level's models classify it
    correctly, 0 when none does (the paper's *priv* metric); ``correct`` is ``(levels, models, N)`` booleans.

    Raises:
        ValueError: when ``correct`` is not ``(len(noise_multipliers), >= 1, N)``.
    """
    correct = np.asarray(correct, dtype=bool)
    sigma = np.asarray(noise_multipliers, dtype=np.float64)
    if correct.ndim != 3 or correct.shape[0] != len(sigma) or correct.shape[1] == 0:
        raise ValueError(f"strongest_private_level: need (levels, models, N) = ({len(sigma)}, >= 1, N) booleans, "
                         f"got {correct.shape}")
    passed = correct.mean(axis=1) >= share
    return np.where(passed, sigma[:, None], 0.0).max(axis=0)
