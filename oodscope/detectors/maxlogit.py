"""Maximum logit (MaxLogit).

Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022, Sec. 3:
the anomaly score is the negative maximum unnormalised logit, ``-max_c f_c(x)``.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from .base import Detector


class MaxLogit(Detector):
    """``score(x) = -max_c f_c(x)``."""

    name = "maxlogit"
    needs = frozenset({Need.LOGITS})

    def _score(self, x: Outputs) -> np.ndarray:
        return -np.asarray(x.logits, dtype=np.float64).max(axis=1)
