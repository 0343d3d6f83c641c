"""One-class SVM (scikit-learn's libsvm implementation).

Schölkopf, Platt, Shawe-Taylor, Smola & Williamson, "Estimating the Support of a High-Dimensional Distribution",
Neural Computation 2001. The decision function is ``f(x) = sum_i alpha_i k(x_i, x) - rho`` (Eq. 13) with an RBF
kernel ``k(x, y) = exp(-gamma ||x - y||^2)``; ``nu`` upper-bounds the share of training outliers (Prop. 4). The
anomaly score is ``-f(x)``. Defaults follow PyOD / ADBench (the baselines of the DTE paper): ``nu = 0.5``,
``gamma = 1 / n_features`` (``"auto"``).
"""

from __future__ import annotations

import numpy as np

from ...extraction.outputs import Outputs
from ._base import AnomalyDetector


class OCSVM(AnomalyDetector):
    """One-class SVM: ``score = -(sum_i alpha_i k(x_i, x) - rho)``."""

    name = "ocsvm"
    grid = {"nu": [0.1, 0.25, 0.5], "gamma": ["auto", "scale"]}

    def __init__(self, nu: float = 0.5, gamma: float | str = "auto", kernel: str = "rbf"):
        self.nu = nu
        self.gamma = gamma
        self.kernel = kernel

    def _check_params(self) -> None:
        if not 0.0 < float(self.nu) <= 1.0:
            raise ValueError(f"{self.name}: nu must be in (0, 1], got {self.nu!r}")
        if isinstance(self.gamma, str) and self.gamma not in ("auto", "scale"):
            raise ValueError(f"{self.name}: gamma must be a positive number, 'auto' or 'scale', got {self.gamma!r}")
        if not isinstance(self.gamma, str) and not float(self.gamma) > 0:
            raise ValueError(f"{self.name}: gamma must be positive, got {self.gamma!r}")
        if self.kernel not in ("rbf", "linear", "poly", "sigmoid"):
            raise ValueError(f"{self.name}: kernel must be rbf, linear, poly or sigmoid, got {self.kernel!r}")

    def _fit(self, train: Outputs) -> None:
        from sklearn.svm import OneClassSVM

        self.svm_ = OneClassSVM(kernel=self.kernel, nu=self.nu, gamma=self.gamma).fit(self._x(train))

    def _score(self, x: Outputs) -> np.ndarray:
        return -self.svm_.decision_function(self._x(x))
