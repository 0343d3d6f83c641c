"""k-nearest-neighbour distance on raw features (the classic AD baseline, PyOD's ``KNN``).

Ramaswamy, Rastogi & Shim, "Efficient Algorithms for Mining Outliers from Large Data Sets", SIGMOD 2000: the
outlier score is ``D^k(p)``, the distance to the k-th nearest neighbour (``method="largest"``). Angiulli & Pizzuti,
"Fast Outlier Detection in High Dimensional Spaces", PKDD 2002: the mean distance to the k nearest neighbours
(``method="mean"``, the variant DTE's authors relate DTE-NP to). Default ``k = 5`` (PyOD / ADBench).

Unlike the registered ``knn`` (Sun et al. 2022), features are **not** L2-normalised: in tabular data the vector
norm is informative. Exact search with faiss; test points are scored against the training bank. ``shards=S``
splits the bank over ``S`` exact indexes with an exact top-k merge (:mod:`.._sharded_index`): the same scores.
"""

from __future__ import annotations

import numpy as np

from ...extraction.outputs import Outputs
from ._base import AnomalyDetector, NeighbourBank, check_int, check_neighbours
from .._sharded_index import check_shards


class KNNDistance(AnomalyDetector):
    """Distance to the k-th nearest training row (or the mean over the k nearest)."""

    name = "knn_distance"
    grid = {"k": [1, 5, 10, 20, 50], "method": ["largest", "mean"]}

    def __init__(self, k: int = 5, method: str = "largest", shards: int = 1):
        self.k = k
        self.method = method
        self.shards = shards

    def _check_params(self) -> None:
        check_int(self.name, "k", self.k)
        check_shards(self.name, self.shards)
        if self.method not in ("largest", "mean"):
            raise ValueError(f"{self.name}: method must be 'largest' or 'mean', got {self.method!r}")

    def _fit(self, train: Outputs) -> None:
        check_neighbours(self.name, self.k, len(train))
        self.bank_ = NeighbourBank(self._x(train), shards=self.shards, who=self.name)

    def _score(self, x: Outputs) -> np.ndarray:
        squared, _ = self.bank_.search(self._x(x), self.k)
        distances = np.sqrt(squared)
        return distances[:, -1] if self.method == "largest" else distances.mean(axis=1)
