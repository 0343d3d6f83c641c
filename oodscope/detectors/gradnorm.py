"""GradNorm in closed form for the last layer.

Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in the Wild",
NeurIPS 2021. The score is the L1 norm of the gradient of ``D_KL(u || softmax(f(x)/T))`` (``u`` uniform over
the ``C`` classes) with respect to the last-layer weights ``W`` (Eq. 3-4); ID data has larger gradients.

For ``f = W z + b`` the gradient has a closed form: ``∂D_KL/∂f = (softmax(f/T) - u) / T``, hence
``∂D_KL/∂W = (softmax(f/T) - u) z^T / T``, a rank-one matrix whose entrywise L1 norm factorises::

    S(x) = ||softmax(f/T) - 1/C||_1 * ||z||_1 / T

so no per-sample backward pass is needed. Default ``T = 1`` (the paper's). Returned as ``-S`` (higher = OOD).
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import as_float64, probabilities
from ._shaping import check_positive
from .base import Detector


class GradNorm(Detector):
    """``score(x) = -||softmax(f/T) - 1/C||_1 ||z||_1 / T``."""

    name = "gradnorm"
    needs = frozenset({Need.FEATURES, Need.LOGITS})
    grid = {"temperature": [0.5, 1.0, 2.0, 5.0]}

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def _check_params(self) -> None:
        check_positive(self.name, "temperature", self.temperature)

    def _score(self, x: Outputs) -> np.ndarray:
        p = probabilities(x.logits, self.temperature)
        logit_part = np.abs(p - 1.0 / p.shape[1]).sum(axis=1)
        return -logit_part * np.abs(as_float64(x.features)).sum(axis=1) / self.temperature
