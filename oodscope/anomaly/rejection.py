"""Example-wise confidence (ExCeeD) and learning to reject without labels (RejEx).

Perini, Vercruyssen & Davis, "Quantifying the Confidence of Anomaly Detectors in Their Example-Wise Predictions",
ECML-PKDD 2020 (ExCeeD). With ``n`` training scores and the contamination factor ``gamma``, a test score ``s`` gets
the Bayesian estimate (uniform prior) of its outlyingness ``psi_n(s) = (1 + #{i: s_i <= s}) / (2 + n)``, and the
probability that it would be predicted anomalous, ``P(Y^ = 1 | s) = P(Bin(n, psi_n) > n - floor(n gamma))``: the
chance that, drawing ``n`` training scores again, ``s`` lands among the top ``floor(n gamma)``. (This is the
authors' implementation, PyOD's ``predict_confidence`` and RejEx's ``pred_confidence``.) The confidence in the
prediction is that probability for a predicted anomaly and one minus it for a predicted normal. A score is a
predicted anomaly when it is above :func:`oodscope.thresholds.threshold_for_contamination` of the training scores,
the smallest training score with at least ``1 - gamma`` of them at or below it: without ties exactly the top
``floor(n gamma)`` training scores are predicted anomalous, the count the binomial above is built on. The authors'
code (PyOD's ``predict``) uses PyOD's linear-interpolated percentile instead, which can predict one more training
score anomalous (``n = 10, gamma = 0.15``: 2 instead of 1) and moves the boundary between two training scores;
``ExCeeD(threshold_rule="linear")`` reproduces it.

Perini & Davis, "Unsupervised Anomaly Detection with Rejection", NeurIPS 2023 (RejEx; reference code
github.com/Lorenzo-Perini/RejEx, ``RejEx.py``): the confidence metric is ExCeeD's *stability*
``M(s) = 2 |P(Y^ = 1 | s) - 1/2|`` and a prediction is rejected when ``M(s) <= tau = 1 - epsilon`` with the constant
``epsilon = 2 exp(-T)``, ``T = 32`` (Sec. 3.1), i.e. when ``exp(-T) <= P(Y^ = 1 | s) <= 1 - exp(-T)``. Because
``P(Y^ = 1 | s) = F(floor(n gamma) - 1; n, 1 - psi_n)`` (``F`` = binomial CDF) decreases in ``1 - psi_n``, rejection
happens exactly for ``1 - psi_n`` in ``[q1, q2]`` with ``F(floor(n gamma) - 1; n, q1) = 1 - exp(-T)`` and
``F(floor(n gamma) - 1; n, q2) = exp(-T)``; ``psi_n`` of an exchangeable test score is (nearly) uniform, so the
expected test rejection rate is ``q2 - q1`` (Theorem 3.5, :func:`expected_rejection_rate`). It holds with
probability ``1 - delta`` under :func:`rejection_rate_upper_bound` (Theorem 3.6) and the expected cost per example
under :func:`expected_cost_upper_bound` (Theorem 3.8). :func:`exact_rejection_rate` counts the ``n + 1`` equally
likely ranks instead (exact under exchangeability without ties).

Changed from an earlier version of this module: the rejection used ``confidence < 1 - 2e^-T`` on the
per-prediction confidence ``max``-style metric (a factor 2 off in the tails) and the binomial threshold was one
count lower than ExCeeD's; both now follow the papers' code.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom

from ..detectors.anomaly._base import check_contamination
from ..thresholds import flag, threshold_for_contamination


def _binomial_threshold(n: int, contamination: float) -> int:
    """``P(Y^ = 1) = P(Bin >= n - floor(n gamma) + 1)``."""
    return n - int(np.floor(n * contamination)) + 1


def anomaly_probability(train_scores: np.ndarray, scores: np.ndarray, contamination: float) -> np.ndarray:
    """ExCeeD's ``P(Y^ = 1 | s) = P(Bin(n, psi_n(s)) > n - floor(n gamma))`` for each score."""
    contamination = check_contamination("ExCeeD", contamination)
    train = np.sort(np.asarray(train_scores, dtype=np.float64))
    if train.ndim != 1 or len(train) < 2 or not np.isfinite(train).all():
        raise ValueError("ExCeeD: train_scores must be a finite 1-d array of at least 2 scores")
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("ExCeeD: scores contain NaN or inf")
    n = len(train)
    below = np.searchsorted(train, scores, side="right")
    psi = (1.0 + below) / (2.0 + n)
    return binom.sf(_binomial_threshold(n, contamination) - 1, n, psi)


