"""fDBD: fast decision-boundary-based OOD detection.

Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024, Sec. 3 (Eq. 5-6).
For the predicted class ``ŷ`` the feature-space distance from ``z`` to the decision boundary with class ``c``
is ``|f_ŷ - f_c| / ||w_ŷ - w_c||`` (closed form for a linear head). The score averages it over ``c ≠ ŷ`` and
regularises by the distance to the mean ID training feature::

    fDBD(x) = 1/(C-1) Σ_{c≠ŷ} (|f_ŷ(x) - f_c(x)| / ||w_ŷ - w_c||) / ||z - μ_train||

ID samples are far from boundaries relative to their distance from the mean, so we return ``-fDBD``.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import as_float64
from ._shaping import head_logits
from .base import Detector


class FDBD(Detector):
    """``score(x) = -mean_{c≠ŷ} |f_ŷ - f_c| / ||w_ŷ - w_c|| / ||z - μ||``."""

    name = "fdbd"
    needs = frozenset({Need.FEATURES, Need.HEAD})
    grid: dict = {}

    def _fit(self, train: Outputs) -> None:
        W = as_float64(train.head.W)
        if W.shape[0] < 2:
            raise ValueError("fdbd: decision boundaries need a head with at least two classes")
        self.mean_ = as_float64(train.features).mean(axis=0)
        self.boundary_norms_ = np.linalg.norm(W[:, None, :] - W[None, :, :], axis=2)

    def _score(self, x: Outputs) -> np.ndarray:
        z = as_float64(x.features)
        logits = head_logits(z, x.head)
        predicted = logits.argmax(axis=1)
        gaps = np.abs(logits[np.arange(len(z)), predicted][:, None] - logits)
        norms = self.boundary_norms_[predicted]
        distances = np.divide(gaps, norms, out=np.zeros_like(gaps), where=norms > 0)
        mean_distance = distances.sum(axis=1) / (logits.shape[1] - 1)
        return -mean_distance / np.maximum(np.linalg.norm(z - self.mean_, axis=1), 1e-12)
