"""Gaussian statistics shared by the distance detectors of suite II (vectorised, float64, chunked).

Class-conditional statistics use one matrix product over all classes (``one_hot.T @ X``), never a Python loop
over samples; scoring works on chunks of rows so memory stays bounded for large banks.
"""

from __future__ import annotations

import numpy as np

from ._common import as_float64, class_means
from .mahalanobis import min_squared_distance, whitening


def chunked_class_means(features: np.ndarray, labels: np.ndarray, n_classes: int, who: str,
                        chunk: int = 65536) -> np.ndarray:
    """Per-class means as one sparse one-hot product per row chunk (memory ``O(chunk x D + C x D)``).

    Labels are validated by :func:`~._common.class_means` on one row per class present, so the errors
    (missing classes named, fewer than two classes, out-of-range labels) are the same as everywhere else.
    """
    from scipy import sparse

    labels = np.asarray(labels)
    present = np.unique(labels)
    class_means(np.zeros((len(present), 1)), present, n_classes, who)
    sums = np.zeros((n_classes, features.shape[1]))
    for start in range(0, len(features), chunk):
        block = labels[start:start + chunk]
        one_hot = sparse.csr_matrix((np.ones(len(block)), (block, np.arange(len(block)))),
                                    shape=(n_classes, len(block)))
        sums += one_hot @ as_float64(features[start:start + chunk])
    return sums / np.bincount(labels, minlength=n_classes)[:, None]


def tied_covariance(features: np.ndarray, labels: np.ndarray, means: np.ndarray,
                    chunk: int = 262144) -> np.ndarray:
    """``1/N sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T`` (float64), accumulated over row chunks."""
    dim = features.shape[1]
    covariance = np.zeros((dim, dim))
    for start in range(0, len(features), chunk):
        centered = as_float64(features[start:start + chunk]) - means[labels[start:start + chunk]]
        covariance += centered.T @ centered
    return covariance / len(features)


def full_covariance(features: np.ndarray, chunk: int = 262144) -> tuple[np.ndarray, np.ndarray]:
    """Mean and ``1/N``-normalised covariance of all rows (float64, chunked)."""
    mean = np.zeros(features.shape[1])
    for start in range(0, len(features), chunk):
        mean += as_float64(features[start:start + chunk]).sum(axis=0)
    mean /= len(features)
    covariance = np.zeros((features.shape[1], features.shape[1]))
    for start in range(0, len(features), chunk):
        centered = as_float64(features[start:start + chunk]) - mean
        covariance += centered.T @ centered
    return mean, covariance / len(features)


def per_class_covariances(features: np.ndarray, labels: np.ndarray, means: np.ndarray) -> np.ndarray:
    """``(C, D, D)`` class covariances ``1/N_c sum_{y_i = c} (x_i - mu_c)(x_i - mu_c)^T`` in one einsum-free
    product: rows are scaled by the one-hot of their class and multiplied as one batched ``C x N x D`` product
    over a sorted view (classes are contiguous after an argsort, so each class is one slice)."""
    order = np.argsort(labels, kind="stable")
    centered = as_float64(features[order]) - means[labels[order]]
    bounds = np.searchsorted(labels[order], np.arange(len(means) + 1))
    counts = np.diff(bounds)
    # one product per class block; the loop runs over classes, never over samples
    return np.stack([centered[a:b].T @ centered[a:b] / n for a, b, n in zip(bounds[:-1], bounds[1:], counts)])


def shrink(covariance: np.ndarray, shrinkage: float) -> np.ndarray:
    """Ledoit-Wolf-style convex shrinkage towards the scaled identity: ``(1 - s) S + s tr(S)/D I``."""
    if shrinkage == 0.0:
        return covariance
    dim = covariance.shape[-1]
    target = np.trace(covariance, axis1=-2, axis2=-1)[..., None, None] / dim * np.eye(dim)
    return (1.0 - shrinkage) * covariance + shrinkage * target


class TiedGaussian:
    """Class means + one shared covariance on one representation; ``distance(x)`` = min over classes of the
    squared Mahalanobis distance (Lee et al. 2018, Eq. 2), chunked."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, n_classes: int, who: str,
                 shrinkage: float = 0.0):
        self.means = chunked_class_means(features, labels, n_classes, who)
        self.covariance = shrink(tied_covariance(features, labels, self.means), shrinkage)
        self.whitener = whitening(self.covariance)
        self.whitened_means = self.means @ self.whitener

    def distances(self, x: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Squared distances to every class mean, ``(N, C)`` (float64)."""
        out = np.empty((len(x), len(self.means)))
        mean_norms = (self.whitened_means**2).sum(axis=1)
        for start in range(0, len(x), chunk):
            z = as_float64(x[start:start + chunk]) @ self.whitener
            out[start:start + chunk] = np.maximum(
                (z**2).sum(axis=1, keepdims=True) - 2.0 * z @ self.whitened_means.T + mean_norms, 0.0)
        return out

    def min_distance(self, x: np.ndarray) -> np.ndarray:
        return min_squared_distance(x, self.whitener, self.whitened_means)
