"""Class-conditional statistics for the density detectors, memory bounded for large feature banks.

Everything is computed in row chunks (about 256 MiB of float64 at a time) so a 1M x 2048 float32 bank never gets a
float64 copy: per-class sums are one matrix product per chunk (``one_hot.T @ X``, no Python loop over samples
or classes), and the within-class scatter is accumulated in float64 from the class-centred chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._common import check_class_labels, n_classes_of
from ._gaussian import ELEMENTS, chunked_class_means, rows_per_chunk, tied_covariance  # noqa: F401


@dataclass
class ClassStats:
    counts: np.ndarray        # (C,) samples per class
    means: np.ndarray         # (C, D) float64 class means
    mean: np.ndarray          # (D,) float64 mean of all samples
    within: np.ndarray        # (D, D) float64 within-class covariance 1/N sum_i (x_i - mu_y)(x_i - mu_y)^T
    variances: np.ndarray     # (D,) float64 diagonal of ``within``


def check_labels(labels: np.ndarray, n_samples: int, n_classes: int, who: str) -> np.ndarray:
    """Integer labels in ``[0, n_classes)`` with every class present; errors name the empty classes."""
    if labels is None:
        raise ValueError(f"{who}: fit needs the in-distribution training labels (Outputs(labels=...) or fit(X, y))")
    labels = np.asarray(labels)
    if labels.shape != (n_samples,):
        raise ValueError(f"{who}: expected {n_samples} training labels, got shape {labels.shape}")
    check_class_labels(labels, n_classes, who)
    return labels


def class_stats(features: np.ndarray, labels: np.ndarray, n_classes: int, who: str, covariance: bool = True,
                chunk: int | None = None) -> ClassStats:
    """Counts, class means, global mean and the (tied) within-class covariance, in two chunked passes."""
    n, dim = features.shape
    chunk = chunk or rows_per_chunk(max(dim, n_classes))
    labels = check_labels(labels, n, n_classes, who)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    means = chunked_class_means(features, labels, n_classes, who, chunk=chunk)
    mean = counts @ means / n
    if covariance:
        within = tied_covariance(features, labels, means, chunk=chunk)
        variances = np.diag(within).copy()
    else:
        within, variances = None, np.zeros(dim)
        for start in range(0, n, chunk):
            centred = np.asarray(features[start:start + chunk], dtype=np.float64) - means[labels[start:start + chunk]]
            variances += (centred**2).sum(axis=0)
        variances /= n
    return ClassStats(counts=counts, means=means, mean=mean, within=within, variances=variances)


def n_classes_for(train, who: str) -> int:
    """Classes of the classifier: the logits' width when present, else the largest label + 1."""
    if train.labels is None:
        raise ValueError(f"{who}: fit needs the in-distribution training labels")
    return n_classes_of(train.labels, train.logits)
