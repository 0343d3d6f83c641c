"""Energy score.

Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020, Eq. 5:
``E(x; f) = -T * log sum_c exp(f_c(x) / T)``. In-distribution samples have lower energy, so the energy itself is
the OOD score. The paper uses ``T = 1`` for the post-hoc score.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import energy
from .base import Detector


class Energy(Detector):
    """``score(x) = -T * logsumexp(f(x) / T)``."""

    name = "energy"
    needs = frozenset({Need.LOGITS})
    grid = {"temperature": [0.5, 1.0, 2.0, 5.0, 10.0]}

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def _check_params(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"energy: temperature must be > 0, got {self.temperature}")

    def _score(self, x: Outputs) -> np.ndarray:
        return energy(x.logits, self.temperature)
