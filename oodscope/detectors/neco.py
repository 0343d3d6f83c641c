"""NECO: neural-collapse-based OOD detection.

Ammar, Belkhir, Popescu, Manzanera & Franchi, "NECO: NEural Collapse Based Out-of-distribution detection",
ICLR 2024, Sec. 4 (Eq. 8). Under neural collapse ID features concentrate in the low-dimensional subspace
spanned by the class means while OOD features do not. With ``P`` the top-``d`` principal components of the
(standardised) ID training features, ``NECO(x) = ||P h(x)|| / ||h(x)||``; the paper multiplies it by the
maximum logit (``NECO(x) * MaxLogit(x)``) as its final score. ID is high, so we return the negative.

The paper picks ``d`` on validation data; the default here is ``d = C - 1`` (``C`` classes), the dimension of
the simplex spanned by the collapsed class means, which the paper's analysis is built on (capped at half the
feature dimension, e.g. for 100 classes on 64-d features).
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import as_float64
from ._shaping import check_subspace_dim
from .base import Detector


class NECO(Detector):
    """``score(x) = -(||P s(x)|| / ||s(x)||) * max_c f_c(x)``, ``s`` the standardised feature."""

    name = "neco"
    needs = frozenset({Need.FEATURES, Need.LOGITS})
    grid = {"dim": [5, 9, 16, 32, 48], "max_logit": [True, False]}

    def __init__(self, dim: int | None = None, max_logit: bool = True):
        self.dim = dim
        self.max_logit = max_logit

    def _fit(self, train: Outputs) -> None:
        features = as_float64(train.features)
        n_features, n_classes = features.shape[1], train.logits.shape[1]
        default = max(min(n_classes - 1, n_features // 2), 1)
        dim = check_subspace_dim(self.name, default if self.dim is None else self.dim, n_features)
        self.mean_ = features.mean(axis=0)
        std = features.std(axis=0)
        self.scale_ = np.where(std > 0, std, 1.0)
        standardised = (features - self.mean_) / self.scale_
        _, _, vt = np.linalg.svd(standardised, full_matrices=False)
        self.components_ = np.ascontiguousarray(vt[:dim].T)

    def _score(self, x: Outputs) -> np.ndarray:
        s = (as_float64(x.features) - self.mean_) / self.scale_
        full = np.linalg.norm(s, axis=1)
        ratio = np.linalg.norm(s @ self.components_, axis=1) / np.maximum(full, 1e-12)
        if self.max_logit:
            ratio = ratio * as_float64(x.logits).max(axis=1)
        return -ratio
