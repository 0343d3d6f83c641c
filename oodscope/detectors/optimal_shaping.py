"""Optimal piecewise-constant feature shaping from ID data only.

Zhao, Xu, Gupta, Asthana, Zheng & Gould, "Towards Optimal Feature-Shaping Methods for Out-of-Distribution
Detection", ICLR 2024. Feature shaping multiplies every penultimate value ``z_j`` by ``θ(z_j)``; the paper takes
``θ`` piecewise constant on ``K`` equal-width intervals ``B_k`` of the feature-value range and scores with the
shaped logit of the predicted class, ``s(x) = w_ŷ · (θ(z) ⊙ z)`` (Sec. 3.2). Without OOD data the optimal
``θ`` has the closed form (Sec. 3.3, Eq. 14)::

    θ_k ∝ E_ID[ Σ_j w_{ŷ j} z_j 1[z_j ∈ B_k] ]

i.e. the average contribution of the feature values that fall into interval ``k`` to the predicted-class logit
on ID training data. Values outside the fitted range get ``θ = 0``. Defaults follow the authors' code:
``K = 100`` intervals over the ``[0.1 %, 99.9 %]`` quantiles of all ID feature values; ``θ`` is normalised to
unit RMS (its scale does not change the ``"logit"`` score). ``scoring="energy"`` uses the energy of the shaped
logits instead.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import as_float64
from ._shaping import head_energy, head_logits
from .base import Detector


class OptimalShaping(Detector):
    """``score(x) = -w_ŷ · (θ(z) ⊙ z)`` with ``θ`` piecewise constant, fitted in closed form on ID data."""

    name = "optimal_shaping"
    needs = frozenset({Need.FEATURES, Need.HEAD})
    grid = {"n_bins": [25, 50, 100, 200], "scoring": ["logit", "energy"]}

    def __init__(self, n_bins: int = 100, tail: float = 1e-3, scoring: str = "logit"):
        self.n_bins = n_bins
        self.tail = tail
        self.scoring = scoring

    def _check_params(self) -> None:
        if isinstance(self.n_bins, bool) or not isinstance(self.n_bins, numbers.Integral) or self.n_bins < 1:
            raise ValueError(f"optimal_shaping: n_bins must be a positive integer, got {self.n_bins!r}")
        if not (isinstance(self.tail, numbers.Real) and 0.0 <= self.tail < 0.5):
            raise ValueError(f"optimal_shaping: tail must be a quantile in [0, 0.5), got {self.tail!r}")
        if self.scoring not in ("logit", "energy"):
            raise ValueError(f"optimal_shaping: scoring must be 'logit' or 'energy', got {self.scoring!r}")

    def _bins(self, z: np.ndarray) -> np.ndarray:
        """Interval index of every value; -1 outside ``[left, right)``."""
        index = np.floor((z - self.left_) / self.width_).astype(np.int64)
        return np.where((index >= 0) & (index < self.n_bins), index, -1)

    def _fit(self, train: Outputs) -> None:
        z = as_float64(train.features)
        left, right = np.quantile(z, [self.tail, 1.0 - self.tail])
        if not right > left:
            raise ValueError(f"optimal_shaping: the ID feature values of {train.name!r} are constant; "
                             "feature shaping needs varying features")
        self.left_, self.width_ = float(left), float(right - left) / self.n_bins
        predicted = head_logits(z, train.head).argmax(axis=1)
        contribution = as_float64(train.head.W)[predicted] * z
        bins = self._bins(z)
        inside = bins >= 0
        theta = np.bincount(bins[inside], weights=contribution[inside], minlength=self.n_bins) / len(z)
        norm = np.sqrt(np.mean(theta ** 2))
        self.theta_ = theta / norm if norm > 0 else theta

    def _shape(self, z: np.ndarray) -> np.ndarray:
        bins = self._bins(z)
        return np.where(bins >= 0, self.theta_[np.maximum(bins, 0)], 0.0) * z

    def _score(self, x: Outputs) -> np.ndarray:
        z = as_float64(x.features)
        shaped = self._shape(z)
        if self.scoring == "energy":
            return head_energy(shaped, x.head)
        W = as_float64(x.head.W)
        predicted = head_logits(z, x.head).argmax(axis=1)
        return -np.einsum("nd,nd->n", W[predicted], shaped)
