"""Minimum others score (MOS): the OOD score of a group-softmax classifier.

Huang & Li, "MOS: Towards Scaling Out-of-distribution Detection for Large Semantic Space", CVPR 2021, Eq. 4: with
``p_k(others | x)`` the "others" probability of group ``k``'s softmax, the ID confidence is
``-min_k p_k(others | x)`` (an ID image has at least one group that claims it); the OOD score here is

    ``score(x) = min_k p_k(others | x)``.

The deployed model of :class:`oodscope.training.objectives.mos.MOS` records ``p_k(others | x)`` for every group in
its ``fc.others_probability`` layer. Stateless.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..extraction.outputs import Outputs
from .absent_class import LayerProbabilities

OTHERS_LAYER = "fc.others_probability"


class MinOthers(LayerProbabilities):
    """``score(x) = min_k p_k(others | x)`` over the groups (read from a layer)."""

    name = "min_others"

    def __init__(self, layers: Sequence[str] = (OTHERS_LAYER,)):
        super().__init__(layers)

    def _score(self, x: Outputs) -> np.ndarray:
        return self.probabilities(x).min(axis=1)
