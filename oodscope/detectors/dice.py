"""DICE: directed sparsification of the classifier head.

Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV 2022, Sec. 3.
With ``m`` the mean penultimate feature of the ID training data, the contribution matrix is
``V = m ⊙ W`` (``V_cj = m_j W_cj``, the expected contribution of unit ``j`` to class ``c``). The weights whose
contribution is in the top ``(100 - p)`` % are kept, the rest zeroed: ``M = 1[V > percentile_p(V)]``, and the
OOD score is the energy of the sparsified head ``(M ⊙ W) h(x) + b`` (Eq. 2-3). Default sparsity ``p = 90``
(the paper's CIFAR setting).
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Head, Need, Outputs
from ._common import as_float64
from ._shaping import check_percentile, head_energy
from .base import Detector


class DICE(Detector):
    """``score(x) = -logsumexp((M ⊙ W) h(x) + b)``; ``M`` keeps the top ``100 - sparsity`` % contributions."""

    name = "dice"
    needs = frozenset({Need.FEATURES, Need.HEAD})
    grid = {"sparsity": [10, 30, 50, 70, 90]}

    def __init__(self, sparsity: float = 90):
        self.sparsity = sparsity

    def _check_params(self) -> None:
        check_percentile(self.name, "sparsity", self.sparsity)

    def _fit(self, train: Outputs) -> None:
        W = as_float64(train.head.W)
        contribution = as_float64(train.features).mean(axis=0)[None, :] * W
        self.contribution_cut_ = float(np.percentile(contribution, self.sparsity))
        self.mask_ = contribution > self.contribution_cut_
        self.head_ = Head(np.where(self.mask_, W, 0.0), as_float64(train.head.b))

    def _score(self, x: Outputs) -> np.ndarray:
        if x.head.W.shape != self.head_.W.shape:
            raise ValueError(f"dice: head of {x.name!r} has shape {x.head.W.shape}, but the detector was fitted "
                             f"with a head of shape {self.head_.W.shape}; fit and score with the same model")
        return head_energy(x.features, self.head_)
