"""Predictive entropy of the softmax.

Shannon entropy of the class posterior, ``H(x) = -sum_c p_c(x) log p_c(x)`` with ``p = softmax(f(x))``; a flat
posterior (high entropy) marks an uncertain, likely out-of-distribution input. Used as an OOD baseline since
Hendrycks & Gimpel (ICLR 2017) and, e.g., by Chan, Rottmann & Gottschalk, "Entropy Maximization and Meta
Classification for Out-of-Distribution Detection in Semantic Segmentation", ICCV 2021 (Eq. 1). The entropy is
computed from ``log_softmax`` in float64, so no probability is clipped. The method has no hyperparameter.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

from ..extraction.outputs import Need, Outputs
from ._common import as_float64
from .base import Detector


class Entropy(Detector):
    """``score(x) = -sum_c p_c(x) log p_c(x)``."""

    name = "entropy"
    needs = frozenset({Need.LOGITS})
    grid: dict = {}

    def _score(self, x: Outputs) -> np.ndarray:
        log_p = log_softmax(as_float64(x.logits), axis=1)
        return -(np.exp(log_p) * log_p).sum(axis=1)
