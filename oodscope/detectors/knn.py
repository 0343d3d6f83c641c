"""Deep nearest neighbours (KNN) on L2-normalised features.

Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022. Features are
normalised, ``z = phi(x) / ||phi(x)||`` (Sec. 3.1), and the score is the distance to the k-th nearest training
feature, ``r_k(z) = ||z - z_(k)||`` (Eq. 2, with the decision ``-r_k >= lambda`` for ID). The paper uses
``k = 50`` on CIFAR-10 with the full training set. Search is exact (``faiss.IndexFlatL2``) by default; for large
banks ``index="ivf"`` (``faiss.IndexIVFFlat``: ``nlist = 4 sqrt(N)`` k-means cells, ``nprobe`` of them searched)
or ``index="hnsw"`` (``faiss.IndexHNSWFlat``, 32 links per node, ``efSearch = max(ef_search, k)``) trade a little
recall for speed. Approximate distances are still exact distances to the neighbours found, so an approximate
k-th distance can only be larger than or equal to the exact one.

Memory is bounded for large banks (e.g. 1M x 2048, or a ``np.memmap`` of it): the bank stays float32, rows are
normalised and added to the faiss index one chunk at a time (the index holds the only full copy, 4 bytes per
value), the IVF quantizer is trained on a sample of at most ``64 nlist`` rows, and queries are normalised and
searched in chunks. An IVF search that finds fewer than ``k`` neighbours (too few vectors in the ``nprobe``
cells) raises instead of returning a meaningless distance.

Sharded bank: ``shards=S`` (exact search only) splits the bank over ``S`` exact indexes of consecutive rows, one
``IndexFlatL2`` each, and merges their top-k lists exactly (:mod:`._sharded_index`): the same k-th distances as
one index, ``1 / S`` of the bank per index (the layout of one index per worker). The default ``shards=1`` is
the single index.

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
from ._gaussian import chunks, rows_per_chunk
from ._sharded_index import check_shards, sharded_exact_index
from .base import Detector

INDEXES = ("exact", "ivf", "hnsw")
TRAIN_PER_CELL = 64    # IVF k-means sample: this many rows per cell at most (faiss warns below 39)


def _float32_rows(values: np.ndarray, start: int, stop: int, normalize: bool) -> np.ndarray:
    block = np.asarray(values[start:stop], dtype=np.float32)
    return np.ascontiguousarray(l2_normalize(block) if normalize else block)


def add_in_chunks(index, bank: np.ndarray, normalize: bool = False, chunk: int | None = None):
    """Add the rows of ``bank`` (any array, e.g. a memmap) to ``index`` as float32, one chunk at a time."""
    chunk = chunk or rows_per_chunk(bank.shape[1])
    for start, stop in chunks(len(bank), chunk):
        index.add(_float32_rows(bank, start, stop, normalize))
    return index


def exact_index(bank: np.ndarray, normalize: bool = False, chunk: int | None = None):
    """An exact L2 faiss index over ``bank`` (float32, added in chunks). faiss is imported here, lazily."""
    import faiss

    return add_in_chunks(faiss.IndexFlatL2(bank.shape[1]), bank, normalize, chunk)


def default_nlist(n: int) -> int:
    """IVF cells: ``4 sqrt(N)`` (faiss's guideline), at most ``N / 39`` so every cell gets training points."""
    return max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))


