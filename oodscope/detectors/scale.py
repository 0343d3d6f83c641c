"""SCALE: activation scaling without pruning.

Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc Out-of-distribution Detection Enhancement",
ICLR 2024, Sec. 3 (Eq. 3-4). With ``s1`` the sum of a sample's penultimate activations and ``s2`` the sum of
those above the sample's ``p``-th percentile, the *unpruned* activations are scaled,
``a' = a * exp(r)``, ``r = s1 / s2``, and the energy of ``W a' + b`` is the OOD score. Samples whose activation
mass is concentrated in few units (small ``r``, typical of OOD) are scaled up less. Default ``p = 85``, the
paper's setting.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import as_float64
from ._shaping import check_percentile, head_energy, n_kept, sum_ratio
from .base import Detector


class SCALE(Detector):
    """``score(x) = -logsumexp(W (a e^r) + b)``, ``r = sum(a) / sum(top (100-p)% of a)``."""

    name = "scale"
    needs = frozenset({Need.FEATURES, Need.HEAD})
    grid = {"percentile": [65, 70, 75, 80, 85, 90, 95]}

    def __init__(self, percentile: float = 85):
        self.percentile = percentile

    def _check_params(self) -> None:
        check_percentile(self.name, "percentile", self.percentile)

    def _score(self, x: Outputs) -> np.ndarray:
        a = as_float64(x.features)
        r = sum_ratio(a, n_kept(a.shape[1], self.percentile))
        return head_energy(a * np.exp(r)[:, None], x.head)
