"""ASH: activation shaping (ASH-P, ASH-B, ASH-S).

Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for Out-of-Distribution Detection",
ICLR 2023, Sec. 3 / Algorithm 1. Per sample, the activations ``a`` of the penultimate layer are pruned: every
value below the sample's own ``p``-th percentile is set to zero, keeping the top ``k = D - round(D p / 100)``.
The kept values are then

* **ASH-P**: left unchanged;
* **ASH-B**: all replaced by ``s1 / k`` with ``s1 = sum(a)`` (binarised, total preserved);
* **ASH-S**: multiplied by ``exp(s1 / s2)`` with ``s2`` the sum of the kept values (sharpened).

The shaped features go through the rest of the network (here the linear head) and the energy of the logits is
the OOD score. No statistics of training data are needed. Default ``p = 90``: the pruning level the paper
leads with ("a large portion (e.g. 90%) of a sample's activation ... is removed") and uses in its CIFAR
experiments; its ImageNet ResNet-50 table also reports ASH-P@60 and ASH-B@65.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import as_float64
from ._shaping import check_percentile, head_energy, n_kept, sum_ratio, top_k_mask
from .base import Detector


class _ASH(Detector):
    needs = frozenset({Need.FEATURES, Need.HEAD})
    grid = {"percentile": [65, 70, 75, 80, 85, 90, 95]}

    def __init__(self, percentile: float = 90):
        self.percentile = percentile

    def _check_params(self) -> None:
        check_percentile(self.name, "percentile", self.percentile)

    def _shape(self, a: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
        raise NotImplementedError

    def _score(self, x: Outputs) -> np.ndarray:
        a = as_float64(x.features)
        k = n_kept(a.shape[1], self.percentile)
        return head_energy(self._shape(a, top_k_mask(a, k), k), x.head)


class ASHP(_ASH):
    """ASH-P: prune all but the top ``k`` activations."""

    name = "ash_p"

    def _shape(self, a: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
        return np.where(keep, a, 0.0)


class ASHB(_ASH):
    """ASH-B: the kept activations all become ``sum(a) / k``."""

    name = "ash_b"

    def _shape(self, a: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
        return np.where(keep, a.sum(axis=1, keepdims=True) / k, 0.0)


class ASHS(_ASH):
    """ASH-S: prune, then scale the kept activations by ``exp(s1 / s2)``."""

    name = "ash_s"

    def _shape(self, a: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
        return np.where(keep, a, 0.0) * np.exp(sum_ratio(a, k))[:, None]
