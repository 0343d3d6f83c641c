"""Deep nearest neighbours (KNN) on L2-normalised features.

Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022. Features are
normalised, ``z = phi(x) / ||phi(x)||`` (Sec. 3.1), and the score is the distance to the k-th nearest training
feature, ``r_k(z) = ||z - z_(k)||`` (Eq. 2, with the decision ``-r_k >= lambda`` for ID). The paper uses
``k = 50`` on CIFAR-10 with the full training set. Search is exact (``faiss.IndexFlatL2``) by default; for large
banks ``index="ivf"`` (``faiss.IndexIVFFlat``: ``nlist = 4 sqrt(N)`` k-means cells, ``nprobe`` of them searched)
or ``index="hnsw"`` (``faiss.IndexHNSWFlat``, 32 links per node, ``efSearch = max(ef_search, k)``) trade a little
recall for speed. Approximate distances are still exact distances to the neighbours found, so an approximate
k-th distance can only be larger than or equal to the exact one.

Instance discrimination (Miyai, Yu, Irie & Aizawa, "Can Pre-trained Networks Detect Familiar Out-of-Distribution
Data?", 2023, Sec. 5): when the OOD data overlap the pre-training data ("PT-OOD"), fine-tuned classifiers map it
close to ID classes; the paper's remedy is this same detector on the *instance-discriminative* features of the
pre-trained backbone (self-supervised, e.g. MoCo/DINO/CLIP image encoders, not the fine-tuned model): extract
those features for the ID training bank and the test data, and fit ``knn`` on them (the paper reports ``k = 1``
as well as the KNN default). Nothing else changes: pass the backbone as the model to :func:`oodscope.extract`
(``head=None`` for encoders without a classifier, then the features are taken from ``layers`` or the model
output) or pass the feature arrays directly: ``oodscope.create("knn", k=1).fit(bank).score(x)``.
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


INDEXES = ("exact", "ivf", "hnsw")


def approximate_index(bank: np.ndarray, kind: str, nprobe: int = 16, ef_search: int = 64, k: int = 1):
    """An approximate L2 faiss index over ``bank``: ``"ivf"`` (IVF-Flat) or ``"hnsw"`` (HNSW-Flat)."""
    import faiss

    bank = np.ascontiguousarray(bank, dtype=np.float32)
    n, dim = bank.shape
    if kind == "ivf":
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))
        quantizer = faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist)
        rng = np.random.default_rng(0)
        train = bank if n <= 256 * nlist else bank[rng.choice(n, 256 * nlist, replace=False)]
        index.train(train)
        index.add(bank)
        index.nprobe = min(nprobe, nlist)
        return index
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32)
        index.hnsw.efSearch = max(ef_search, k)
        index.add(bank)
        return index
    return exact_index(bank)


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

    def __init__(self, k: int = 50, index: str = "exact", nprobe: int = 16, ef_search: int = 64):
        self.k = k
        self.index = index
        self.nprobe = nprobe
        self.ef_search = ef_search

    def _check_params(self) -> None:
        if not (isinstance(self.k, (int, np.integer)) and self.k >= 1):
            raise ValueError(f"knn: k must be a positive integer, got {self.k!r}")
        if self.index not in INDEXES:
            raise ValueError(f"knn: index must be one of {INDEXES}, got {self.index!r}")
        for key in ("nprobe", "ef_search"):
            if not (isinstance(getattr(self, key), (int, np.integer)) and getattr(self, key) >= 1):
                raise ValueError(f"knn: {key} must be a positive integer, got {getattr(self, key)!r}")

    def _fit(self, train: Outputs) -> None:
        if self.k > len(train):
            raise ValueError(f"knn: k={self.k} is larger than the training bank ({len(train)} samples); "
                             f"use k <= {len(train)}")
        bank = l2_normalize(np.asarray(train.features, dtype=np.float32))
        self.index_ = approximate_index(bank, self.index, self.nprobe, self.ef_search, self.k)

    def _score(self, x: Outputs) -> np.ndarray:
        return kth_neighbour_distance(self.index_, l2_normalize(np.asarray(x.features, dtype=np.float32)), self.k)
