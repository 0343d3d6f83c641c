"""Nearest Neighbor Guidance (NNGuide).

Park, Jung & Teoh, "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023, Sec. 3:
the bank holds the normalised training features scaled by their confidence, ``z_i / ||z_i|| * s(x_i)``, with the
energy confidence ``s(x) = log sum_j exp f_j(x)`` (Eq. 4); the guidance of a test sample is the mean of its
``k`` largest inner products with the bank, ``g(x) = 1/k sum_{i in NN_k} <z / ||z||, bank_i>`` (Eq. 5); the
guided confidence is ``s(x) * g(x)`` (Eq. 6). The OOD score is ``-s(x) g(x)``. ``k = 10`` is the default of the
authors' code; ``bank_fraction`` keeps a fixed random share of the training set (the paper uses 1 % of
ImageNet-1k, ``alpha = 0.01``; the full bank is used by default here, as for CIFAR-scale sets). Search is
exact inner product (``faiss.IndexFlatIP``).
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from ..extraction.outputs import Need, Outputs
from ._common import as_float64, l2_normalize
from .base import Detector


class NNGuide(Detector):
    """``score(x) = -logsumexp(f(x)) * mean_top_k <z/||z||, bank>``."""

    name = "nnguide"
    needs = frozenset({Need.FEATURES, Need.LOGITS})
    grid = {"k": [1, 10, 50, 100]}

    def __init__(self, k: int = 10, bank_fraction: float = 1.0, seed: int = 0):
        self.k = k
        self.bank_fraction = bank_fraction
        self.seed = seed

    def _check_params(self) -> None:
        if not (isinstance(self.k, (int, np.integer)) and self.k >= 1):
            raise ValueError(f"nnguide: k must be a positive integer, got {self.k!r}")
        if not 0.0 < self.bank_fraction <= 1.0:
            raise ValueError(f"nnguide: bank_fraction must be in (0, 1], got {self.bank_fraction!r}")

    def _fit(self, train: Outputs) -> None:
        import faiss

        n = len(train)
        keep = np.arange(n)
        if self.bank_fraction < 1.0:
            keep = np.sort(np.random.default_rng(self.seed).choice(n, max(1, int(round(self.bank_fraction * n))),
                                                                    replace=False))
        if self.k > len(keep):
            raise ValueError(f"nnguide: k={self.k} is larger than the bank ({len(keep)} samples); "
                             f"use k <= {len(keep)}")
        confidence = logsumexp(as_float64(train.logits[keep]), axis=1)
        bank = l2_normalize(as_float64(train.features[keep])) * confidence[:, None]
        self.index_ = faiss.IndexFlatIP(bank.shape[1])
        self.index_.add(np.ascontiguousarray(bank, dtype=np.float32))

    def _score(self, x: Outputs) -> np.ndarray:
        confidence = logsumexp(as_float64(x.logits), axis=1)
        queries = l2_normalize(as_float64(x.features))
        guidance = np.empty(len(x))
        for start in range(0, len(x), 65536):
            block = np.ascontiguousarray(queries[start:start + 65536], dtype=np.float32)
            similarities, _ = self.index_.search(block, self.k)
            guidance[start:start + 65536] = similarities.astype(np.float64).mean(axis=1)
        return -confidence * guidance
