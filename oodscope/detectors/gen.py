"""Generalized ENtropy (GEN).

Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection", CVPR 2023,
Eq. 5-6: with the softmax probabilities sorted decreasingly, ``p_(1) >= p_(2) >= ...``, the generalized entropy
over the top ``M`` classes is

    ``G_gamma(p) = sum_{j=1}^{M} p_(j)^gamma * (1 - p_(j))^gamma``,

which is large for flat posteriors (OOD) and small for peaked ones (ID), so it is the OOD score as is.
Defaults are the paper's: ``gamma = 0.1`` and ``M = 100`` (when the classifier has fewer than ``M`` classes all
classes are used, as ``M`` only drops the noisy tail of a large label space). Probabilities are computed in
float64 and not clipped.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import probabilities
from .base import Detector


class GEN(Detector):
    """``score(x) = sum over the top-M probabilities of p^gamma (1 - p)^gamma``."""

    name = "gen"
    needs = frozenset({Need.LOGITS})
    grid = {"gamma": [0.01, 0.05, 0.1, 0.2, 0.5, 1.0], "M": [1, 2, 5, 10, 100]}

    def __init__(self, gamma: float = 0.1, M: int = 100):
        self.gamma = gamma
        self.M = M

    def _check_params(self) -> None:
        if not (np.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gen: gamma must be a positive number, got {self.gamma}")
        if isinstance(self.M, bool) or not isinstance(self.M, (int, np.integer)) or self.M < 1:
            raise ValueError(f"gen: M (number of top classes) must be an integer >= 1, got {self.M!r}")

    def _score(self, x: Outputs) -> np.ndarray:
        p = probabilities(x.logits)
        top = -np.sort(-p, axis=1)[:, : min(int(self.M), p.shape[1])]
        return (top ** self.gamma * (1.0 - top) ** self.gamma).sum(axis=1)
