"""Mahalanobis distance to class-conditional Gaussians with a tied covariance (feature-space score).

Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
Attacks", NeurIPS 2018. Class means ``mu_c`` and one shared covariance
``Sigma = 1/N sum_c sum_{i: y_i = c} (x_i - mu_c)(x_i - mu_c)^T`` (Sec. 2, below Eq. 1); the confidence score
is ``M(x) = max_c -(x - mu_c)^T Sigma^-1 (x - mu_c)`` (Eq. 2). The OOD score is ``-M(x)``, the squared
distance to the closest class mean. This is the penultimate-feature score without input pre-processing or
layer ensembles. ``Sigma^-1`` is the pseudo-inverse (eigenvalues below ``rcond * max`` dropped), as
scikit-learn's ``EmpiricalCovariance`` does.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import as_float64, class_means, n_classes_of
from .base import Detector


def whitening(covariance: np.ndarray, rcond: float = 1e-10) -> np.ndarray:
    """Matrix ``A`` with ``A @ A.T = pinv(covariance)`` (eigen-decomposition, tiny eigenvalues dropped)."""
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    keep = eigenvalues > rcond * max(eigenvalues.max(), 0.0)
    return eigenvectors[:, keep] / np.sqrt(eigenvalues[keep])


def min_squared_distance(x: np.ndarray, whitener: np.ndarray, whitened_means: np.ndarray,
                         chunk: int = 65536) -> np.ndarray:
    """``min_c ||(x - mu_c) A||^2`` for every row of ``x``, in chunks so memory stays bounded."""
    out = np.empty(len(x))
    mean_norms = (whitened_means**2).sum(axis=1)
    for start in range(0, len(x), chunk):
        z = as_float64(x[start:start + chunk]) @ whitener
        squared = (z**2).sum(axis=1, keepdims=True) - 2.0 * z @ whitened_means.T + mean_norms
        out[start:start + chunk] = np.maximum(squared.min(axis=1), 0.0)
    return out


class Mahalanobis(Detector):
    """``score(x) = min_c (x - mu_c)^T Sigma^-1 (x - mu_c)`` on penultimate features."""

    name = "mahalanobis"
    needs = frozenset({Need.FEATURES, Need.LABELS})

    def _fit(self, train: Outputs) -> None:
        features = as_float64(train.features)
        n_classes = n_classes_of(train.labels, train.logits)
        self.means_ = class_means(features, train.labels, n_classes, self.name)
        centered = features - self.means_[train.labels]
        self.covariance_ = centered.T @ centered / len(features)
        self.whitener_ = whitening(self.covariance_)
        self.whitened_means_ = self.means_ @ self.whitener_

    def _score(self, x: Outputs) -> np.ndarray:
        return min_squared_distance(x.features, self.whitener_, self.whitened_means_)
