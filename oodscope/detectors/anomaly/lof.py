"""Local Outlier Factor in novelty mode (scikit-learn's implementation).

Breunig, Kriegel, Ng & Sander, "LOF: Identifying Density-Based Local Outliers", SIGMOD 2000. With
``reach-dist_k(p, o) = max(k-distance(o), d(p, o))`` (Def. 5), ``lrd_k(p) = 1 / mean_{o in N_k(p)}
reach-dist_k(p, o)`` (Def. 6) and ``LOF_k(p) = mean_{o in N_k(p)} lrd_k(o) / lrd_k(p)`` (Def. 7). A new point is
scored against the training neighbourhoods (``novelty=True``); ``LOF ~ 1`` inside clusters, larger for outliers.
Default ``k = 20`` (scikit-learn and PyOD; the paper recommends MinPts >= 10).
"""

from __future__ import annotations

import numpy as np

from ...extraction.outputs import Outputs
from ._base import AnomalyDetector, check_int, check_neighbours


class LOF(AnomalyDetector):
    """Local outlier factor of a new point w.r.t. the training set."""

    name = "lof"
    grid = {"n_neighbors": [5, 10, 20, 50]}

    def __init__(self, n_neighbors: int = 20):
        self.n_neighbors = n_neighbors

    def _check_params(self) -> None:
        check_int(self.name, "n_neighbors", self.n_neighbors)

    def _fit(self, train: Outputs) -> None:
        from sklearn.neighbors import LocalOutlierFactor

        # the training points' own neighbourhoods exclude themselves: k + 1 rows are needed
        check_neighbours(self.name, self.n_neighbors + 1, len(train), "n_neighbors + 1")
        self.lof_ = LocalOutlierFactor(n_neighbors=self.n_neighbors, novelty=True, algorithm="ball_tree")
        self.lof_.fit(self._x(train))

    def _score(self, x: Outputs) -> np.ndarray:
        return -self.lof_.score_samples(self._x(x))
