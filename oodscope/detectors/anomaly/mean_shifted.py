"""Mean-shifted scoring on given features (the scoring rule of Mean-Shifted Contrastive Loss).

Reiss & Hoshen, "Mean-Shifted Contrastive Loss for Anomaly Detection", AAAI 2023, Sec. 4: features are
L2-normalised, ``z = phi(x) / ||phi(x)||``, then shifted by the normalised training centre ``c`` and normalised
again, ``theta(x) = (z - c) / ||z - c||`` (Eq. 4, the mean-shifted representation). The anomaly score is the kNN
distance in that space, ``s(x) = sum_{y in N_k(x)} ||theta(x) - theta(y)||^2`` over the ``k = 2`` nearest training
rows (their code; equivalent to the cosine distance, ``||a - b||^2 = 2 - 2 cos(a, b)``). Here the features are
given (no contrastive fine-tuning of the encoder): this is the paper's detector applied to fixed features.
"""

from __future__ import annotations

import numpy as np

from ...extraction.outputs import Outputs
from .._common import l2_normalize
from ._base import AnomalyDetector, NeighbourBank, check_int, check_neighbours
from .._sharded_index import check_shards


class MeanShifted(AnomalyDetector):
    """kNN distance between mean-shifted, re-normalised features."""

    name = "mean_shifted"
    adbench_default = False  # an angular score for network features; meaningless on standardised table columns
    grid = {"k": [1, 2, 5, 10]}

    def __init__(self, k: int = 2, shards: int = 1):
        self.k = k
        self.shards = shards

    def _check_params(self) -> None:
        check_int(self.name, "k", self.k)
        check_shards(self.name, self.shards)

    def _shift(self, features: np.ndarray) -> np.ndarray:
        return l2_normalize(l2_normalize(np.asarray(features, dtype=np.float64)) - self.centre_)

    def _fit(self, train: Outputs) -> None:
        check_neighbours(self.name, self.k, len(train))
        z = l2_normalize(self._x(train))
        self.centre_ = l2_normalize(z.mean(axis=0, keepdims=True))[0]
        self.bank_ = NeighbourBank(self._shift(train.features), shards=self.shards, who=self.name)

    def _score(self, x: Outputs) -> np.ndarray:
        squared, _ = self.bank_.search(self._shift(x.features), self.k)
        return squared.sum(axis=1)
