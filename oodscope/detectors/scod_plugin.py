"""Plug-in SCOD rejector: one abstention score from classifier confidence and an OOD score.

Narasimhan, Menon, Jitkrittum & Kumar, "Plugin estimators for selective classification with out-of-distribution
detection", ICLR 2024. For the SCOD objective with costs ``c_in`` (rejecting an ID sample) and ``c_out``
(accepting an OOD sample), the Bayes-optimal rejector (Lemma 3.1) abstains when

    ``(1 - c_in - c_out) * (1 - max_y P_in(y|x)) + c_out * P_out(x) / P_in(x)  >  c_in``.

The black-box plug-in estimator (Sec. 4, "Plug-in BB") replaces ``max_y P_in(y|x)`` by the classifier's
confidence ``s_sc(x)`` (the maximum softmax probability) and the density ratio by a transform of an existing
OOD score. This detector returns the left-hand side as the rejection score (higher = abstain first):

    ``score(x) = (1 - c_in - c_out) * (1 - max_c softmax(f(x))_c) + c_out * exp(s_ood(x) - m)``,

where ``s_ood`` is the score of the oodscope detector named by ``ood`` (higher = more OOD, read as a
negative log density ratio ``-log P_in(x)/P_out(x)`` up to a constant, exact for the energy score with a flat
``P_out``) and ``m`` is its median on the fitting ID data. The unknown constant of the density ratio is absorbed
by ``c_out``: ``m`` only fixes the scale so that ``exp`` stays in range. Sweeping a threshold over the score
traces the SCOD risk-coverage curve (:func:`oodscope.metrics.scod.scod_auc_rc`).

Limits: ``c_out = 0`` gives Chow's rule (rank by MSP, pure selective classification); ``c_in + c_out -> 1``
ranks by the OOD score alone. Defaults ``c_in = 0``, ``c_out = 0.5`` weight the two terms equally; the costs
are application choices, so ``grid`` covers ``c_out``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import probabilities
from .base import Detector
from .registry import create, get


def plugin_score(confidence: np.ndarray, density_ratio: np.ndarray, c_in: float, c_out: float) -> np.ndarray:
    """Left-hand side of the Bayes rule (Lemma 3.1): abstain where it exceeds ``c_in``.

    ``confidence`` estimates ``max_y P_in(y|x)``, ``density_ratio`` estimates ``P_out(x) / P_in(x)``.
    """
    return (1.0 - c_in - c_out) * (1.0 - np.asarray(confidence)) + c_out * np.asarray(density_ratio)


class SCODPlugin(Detector):
    """``score(x) = (1 - c_in - c_out) (1 - MSP(x)) + c_out exp(s_ood(x) - median_ID s_ood)``."""

    name = "scod_plugin"
    needs = frozenset({Need.LOGITS})  # plus what the ``ood`` detector needs (it checks its own inputs)
    grid = {"c_out": [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9]}

    def __init__(self, ood: str = "energy", c_in: float = 0.0, c_out: float = 0.5,
                 ood_params: dict[str, Any] | None = None):
        self.ood = ood
        self.c_in = c_in
        self.c_out = c_out
        self.ood_params = ood_params

    def _check_params(self) -> None:
        for key in ("c_in", "c_out"):
            value = getattr(self, key)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"scod_plugin: {key} must be a cost >= 0, got {value}")
        if not self.c_in + self.c_out < 1:
            raise ValueError(f"scod_plugin: c_in + c_out must be < 1 (got {self.c_in} + {self.c_out}); "
                             "otherwise the confidence term has no weight")
        if not isinstance(self.ood, str) or self.ood == self.name:
            raise ValueError(f"scod_plugin: ood must name another registered detector, e.g. 'energy', got {self.ood!r}")
        get(self.ood)  # unknown names raise with suggestions

    def _fit(self, train: Outputs) -> None:
        self.ood_detector_ = create(self.ood, **(self.ood_params or {})).fit(train)
        self.ood_median_ = float(np.median(self.ood_detector_.score(train)))

    def _score(self, x: Outputs) -> np.ndarray:
        confidence = probabilities(x.logits).max(axis=1)
        ratio = np.exp(np.minimum(self.ood_detector_.score(x) - self.ood_median_, 700.0))
        return plugin_score(confidence, ratio, self.c_in, self.c_out)
