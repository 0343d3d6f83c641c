"""Temperature scaling, then maximum softmax probability.

Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017, Sec. 4.2: a single
temperature ``T > 0`` is fitted by minimising the negative log-likelihood of held-out ID validation data,

    ``T* = argmin_T  -1/n sum_i log softmax(f(x_i) / T)_{y_i}``,

and the calibrated confidence is ``max_c softmax(f(x) / T*)_c``; the OOD score is its negative
(the MSP of Hendrycks & Gimpel 2017 on calibrated logits).

Where the validation data comes from: ``fit(train, val=val)`` with ``val`` an :class:`Outputs` with logits and
labels (e.g. the benchmark's ``val`` split; the detector declares ``Need.VALIDATION``, so ``oodscope bench`` and
``evaluate(..., val=...)`` pass it); then ``train`` is not used for the temperature. Without ``val`` the
temperature is fitted on the labelled data given to ``fit``; training data makes a
well-fitted network look over-confident, so ``T*`` comes out smaller than on held-out data. A fixed
``temperature=`` skips the fitting (used by the tuning grid).

The NLL is convex in ``1/T``, so a bounded scalar search over ``log T`` in ``[1e-3, 1e3]`` finds the global
minimum (in float64); if it lands on a bound a warning says so. When every calibration sample is classified
correctly (separable calibration data) the NLL decreases monotonically as ``T -> 0`` and has no minimum: each
term ``log(1 + sum_c exp((f_c - f_y) / T))`` with ``f_c < f_y`` falls to 0. A search then stops anywhere on the
numerically flat tail (``T = 0.026`` on the digits benchmark), where the softmax saturates and the scores collapse
to a few tied values. Instead ``T = 1`` is kept (the uncalibrated MSP) with a warning to use held-out data on which
the model makes mistakes.
"""

from __future__ import annotations

import warnings
import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from ..extraction.outputs import Need, Outputs
from ._common import as_float64, probabilities
from .base import Detector

T_BOUNDS = (1e-3, 1e3)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, who: str = "temperature") -> float:
    """The NLL-minimising temperature of ``logits`` (n x classes) for integer ``labels`` (Guo et al. 2017)."""
    z = as_float64(logits)
    y = np.asarray(labels)
    if y.dtype.kind not in "iu" or y.shape != (len(z),):
        raise ValueError(f"{who}: need one integer label per calibration sample, got {y.dtype} {y.shape}")
    if (y < 0).any() or (y >= z.shape[1]).any():
        raise ValueError(f"{who}: calibration labels must be class indices in [0, {z.shape[1]}); OOD samples "
                         "(label -1) do not belong in the calibration set")
    picked = z[np.arange(len(z)), y]
    others = np.where(np.arange(z.shape[1])[None, :] == y[:, None], -np.inf, z)
    if (picked > others.max(axis=1)).all():
        warnings.warn(f"{who}: every calibration sample is classified correctly, so the NLL has no minimum "
                      "(it keeps falling as T -> 0, where the scores collapse to ties); keeping T = 1. Fit T on "
                      "held-out data the model gets partly wrong", stacklevel=3)
        return 1.0

    def nll(log_t: float) -> float:
        t = np.exp(log_t)
        return float(np.mean(logsumexp(z / t, axis=1) - picked / t))

    low, high = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-7})
    if min(result.x - low, high - result.x) < 1e-3:
        warnings.warn(f"{who}: the fitted temperature {np.exp(result.x):.4g} lies at the search bound "
                      f"{T_BOUNDS}; the calibration data is (nearly) separable - use held-out validation data",
                      stacklevel=3)
    return float(np.exp(result.x))


class TemperatureScaling(Detector):
    """``score(x) = -max_c softmax(f(x) / T*)_c`` with ``T*`` fitted by NLL on ID validation data."""

    name = "temperature"
    needs = frozenset({Need.LOGITS, Need.VALIDATION})
    grid = {"temperature": [None, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0, 1000.0]}

    def __init__(self, temperature: float | None = None):
        self.temperature = temperature

    def _check_params(self) -> None:
        if self.temperature is not None and not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature: temperature must be > 0 (or None to fit it), got {self.temperature}")

    def _check_not_degenerate(self, data: Outputs) -> None:
        if self.temperature is None:  # a fixed temperature learns nothing from the training data
            super()._check_not_degenerate(data)

    def _fit(self, train: Outputs, val: Outputs | None, ood_val: Outputs | None) -> None:
        if self.temperature is not None:
            self.temperature_ = float(self.temperature)
            return
        data = val if val is not None else train
        logits = data.get(Need.LOGITS, who=self.name)
        if data.labels is None:
            raise ValueError(f"temperature: fitting T needs class labels but dataset {data.name!r} has none; "
                             "pass fit(train, val=<labelled ID validation Outputs>) or a fixed temperature=")
        if val is not None and logits.shape[1] != train.get(Need.LOGITS, who=self.name).shape[1]:
            raise ValueError(f"temperature: calibration logits have {logits.shape[1]} classes but {train.name!r} "
                             f"has {train.logits.shape[1]}")
        self.temperature_ = fit_temperature(logits, data.labels, who=self.name)

    def _score(self, x: Outputs) -> np.ndarray:
        return -probabilities(x.logits, self.temperature_).max(axis=1)
