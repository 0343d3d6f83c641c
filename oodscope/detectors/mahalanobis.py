"""Mahalanobis distance to class-conditional Gaussians with a tied covariance (feature-space score).

Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
Attacks", NeurIPS 2018. Class means ``mu_c`` and one shared covariance
``Sigma = 1/N sum_c sum_{i: y_i = c} (x_i - mu_c)(x_i - mu_c)^T`` (Sec. 2, below Eq. 1); the confidence score
is ``M(x) = max_c -(x - mu_c)^T Sigma^-1 (x - mu_c)`` (Eq. 2). The OOD score is ``-M(x)``, the squared
distance to the closest class mean. This is the penultimate-feature score without input pre-processing or
layer ensembles. ``Sigma^-1`` is the pseudo-inverse (eigenvalues below ``rcond * max`` dropped), as
scikit-learn's ``EmpiricalCovariance`` does.

Memory is bounded for large banks (e.g. 1M x 2048 float32, or a ``np.memmap`` of it): the class means and the
covariance are accumulated in float64 over row chunks (:class:`._gaussian.TiedGaussian`), never from a float64
copy of the whole bank, and scoring is chunked as well.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import n_classes_of
from ._gaussian import TiedGaussian, min_squared_distance, whitening  # noqa: F401  (re-exported for other modules)
from .base import Detector


class Mahalanobis(Detector):
    """``score(x) = min_c (x - mu_c)^T Sigma^-1 (x - mu_c)`` on penultimate features."""

    name = "mahalanobis"
    needs = frozenset({Need.FEATURES, Need.LABELS})

    def _fit(self, train: Outputs) -> None:
        self._set(TiedGaussian(train.features, train.labels, n_classes_of(train.labels, train.logits), self.name))

    def _fit_shards(self, shards) -> None:
        """Fit from merged per-shard class moments (:func:`oodscope.detectors.sharded.fit_from_shards`)."""
        from ._sufficient import class_moments, n_classes_of_shards

        moments = class_moments(shards, self.name, n_classes_of_shards(shards))
        self._set(TiedGaussian.from_statistics(moments.means, moments.counts, moments.within))

    def _set(self, gaussian: TiedGaussian) -> None:
        self.means_ = gaussian.means
        self.covariance_ = gaussian.covariance
        self.whitener_ = gaussian.whitener
        self.whitened_means_ = gaussian.whitened_means

    def _score(self, x: Outputs) -> np.ndarray:
        return min_squared_distance(x.features, self.whitener_, self.whitened_means_)
