"""Maximum softmax probability (MSP).

Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural
Networks", ICLR 2017. The confidence is ``max_c softmax(f(x))_c`` (Sec. 2); the OOD score is its negative.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import probabilities
from .base import Detector


class MSP(Detector):
    """``score(x) = -max_c softmax(f(x))_c``."""

    name = "msp"
    needs = frozenset({Need.LOGITS})

    def _score(self, x: Outputs) -> np.ndarray:
        return -probabilities(x.logits).max(axis=1)
