"""Relative Mahalanobis distance (RMDS).

Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, "A Simple Fix to Mahalanobis Distance for Improving Near-OOD
Detection", arXiv:2106.09022 (2021), Eq. 2-3. Class-conditional Gaussians with a tied covariance (as in
:mod:`.mahalanobis`) give ``MD_k(z)``; a background Gaussian ``N(mu_0, Sigma_0)`` fitted on all training
features regardless of class gives ``MD_0(z)``. The relative distance is ``RMD_k(z) = MD_k(z) - MD_0(z)``;
the confidence is ``-min_k RMD_k(z)``, so the OOD score is ``min_k MD_k(z) - MD_0(z)``.
Both covariances are float64 and ``1/N``-normalised; inverses are pseudo-inverses (see :mod:`.mahalanobis`).
The background covariance comes from the class statistics (total scatter = within-class + between-class
scatter), so fitting makes one chunked pass over the bank for the covariance, as plain Mahalanobis does.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import n_classes_of
from ._gaussian import TiedGaussian, min_squared_distance, whitening
from .base import Detector


class RMDS(Detector):
    """``score(x) = min_k (z - mu_k)^T Sigma^-1 (z - mu_k) - (z - mu_0)^T Sigma_0^-1 (z - mu_0)``."""

    name = "rmds"
    needs = frozenset({Need.FEATURES, Need.LABELS})

    def _fit(self, train: Outputs) -> None:
        self._set(TiedGaussian(train.features, train.labels, n_classes_of(train.labels, train.logits), self.name))

    def _fit_shards(self, shards) -> None:
        """Fit from merged per-shard class moments (:func:`oodscope.detectors.sharded.fit_from_shards`)."""
        from ._sufficient import class_moments, n_classes_of_shards

        moments = class_moments(shards, self.name, n_classes_of_shards(shards))
        self._set(TiedGaussian.from_statistics(moments.means, moments.counts, moments.within))

    def _set(self, gaussian: TiedGaussian) -> None:
        self.class_gaussian_ = gaussian
        mean, covariance = self.class_gaussian_.background()
        self.background_whitener_ = whitening(covariance)
        self.background_mean_ = (mean @ self.background_whitener_)[None, :]

    def _score(self, x: Outputs) -> np.ndarray:
        background = min_squared_distance(x.features, self.background_whitener_, self.background_mean_)
        return self.class_gaussian_.min_distance(x.features) - background
