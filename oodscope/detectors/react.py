"""ReAct: rectified activations.

Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS 2021.

The penultimate activations are clipped at a threshold ``c`` (Eq. 1): ``h̄(x) = min(h(x), c)``, and the
clipped features go through the linear head, ``f^ReAct(x) = W h̄(x) + b`` (Eq. 2); the OOD score is the energy
of these logits (Sec. 3: ReAct + energy). ``c`` is the ``p``-th percentile of all penultimate activations of the
ID training data; the paper uses ``p = 90`` (Sec. 4.1, Fig. 3 ablation).
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import as_float64
from ._shaping import check_percentile, head_energy
from .base import Detector


class ReAct(Detector):
    """``score(x) = -logsumexp(W min(h(x), c) + b)`` with ``c`` the ``percentile``-th ID activation."""

    name = "react"
    needs = frozenset({Need.FEATURES, Need.HEAD})
    grid = {"percentile": [80, 85, 90, 95, 99]}

    def __init__(self, percentile: float = 90):
        self.percentile = percentile

    def _check_params(self) -> None:
        check_percentile(self.name, "percentile", self.percentile)

    def _fit(self, train: Outputs) -> None:
        self.clip_ = float(np.percentile(as_float64(train.features), self.percentile))

    def _score(self, x: Outputs) -> np.ndarray:
        return head_energy(np.minimum(as_float64(x.features), self.clip_), x.head)
