"""LogitNorm: cross-entropy on normalised logits.

Wei, Xie, Cheng, Feng, An & Li, "Mitigating Neural Network Overconfidence with Logit Normalization", ICML 2022,
Eq. 6: ``L = CE(f(x) / (tau * ||f(x)||), y)``, the logit vector scaled to norm ``1 / tau`` so that training cannot
lower the loss by growing the logits' norm; ``tau = 0.04`` for CIFAR-10 (Sec. 4, Table 7). The authors' code adds
``1e-7`` to the norm. No outliers are needed; the fine-tuned model is scored with MSP on its raw logits.
"""

from __future__ import annotations

from ..objective import Objective, check_positive


class LogitNorm(Objective):
    """``L = CE(f / (tau (||f|| + 1e-7)), y)``."""

    name = "logitnorm"
    score = "msp"

    def __init__(self, tau: float = 0.04):
        self.tau = tau

    def check_params(self) -> None:
        check_positive(self.name, "tau", self.tau)

    def loss(self, logits, labels, outlier_logits=None):
        from torch.nn import functional as F

        norms = logits.norm(p=2, dim=1, keepdim=True) + 1e-7
        ce = F.cross_entropy(logits / (norms * self.tau), labels)
        return ce, {"logitnorm_ce": float(ce.detach())}