def approximate_index(bank: np.ndarray, kind: str, nprobe: int = 16, ef_search: int = 64, k: int = 1,
                      nlist: int | None = None, normalize: bool = False, chunk: int | None = None):
    """A faiss L2 index over ``bank``: ``"ivf"`` (IVF-Flat), ``"hnsw"`` (HNSW-Flat) or ``"exact"`` (flat)."""
    import faiss

    n, dim = bank.shape
    if kind == "ivf":
        nlist = default_nlist(n) if nlist is None else min(nlist, n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        if n <= TRAIN_PER_CELL * nlist:
            sample = _float32_rows(bank, 0, n, normalize)
        else:   # sorted indices: a memmap is read front to back
            rows = np.sort(np.random.default_rng(0).choice(n, TRAIN_PER_CELL * nlist, replace=False))
            block = np.asarray(bank[rows], dtype=np.float32)
            sample = np.ascontiguousarray(l2_normalize(block) if normalize else block)
        index.train(sample)
        del sample
        index.nprobe = min(nprobe, nlist)
        return add_in_chunks(index, bank, normalize, chunk)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32)
        index.hnsw.efSearch = max(ef_search, k)
        return add_in_chunks(index, bank, normalize, chunk)
    return exact_index(bank, normalize, chunk)


def kth_neighbour_distance(index, queries: np.ndarray, k: int, chunk: int | None = None,
                           normalize: bool = False, who: str = "knn") -> np.ndarray:
    """Euclidean distance from each query to its k-th nearest vector in ``index``, searched in chunks."""
    chunk = chunk or rows_per_chunk(queries.shape[1])
    out = np.empty(len(queries))
    for start, stop in chunks(len(queries), chunk):
        squared, found = index.search(_float32_rows(queries, start, stop, normalize), k)
        missing = int((found[:, k - 1] < 0).sum())
        if missing:
            raise ValueError(f"{who}: the index found fewer than k={k} neighbours for {missing} queries (the "
                             f"searched IVF cells hold too few vectors); increase nprobe or use index='exact'")
        out[start:stop] = np.sqrt(np.maximum(squared[:, k - 1].astype(np.float64), 0.0))
    return out


class KNN(Detector):
    """``score(x) = || z(x) - z_(k) ||`` with ``z`` the L2-normalised penultimate feature."""

    name = "knn"
    needs = frozenset({Need.FEATURES})
    grid = {"k": [1, 10, 20, 50, 100, 200, 500, 1000]}

    def __init__(self, k: int = 50, index: str = "exact", nprobe: int = 16, ef_search: int = 64,
                 nlist: int | None = None, shards: int = 1):
        self.k = k
        self.index = index
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.nlist = nlist
        self.shards = shards

    def _check_params(self) -> None:
        if not (isinstance(self.k, (int, np.integer)) and self.k >= 1):
            raise ValueError(f"knn: k must be a positive integer, got {self.k!r}")
        if self.index not in INDEXES:
            raise ValueError(f"knn: index must be one of {INDEXES}, got {self.index!r}")
        for key in ("nprobe", "ef_search"):
            if not (isinstance(getattr(self, key), (int, np.integer)) and getattr(self, key) >= 1):
                raise ValueError(f"knn: {key} must be a positive integer, got {getattr(self, key)!r}")
        if self.nlist is not None and not (isinstance(self.nlist, (int, np.integer)) and self.nlist >= 1):
            raise ValueError(f"knn: nlist (IVF cells) must be a positive integer or None, got {self.nlist!r}")
        check_shards(self.name, self.shards)
        if self.shards > 1 and self.index != "exact":
            raise ValueError(f"knn: shards={self.shards} needs index='exact' (the sharded bank is exact search), "
                             f"got index={self.index!r}")

    def _fit(self, train: Outputs) -> None:
        if self.k > len(train):
            raise ValueError(f"knn: k={self.k} is larger than the training bank ({len(train)} samples); "
                             f"use k <= {len(train)}")
        if self.shards > 1:
            self.index_ = sharded_exact_index(train.features, self.shards, normalize=True, who=self.name)
            return
        self.index_ = approximate_index(train.features, self.index, self.nprobe, self.ef_search, self.k,
                                        nlist=self.nlist, normalize=True)

    def _score(self, x: Outputs) -> np.ndarray:
        return kth_neighbour_distance(self.index_, x.features, self.k, normalize=True, who=self.name)
