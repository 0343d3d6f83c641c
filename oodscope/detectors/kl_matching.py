"""KL-Matching.

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song, "Scaling Out-of-Distribution Detection for
Real-World Settings", ICML 2022, Sec. 4 (multi-class): for each class ``k`` a typical posterior ``d_k`` is the
mean softmax vector of the fitting samples that the model *predicts* as ``k`` (no labels are needed),

    ``d_k = E_{x'}[p(y|x') | argmax_y p(y|x') = k]``,

and the anomaly score is the divergence to the closest template, ``min_k KL[p(y|x) || d_k]``.
The paper computes the templates on held-out ID validation data; ``fit`` uses whatever ID data it is given
(fit on a validation split to follow the paper exactly). Classes that no fitting sample is predicted as have no
template and are left out of the minimum. The method has no hyperparameter.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

from ..extraction.outputs import Need, Outputs
from ._common import as_float64
from .base import Detector


class KLMatching(Detector):
    """``score(x) = min_k KL[softmax(f(x)) || d_k]``."""

    name = "kl_matching"
    needs = frozenset({Need.LOGITS})
    grid: dict = {}

    def _fit(self, train: Outputs) -> None:
        log_p = log_softmax(as_float64(train.logits), axis=1)
        predicted = log_p.argmax(axis=1)
        classes, counts = np.unique(predicted, return_counts=True)
        one_hot = (predicted[:, None] == classes[None, :]).astype(np.float64)
        self.classes_ = classes
        self.templates_ = (one_hot.T @ np.exp(log_p)) / counts[:, None]

    def _score(self, x: Outputs) -> np.ndarray:
        log_p = log_softmax(as_float64(x.logits), axis=1)
        p = np.exp(log_p)
        log_d = np.log(np.maximum(self.templates_, np.finfo(np.float64).tiny))
        kl = (p * log_p).sum(axis=1, keepdims=True) - p @ log_d.T
        return kl.min(axis=1)