class ExCeeD:
    """Confidence and rejection on top of any detector's scores (``fit`` on the training scores)."""

    def __init__(self, contamination: float = 0.1, T: float = 32.0, threshold_rule: str = "inverted_cdf"):
        self.contamination = contamination
        self.T = T
        self.threshold_rule = threshold_rule  # "linear": PyOD's threshold_, as the authors' code (module doc)

    def fit(self, train_scores: np.ndarray) -> "ExCeeD":
        self.contamination_ = check_contamination("ExCeeD", self.contamination)
        if not float(self.T) > 0:
            raise ValueError(f"ExCeeD: T must be positive, got {self.T!r}")
        self.train_scores_ = np.sort(np.asarray(train_scores, dtype=np.float64))
        anomaly_probability(self.train_scores_, self.train_scores_[:1], self.contamination_)  # validates
        self.threshold_ = threshold_for_contamination(self.train_scores_, self.contamination_, self.threshold_rule)
        return self

    @property
    def rejection_threshold(self) -> float:
        """``tau = 1 - 2 exp(-T)``."""
        return 1.0 - 2.0 * np.exp(-float(self.T))

    def stability(self, scores: np.ndarray) -> np.ndarray:
        """RejEx's confidence metric ``2 |P(Y^ = 1 | s) - 1/2|`` in [0, 1]."""
        return 2.0 * np.abs(anomaly_probability(self.train_scores_, scores, self.contamination_) - 0.5)

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """``True`` for a predicted anomaly: ``flag(scores, threshold_for_contamination(train_scores, gamma))``."""
        return flag(scores, self.threshold_)

    def confidence(self, scores: np.ndarray) -> np.ndarray:
        """ExCeeD confidence in the prediction of each score, in [0, 1]."""
        p = anomaly_probability(self.train_scores_, scores, self.contamination_)
        return np.where(self.predict(scores), p, 1.0 - p)

    def reject(self, scores: np.ndarray) -> np.ndarray:
        """``True`` where the prediction is rejected (stability at or below ``tau``, as in the RejEx code)."""
        return self.stability(scores) <= self.rejection_threshold

    def expected_rejection_rate(self) -> float:
        """RejEx's estimate ``q2 - q1`` of the test rejection rate (Theorem 3.5)."""
        return expected_rejection_rate(len(self.train_scores_), self.contamination_, self.T)

    def exact_rejection_rate(self) -> float:
        """Rejected share of the ``n + 1`` equally likely ranks of an exchangeable test score."""
        return exact_rejection_rate(len(self.train_scores_), self.contamination_, self.T)

    def rejection_rate_upper_bound(self, delta: float = 0.1) -> float:
        """Upper bound on the test rejection rate holding with probability ``1 - delta`` (Theorem 3.6)."""
        return rejection_rate_upper_bound(len(self.train_scores_), self.contamination_, self.T, delta)


def _quantiles(n: int, contamination: float, T: float) -> tuple[float, float]:
    """``q1, q2`` with ``F(floor(n gamma) - 1; n, q1) = 1 - e^-T`` and ``F(floor(n gamma) - 1; n, q2) = e^-T``."""
    from scipy.optimize import brentq

    contamination = check_contamination("RejEx", contamination)
    k = int(np.floor(n * contamination)) - 1
    if k < 0:
        raise ValueError(f"RejEx: n * contamination = {n * contamination:.3g} < 1; give more training scores "
                         "or a larger contamination")
    if not float(T) > 0:
        raise ValueError(f"RejEx: T must be positive, got {T!r}")
    eps = np.exp(-float(T))
    q1 = brentq(lambda q: binom.cdf(k, n, q) - (1.0 - eps), 0.0, 1.0, xtol=1e-14)
    q2 = brentq(lambda q: binom.cdf(k, n, q) - eps, 0.0, 1.0, xtol=1e-14)
    return q1, q2


def expected_rejection_rate(n: int, contamination: float, T: float = 32.0) -> float:
    """RejEx's expected test rejection rate ``q2 - q1`` from ``n``, ``gamma`` and ``T`` only (Theorem 3.5)."""
    q1, q2 = _quantiles(n, contamination, T)
    return float(q2 - q1)


def rejection_rate_upper_bound(n: int, contamination: float, T: float = 32.0, delta: float = 0.1) -> float:
    """Upper bound on the test rejection rate that holds with probability ``1 - delta`` (Theorem 3.6, as coded in
    the reference ``get_upper_bound_rr``), capped to [0, 1]."""
    g = check_contamination("RejEx", contamination)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"RejEx: delta must be in (0, 1), got {delta!r}")
    n, T = float(n), float(T)
    right = min(1.0, (-g * (n + 2) + n + 1) / n + T * (n + 2) / np.sqrt(2 * n ** 3 * T))
    inner = 0.5 * n ** 5 * (2 * n * (-3 * g ** 2 - 2 * n * (1 - g) ** 2 + 4 * g - 3) + T * (n + 2) ** 2 - 8)
    left = max(0.0, (2 + n * (1 - g) * (n + 1)) / n ** 2 - np.sqrt(max(inner, 0.0)) / n ** 4)
    return float(min(1.0, right - left + 2 * np.sqrt(np.log(2 / delta) / (2 * n))))


def expected_cost_upper_bound(n: int, contamination: float, T: float = 32.0, c_fp: float = 1.0, c_fn: float = 1.0,
                              c_r: float | None = None) -> float:
    """Upper bound on the expected test cost per example with false-positive, false-negative and rejection costs
    (Theorem 3.8): ``min(gamma, q1) c_fp + min(1 - q2, gamma) c_fn + (q2 - q1) c_r``; ``c_r`` defaults to ``gamma``."""
    g = check_contamination("RejEx", contamination)
    q1, q2 = _quantiles(n, g, T)
    c_r = g if c_r is None else c_r
    return float(min(g, q1) * c_fp + min(1.0 - q2, g) * c_fn + (q2 - q1) * c_r)


def exact_rejection_rate(n: int, contamination: float, T: float = 32.0) -> float:
    """Share of the ``n + 1`` equally likely ranks of a new score whose stability is at most ``1 - 2e^-T``.

    A rank ``j`` (number of training scores at or below the new one) gives ``psi = (1 + j) / (2 + n)``.
    """
    contamination = check_contamination("ExCeeD", contamination)
    ranks = np.arange(n + 1)
    p = binom.sf(_binomial_threshold(n, contamination) - 1, n, (1.0 + ranks) / (2.0 + n))
    return float(np.mean(2.0 * np.abs(p - 0.5) <= 1.0 - 2.0 * np.exp(-float(T))))
