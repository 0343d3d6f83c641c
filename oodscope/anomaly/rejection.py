"""Example-wise confidence (ExCeeD) and learning to reject without labels (RejEx).

Perini, Vercruyssen & Davis, "Quantifying the Confidence of Anomaly Detectors in Their Example-Wise Predictions",
ECML-PKDD 2020 (ExCeeD). With ``n`` training scores and the contamination factor ``gamma``, a test score ``s`` gets
the Bayesian estimate (uniform prior) of its outlyingness ``psi_n(s) = (1 + #{i: s_i <= s}) / (2 + n)``, and the
probability that it would be predicted anomalous, ``P(Y^ = 1 | s) = P(Bin(n, psi_n) >= n (1 - gamma))``:
the chance that, drawing ``n`` training scores again, ``s`` lands in the top ``gamma`` share. The confidence in the
prediction is that probability for a predicted anomaly (``s`` above the training ``1 - gamma`` quantile) and one
minus it for a predicted normal.

Perini & Davis, "Unsupervised Anomaly Detection with Rejection", NeurIPS 2023 (RejEx): reject the predictions
whose ExCeeD confidence is below the constant threshold ``tau = 1 - epsilon``, ``epsilon = 2 exp(-T)`` (``T = 32``
in the paper's experiments, as we read it). Because the rank of an exchangeable test score among the training
scores is uniform on ``{0, ..., n}``, the expected test rejection rate is known before any test data is seen:
the share of ranks whose confidence falls below ``tau`` (:func:`expected_rejection_rate`, exact under
exchangeability and without ties).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom

from ..detectors.anomaly._base import check_contamination


def _binomial_threshold(n: int, contamination: float) -> int:
    return int(np.ceil(n * (1.0 - contamination)))


def anomaly_probability(train_scores: np.ndarray, scores: np.ndarray, contamination: float) -> np.ndarray:
    """ExCeeD's ``P(Y^ = 1 | s) = P(Bin(n, psi_n(s)) >= n(1 - gamma))`` for each score."""
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

    def __init__(self, contamination: float = 0.1, T: float = 32.0):
        self.contamination = contamination
        self.T = T

    def fit(self, train_scores: np.ndarray) -> "ExCeeD":
        self.contamination_ = check_contamination("ExCeeD", self.contamination)
        if not float(self.T) > 0:
            raise ValueError(f"ExCeeD: T must be positive, got {self.T!r}")
        self.train_scores_ = np.sort(np.asarray(train_scores, dtype=np.float64))
        anomaly_probability(self.train_scores_, self.train_scores_[:1], self.contamination_)  # validates
        self.threshold_ = float(np.quantile(self.train_scores_, 1.0 - self.contamination_))
        return self

    @property
    def rejection_threshold(self) -> float:
        """``tau = 1 - 2 exp(-T)``."""
        return 1.0 - 2.0 * np.exp(-float(self.T))

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """``True`` for a predicted anomaly (score above the training ``1 - gamma`` quantile)."""
        return np.asarray(scores, dtype=np.float64) > self.threshold_

    def confidence(self, scores: np.ndarray) -> np.ndarray:
        """ExCeeD confidence in the prediction of each score, in [0, 1]."""
        p = anomaly_probability(self.train_scores_, scores, self.contamination_)
        return np.where(self.predict(scores), p, 1.0 - p)

    def reject(self, scores: np.ndarray) -> np.ndarray:
        """``True`` where the prediction is rejected (confidence below ``tau``)."""
        return self.confidence(scores) < self.rejection_threshold

    def expected_rejection_rate(self) -> float:
        """Expected share of rejected test predictions for test scores exchangeable with the training scores."""
        return expected_rejection_rate(len(self.train_scores_), self.contamination_, self.T)


def expected_rejection_rate(n: int, contamination: float, T: float = 32.0) -> float:
    """Share of the ``n + 1`` equally likely ranks of a new score whose ExCeeD confidence is below ``1 - 2e^-T``.

    A rank ``j`` (number of training scores at or below the new one) gives ``psi = (1 + j) / (2 + n)``; the
    prediction is "anomaly" when ``j`` exceeds ``n (1 - gamma)`` (the training quantile).
    """
    contamination = check_contamination("ExCeeD", contamination)
    ranks = np.arange(n + 1)
    p = binom.sf(_binomial_threshold(n, contamination) - 1, n, (1.0 + ranks) / (2.0 + n))
    predicted_anomaly = ranks > np.floor(n * (1.0 - contamination))
    confidence = np.where(predicted_anomaly, p, 1.0 - p)
    return float(np.mean(confidence < 1.0 - 2.0 * np.exp(-float(T))))
