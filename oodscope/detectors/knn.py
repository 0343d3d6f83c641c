"""Deep nearest neighbours (KNN) on L2-normalised features.

Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022. Features are
normalised, ``z = phi(x) / ||phi(x)||`` (Sec. 3.1), and the score is the distance to the k-th nearest training
feature, ``r_k(z) = ||z - z_(k)||`` (Eq. 2, with the decision ``-r_k >= lambda`` for ID). The paper uses
``k = 50`` on CIFAR-10 with the full training set. Search is exact (``faiss.IndexFlatL2``).
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import l2_normalize
from .base import Detector


def exact_index(bank: np.ndarray):
    """An exact L2 faiss index over ``bank`` (float32, C-contiguous). faiss is imported here, lazily."""
    import faiss

    bank = np.ascontiguousarray(bank, dtype=np.float32)
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    return index


def kth_neighbour_distance(index, queries: np.ndarray, k: int, chunk: int = 65536) -> np.ndarray:
    """Euclidean distance from each query to its k-th nearest vector in ``index``, searched in chunks."""
    out = np.empty(len(queries))
    for start in range(0, len(queries), chunk):
        block = np.ascontiguousarray(queries[start:start + chunk], dtype=np.float32)
        squared, _ = index.search(block, k)
        out[start:start + chunk] = np.sqrt(np.maximum(squared[:, k - 1].astype(np.float64), 0.0))
    return out


class KNN(Detector):
    """``score(x) = || z(x) - z_(k) ||`` with ``z`` the L2-normalised penultimate feature."""

    name = "knn"
    needs = frozenset({Need.FEATURES})
    grid = {"k": [1, 10, 20, 50, 100, 200, 500, 1000]}

    def __init__(self, k: int = 50):
        self.k = k

    def _check_params(self) -> None:
        if not (isinstance(self.k, (int, np.integer)) and self.k >= 1):
            raise ValueError(f"knn: k must be a positive integer, got {self.k!r}")

    def _fit(self, train: Outputs) -> None:
        if self.k > len(train):
            raise ValueError(f"knn: k={self.k} is larger than the training bank ({len(train)} samples); "
                             f"use k <= {len(train)}")
        self.index_ = exact_index(l2_normalize(np.asarray(train.features, dtype=np.float32)))

    def _score(self, x: Outputs) -> np.ndarray:
        return kth_neighbour_distance(self.index_, l2_normalize(np.asarray(x.features, dtype=np.float32)), self.k)
