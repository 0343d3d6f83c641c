"""Isolation Forest (scikit-learn's implementation).

Liu, Ting & Zhou, "Isolation Forest", ICDM 2008. An anomaly is isolated by few random axis-parallel splits:
``s(x, psi) = 2^(-E[h(x)] / c(psi))`` (Eq. 2), with ``h`` the path length in a tree grown on ``psi`` sub-samples
and ``c(psi)`` the average path length of an unsuccessful BST search (Eq. 1). Paper defaults: ``t = 100`` trees,
``psi = 256`` sub-samples (``min(256, n)`` as in scikit-learn's ``max_samples="auto"``). The score is ``s`` itself
(scikit-learn's ``-score_samples``), in (0, 1], higher = more anomalous.
"""

from __future__ import annotations

import numpy as np

from ...extraction.outputs import Outputs
from ._base import AnomalyDetector, check_int


class IForest(AnomalyDetector):
    """Isolation Forest anomaly score ``2^(-E[h(x)]/c(psi))``."""

    name = "iforest"
    grid = {"n_estimators": [50, 100, 200], "max_samples": [64, 128, 256]}

    def __init__(self, n_estimators: int = 100, max_samples: int | str = "auto", seed: int = 0):
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.seed = seed

    def _check_params(self) -> None:
        check_int(self.name, "n_estimators", self.n_estimators)
        if self.max_samples != "auto":
            check_int(self.name, "max_samples", self.max_samples, minimum=2)

    def _fit(self, train: Outputs) -> None:
        from sklearn.ensemble import IsolationForest

        self.forest_ = IsolationForest(n_estimators=self.n_estimators, max_samples=self.max_samples,
                                       random_state=self.seed).fit(self._x(train))

    def _score(self, x: Outputs) -> np.ndarray:
        return -self.forest_.score_samples(self._x(x))
