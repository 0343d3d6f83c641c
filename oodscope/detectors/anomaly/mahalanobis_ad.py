"""Mahalanobis distance to one Gaussian fitted on the (unlabelled) training rows.

Mahalanobis, "On the generalised distance in statistics", 1936: ``d^2(x) = (x - mu)^T Sigma^-1 (x - mu)`` with
the empirical mean and covariance (maximum likelihood, ``1/N``). This is the label-free anomaly-detection form;
the registered ``mahalanobis`` (Lee et al. 2018) needs class labels and takes the closest class mean.
``Sigma^-1`` is the pseudo-inverse (eigenvalues below ``1e-10 * max`` dropped), as scikit-learn's
``EmpiricalCovariance.mahalanobis`` does.
"""

from __future__ import annotations

import numpy as np

from ...extraction.outputs import Outputs
from ..mahalanobis import min_squared_distance, whitening
from ._base import AnomalyDetector, in_blocks


class MahalanobisAD(AnomalyDetector):
    """``score(x) = (x - mu)^T Sigma^-1 (x - mu)`` with one Gaussian for all training rows."""

    name = "mahalanobis_ad"

    def _fit(self, train: Outputs) -> None:
        features = self._x(train)
        self.mean_ = features.mean(axis=0)
        centered = features - self.mean_
        self.covariance_ = centered.T @ centered / len(features)
        self.whitener_ = whitening(self.covariance_)
        self.whitened_mean_ = (self.mean_ @ self.whitener_)[None, :]

    def _score(self, x: Outputs) -> np.ndarray:
        return in_blocks(lambda rows: min_squared_distance(rows, self.whitener_, self.whitened_mean_), x.features)
