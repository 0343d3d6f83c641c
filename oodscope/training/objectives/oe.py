"""Outlier Exposure (OE).

Hendrycks, Mazeika & Dietterich, "Deep Anomaly Detection with Outlier Exposure", ICLR 2019, Eq. 1 with the
classification loss of Sec. 4.2.2: the ID cross-entropy plus ``lambda`` times the cross-entropy from the outliers'
softmax to the uniform distribution,

    ``L = E_in[-log p_y(x)] + lambda * E_out[-1/C sum_c log p_c(x')]``,  ``lambda = 0.5`` (vision experiments).

The authors' released code fine-tunes a pretrained CIFAR model for 10 epochs with SGD (momentum 0.9, Nesterov,
lr 0.001, weight decay 5e-4, cosine schedule), ID batches of 128 and outlier batches of 256. Scored with MSP.
"""

from __future__ import annotations

from ...extraction.outputs import Need
from ..objective import Objective, check_positive


class OutlierExposure(Objective):
    """``L = CE(f(x), y) + lambda * mean_c(-log softmax(f(x'))_c)`` over outliers ``x'``."""

    name = "oe"
    needs = frozenset({Need.LABELS, Need.OUTLIERS})
    score = "msp"

    def __init__(self, lam: float = 0.5):
        self.lam = lam

    def check_params(self) -> None:
        check_positive(self.name, "lam", self.lam)

    def loss(self, logits, labels, outlier_logits=None):
        from torch.nn import functional as F

        ce = F.cross_entropy(logits, labels)
        uniform = -outlier_logits.log_softmax(dim=1).mean(dim=1).mean()
        return ce + self.lam * uniform, {"ce": float(ce.detach()), "oe": float(uniform.detach())}
