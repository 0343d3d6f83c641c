"""PyOD's detector interface around any registered oodscope detector (the other direction: the ``pyod`` adapter).

PyOD code (``LSCP``, ``SUOD``, ``pyod.utils`` helpers, user scripts) reads a fitted detector through
``decision_function(X)`` (higher = more anomalous, as oodscope's ``score``), ``decision_scores_`` (the training
rows' scores), ``threshold_``, ``labels_`` and ``predict(X)`` -> 0/1 from a ``contamination`` share
(Zhao, Nasrullah & Li, "PyOD: A Python Toolbox for Scalable Outlier Detection", JMLR 2019, ``BaseDetector``).
:class:`PyODFacade` supplies exactly that, once for every detector::

    from oodscope.pyod_facade import PyODFacade
    pyod_like = PyODFacade(oodscope.create("knn_distance"), contamination=0.05).fit(X_train)
    pyod_like.predict(X_test)            # 1 = outlier, 0 = inlier (PyOD's convention)
    LSCP([pyod_like, PyODFacade("iforest"), LOF()]).fit(X_train)

``threshold_`` follows oodscope's one threshold rule (:func:`oodscope.thresholds.threshold_for_contamination`):
the smallest training score with at least ``1 - contamination`` of the training scores at or below it; a row is an
outlier when its score is above. ``decision_scores_`` are the training rows scored like any other rows (for
neighbour methods a training row is its own nearest neighbour, where PyOD's KNN skips it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone

from .detectors import Detector, NotFittedError, create


class PyODFacade(BaseEstimator):
    """A fitted oodscope detector seen as a PyOD detector (see module docstring)."""

    def __init__(self, detector: Detector | str = "knn_distance", contamination: float = 0.1):
        self.detector = detector
        self.contamination = contamination

    def fit(self, X: Any, y: Any = None) -> "PyODFacade":
        """Fit a fresh copy of ``detector`` on ``X`` (``y`` is ignored, as in PyOD's unsupervised detectors)."""
        from .thresholds import flag, threshold_for_contamination

        if isinstance(self.detector, str):
            self.detector_ = create(self.detector)
        elif isinstance(self.detector, Detector):
            self.detector_ = clone(self.detector)
        else:
            raise ValueError(f"PyODFacade: detector must be a registered name or an oodscope Detector, got "
                             f"{type(self.detector).__name__}; PyOD detectors need no facade")
        self.detector_.fit(X)
        self.decision_scores_ = self.detector_.score(X)
        self.threshold_ = threshold_for_contamination(self.decision_scores_, self.contamination)
        self.labels_ = flag(self.decision_scores_, self.threshold_).astype(int)
        return self

    def _fitted(self) -> Detector:
        if not hasattr(self, "detector_"):
            raise NotFittedError("PyODFacade is not fitted: call fit(X) first")
        return self.detector_

    def decision_function(self, X: Any) -> np.ndarray:
        """Outlier scores of ``X``: the wrapped detector's ``score`` (higher = more anomalous)."""
        return self._fitted().score(X)

    def predict(self, X: Any) -> np.ndarray:
        """1 for outliers (score above ``threshold_``), 0 for inliers."""
        from .thresholds import flag

        return flag(self.decision_function(X), self.threshold_).astype(int)

    def predict_proba(self, X: Any) -> np.ndarray:
        """``(n, 2)`` inlier / outlier probabilities by PyOD's ``method="linear"``: the scores min-max scaled with
        the training scores' range, clipped to [0, 1]."""
        scores = self.decision_function(X)
        low, high = float(self.decision_scores_.min()), float(self.decision_scores_.max())
        outlier = np.clip((scores - low) / (high - low), 0.0, 1.0) if high > low else (scores > high).astype(float)
        return np.column_stack([1.0 - outlier, outlier])

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        """Fit on ``X`` and return its 0/1 labels (``labels_``)."""
        return self.fit(X, y).labels_
