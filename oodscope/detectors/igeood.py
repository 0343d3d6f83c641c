"""Igeood: Fisher-Rao distances to the in-distribution, from the logits or from the features.

Gomes, Alberge, Duhamel & Piantanida, "Igeood: An Information Geometry Approach to Out-of-Distribution
Detection", NeurIPS 2022 (arXiv:2203.07798).

* **Logits** (``igeood``): the Fisher-Rao distance between two categorical distributions is
  ``d_FR(p, q) = 2 arccos(sum_j sqrt(p_j q_j))``. With ``q(.|x; T) = softmax(f(x) / T)`` and the class
  centroids ``mu_c`` = mean training logits of class ``c``, the ID score is the sum of distances to all
  centroids, ``IGEOOD(x) = sum_c d_FR(q(.|x; T), q(.|mu_c; T))``: a confident ID sample is close to one
  centroid and far (up to ``pi``) from the others. We return ``-IGEOOD(x)``. ``T`` is tuned on validation data
  in the paper; the default ``T = 1`` is the plain softmax (input pre-processing is not used here).
* **Features** (``igeood_features``): class-conditional Gaussians ``N(mu_c, Sigma)`` with a diagonal
  tied covariance; a test feature ``x`` is the Gaussian ``N(x, Sigma)``. For diagonal Gaussians the Fisher-Rao
  distance is ``sqrt(sum_j d_j^2)`` over univariate distances, with

      d((m1, s1), (m2, s2)) = sqrt(2) log((|a| + |b|) / (|a| - |b|)),
      a = (m1/sqrt2 - m2/sqrt2, s1 + s2),  b = (m1/sqrt2 - m2/sqrt2, s1 - s2),

  which for ``s1 = s2 = s`` is ``2 sqrt(2) asinh(|m1 - m2| / (2 sqrt(2) s))``. The score is the distance to the
  closest class Gaussian, ``min_c d_FR(N(x, Sigma), N(mu_c, Sigma))`` (higher = more OOD). This is the
  penultimate-feature variant; the paper additionally sums such scores over hidden layers with weights tuned
  on validation data.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._classstats import class_stats, n_classes_for
from ._common import as_float64, probabilities
from .base import Detector


def fisher_rao_categorical(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Pairwise ``2 arccos(sum_j sqrt(p_ij q_kj))`` for rows of ``p`` (n, C) and ``q`` (m, C): (n, m)."""
    inner = np.sqrt(as_float64(p)) @ np.sqrt(as_float64(q)).T
    return 2.0 * np.arccos(np.clip(inner, 0.0, 1.0))


def fisher_rao_gaussian(m1, s1, m2, s2) -> np.ndarray:
    """Fisher-Rao distance between univariate Gaussians ``N(m1, s1^2)`` and ``N(m2, s2^2)`` (elementwise)."""
    m1, s1, m2, s2 = (as_float64(v) for v in (m1, s1, m2, s2))
    dm = (m1 - m2) / np.sqrt(2.0)
    a = np.sqrt(dm**2 + (s1 + s2) ** 2)
    b = np.sqrt(dm**2 + (s1 - s2) ** 2)
    return np.sqrt(2.0) * np.log((a + b) / (a - b))


class Igeood(Detector):
    """``score(x) = -sum_c d_FR(softmax(f(x)/T), softmax(mu_c/T))`` with logit centroids ``mu_c``."""

    name = "igeood"
    needs = frozenset({Need.LOGITS, Need.LABELS})
    grid = {"temperature": [1.0, 2.0, 5.0, 10.0, 100.0, 1000.0]}

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def _check_params(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"igeood: temperature must be > 0, got {self.temperature!r}")

    def _fit(self, train: Outputs) -> None:
        stats = class_stats(train.logits, train.labels, train.logits.shape[1], self.name, covariance=False)
        self.centroids_ = stats.means
        self.centroid_probs_ = probabilities(self.centroids_, self.temperature)

    def _score(self, x: Outputs) -> np.ndarray:
        distances = fisher_rao_categorical(probabilities(x.logits, self.temperature), self.centroid_probs_)
        return -distances.sum(axis=1)


class IgeoodFeatures(Detector):
    """``score(x) = min_c d_FR(N(x, Sigma), N(mu_c, Sigma))`` with a diagonal tied ``Sigma``."""

    name = "igeood_features"
    needs = frozenset({Need.FEATURES, Need.LABELS})

    def __init__(self, eps: float = 1e-12, chunk_elements: int = 1 << 24):
        self.eps = eps
        self.chunk_elements = chunk_elements

    def _check_params(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"igeood_features: eps (variance floor) must be > 0, got {self.eps!r}")

    def _fit(self, train: Outputs) -> None:
        n_classes = n_classes_for(train, self.name)
        stats = class_stats(train.features, train.labels, n_classes, self.name, covariance=False)
        self.means_ = stats.means
        self.stds_ = np.sqrt(stats.variances + self.eps)

    def _score(self, x: Outputs) -> np.ndarray:
        n_classes, dim = self.means_.shape
        rows = max(1, self.chunk_elements // (n_classes * dim))
        scale = 1.0 / (2.0 * np.sqrt(2.0) * self.stds_)
        out = np.empty(len(x))
        for start in range(0, len(x), rows):
            f = as_float64(x.features[start:start + rows])
            u = np.abs(f[:, None, :] - self.means_[None]) * scale          # (rows, C, D)
            d = 2.0 * np.sqrt(2.0) * np.arcsinh(u)                          # equal-sigma closed form
            out[start:start + rows] = np.sqrt((d**2).sum(axis=2)).min(axis=1)
        return out
