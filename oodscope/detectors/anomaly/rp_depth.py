"""Random projection depth / outlyingness.

Stahel-Donoho outlyingness (Donoho & Gasko, "Breakdown Properties of Location Estimates Based on Halfspace Depth
and Projected Outlyingness", Ann. Statist. 1992) and the projection depth of Zuo, "Projection-based depth
functions and associated medians", Ann. Statist. 2003 (Eq. 2.2):
``O(x) = sup_{||u|| = 1} |u^T x - Med(u^T X)| / MAD(u^T X)``, ``PD(x) = 1 / (1 + O(x))``. The supremum is
approximated over ``n_projections`` directions drawn uniformly on the unit sphere (random projection depth, as in
Zuo 2003 Sec. 3 and Bauw et al. 2021 Eq. 1). The anomaly score is ``O(x)`` (``aggregate="max"``), a strictly
decreasing function of the depth; ``aggregate="mean"`` averages over the projections instead (the estimator
Bauw et al. argue for). ``MAD`` is the raw median absolute deviation.
"""

from __future__ import annotations

import numpy as np

from ...extraction.outputs import Outputs
from ._base import AnomalyDetector, check_int, in_blocks


def random_directions(n_features: int, n_projections: int, seed: int) -> np.ndarray:
    """``n_features x n_projections`` matrix of directions uniform on the unit sphere."""
    directions = np.random.default_rng(seed).standard_normal((n_features, n_projections))
    return directions / np.linalg.norm(directions, axis=0, keepdims=True)


def projected_outlyingness(projected: np.ndarray, median: np.ndarray, mad: np.ndarray, aggregate: str) -> np.ndarray:
    ratio = np.abs(projected - median) / mad
    return ratio.max(axis=1) if aggregate == "max" else ratio.mean(axis=1)


def median_mad(projected: np.ndarray, who: str) -> tuple[np.ndarray, np.ndarray]:
    median = np.median(projected, axis=0)
    mad = np.median(np.abs(projected - median), axis=0)
    if np.any(mad <= 0):
        raise ValueError(f"{who}: more than half of the training rows coincide along a projection (MAD = 0); "
                         "remove duplicated rows or add more varied training data")
    return median, mad


class RandomProjectionDepth(AnomalyDetector):
    """``O(x) = max_u |u^T x - Med(u^T X)| / MAD(u^T X)`` over random unit directions ``u``."""

    name = "rp_depth"
    grid = {"n_projections": [100, 1000, 5000], "aggregate": ["max", "mean"]}

    def __init__(self, n_projections: int = 1000, aggregate: str = "max", seed: int = 0):
        self.n_projections = n_projections
        self.aggregate = aggregate
        self.seed = seed

    def _check_params(self) -> None:
        check_int(self.name, "n_projections", self.n_projections)
        if self.aggregate not in ("max", "mean"):
            raise ValueError(f"{self.name}: aggregate must be 'max' or 'mean', got {self.aggregate!r}")

    def _fit(self, train: Outputs) -> None:
        X = self._x(train)
        self.directions_ = random_directions(X.shape[1], self.n_projections, self.seed)
        self.median_, self.mad_ = median_mad(in_blocks(lambda rows: rows @ self.directions_, X), self.name)

    def _score(self, x: Outputs) -> np.ndarray:
        return in_blocks(lambda rows: projected_outlyingness(rows @ self.directions_, self.median_, self.mad_,
                                                            self.aggregate), x.features)

    def depth(self, x) -> np.ndarray:
        """Projection depth ``1 / (1 + O(x))`` in (0, 1]."""
        return 1.0 / (1.0 + self.score(x))
