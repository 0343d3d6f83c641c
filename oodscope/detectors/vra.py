"""VRA: variational rectified activation (VRA-P).

Xu, Lian, Liu & Tao, "VRA: Variational Rectified Activation for Out-of-distribution Detection", NeurIPS 2023.
The variational analysis (Sec. 3) says the optimal activation operator suppresses abnormally low and high
activations and amplifies intermediate ones; VRA-P (Sec. 3.3) is its piecewise approximation, applied to each
penultimate unit ``z``::

    h(z) = 0        if z < alpha
           z + gamma if alpha <= z <= beta
           beta     if z > beta

followed by the linear head and the energy score. ``alpha`` and ``beta`` are per-unit quantiles of the ID
training activations at ``lower_percentile`` and ``upper_percentile``. Defaults are the authors' CIFAR-10
setting for VRA (``alpha`` at 60 %, ``beta`` at 90 %, ``gamma = 0``); their "VRA+" variant on CIFAR uses
``upper_percentile=95, gamma=0.6``.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import as_float64
from ._shaping import check_percentile, check_positive, head_energy
from .base import Detector


class VRA(Detector):
    """Zero below ``alpha``, shift by ``gamma`` in ``[alpha, beta]``, clip to ``beta`` above; then energy."""

    name = "vra"
    needs = frozenset({Need.FEATURES, Need.HEAD})
    grid = {"lower_percentile": [40, 50, 60, 70], "upper_percentile": [85, 90, 95, 99], "gamma": [0.0, 0.3, 0.6]}

    def __init__(self, lower_percentile: float = 60, upper_percentile: float = 90, gamma: float = 0.0):
        self.lower_percentile = lower_percentile
        self.upper_percentile = upper_percentile
        self.gamma = gamma

    def _check_params(self) -> None:
        check_percentile(self.name, "lower_percentile", self.lower_percentile)
        check_percentile(self.name, "upper_percentile", self.upper_percentile)
        if not self.lower_percentile < self.upper_percentile:
            raise ValueError(f"vra: lower_percentile ({self.lower_percentile}) must be below upper_percentile "
                             f"({self.upper_percentile})")
        check_positive(self.name, "gamma", self.gamma, allow_zero=True)

    def _fit(self, train: Outputs) -> None:
        z = as_float64(train.features)
        self.alpha_, self.beta_ = np.percentile(z, [self.lower_percentile, self.upper_percentile], axis=0)

    def _score(self, x: Outputs) -> np.ndarray:
        z = as_float64(x.features)
        shaped = np.where(z < self.alpha_, 0.0, np.where(z > self.beta_, self.beta_, z + self.gamma))
        return head_energy(shaped, x.head)
