"""Outlier probability of a binary ID-vs-outlier unit: the OOD score of SAL's fine-tuned classifier.

Du, Fang, Guo & Li, "How Does Unlabeled Data Provably Help Out-of-Distribution Detection?" (SAL), ICLR 2024: after
filtering candidate outliers from wild data, a binary classifier ``g`` (a logistic unit on the penultimate
features) is trained to tell ID (1) from the candidates (0); ``g``'s output is the ID confidence. The OOD score here
is

    ``score(x) = sigmoid(-s(x))``, the probability the unit gives to "outlier".

The deployed model of :class:`oodscope.training.objectives.sal.SAL` records it in its ``fc.ood_probability``
layer (``extract(model, x, layers=["fc.ood_probability"])``); name another layer with ``layers=[...]``. Stateless.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..extraction.outputs import Outputs
from .absent_class import LayerProbabilities

OOD_PROBABILITY_LAYER = "fc.ood_probability"


class OODProbability(LayerProbabilities):
    """``score(x) = sigmoid(-s(x))``, a binary unit's outlier probability (read from a layer)."""

    name = "ood_probability"
    columns = 1

    def __init__(self, layers: Sequence[str] = (OOD_PROBABILITY_LAYER,)):
        super().__init__(layers)

    def _score(self, x: Outputs) -> np.ndarray:
        return self.probabilities(x)[:, 0]
