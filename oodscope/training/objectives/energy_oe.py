"""Energy-bounded fine-tuning with outliers.

Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020, Eq. 8-9: with the free energy
``E(x) = -logsumexp_c f_c(x)`` (temperature 1), the ID cross-entropy plus squared hinge losses that push ID
energies below ``m_in`` and outlier energies above ``m_out``,

    ``L = CE + lambda * (E_in[max(0, E(x) - m_in)^2] + E_out[max(0, m_out - E(x'))^2])``,

with the paper's CIFAR values ``m_in = -25``, ``m_out = -7``, ``lambda = 0.1``. Scored with the energy.
"""

from __future__ import annotations

from ...extraction.outputs import Need
from ..objective import Objective, check_positive


class EnergyOE(Objective):
    """``L = CE + lambda (mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2)``, ``E = -logsumexp(f)``."""

    name = "energy_oe"
    needs = frozenset({Need.LABELS, Need.OUTLIERS})
    score = "energy"

    def __init__(self, m_in: float = -25.0, m_out: float = -7.0, lam: float = 0.1):
        self.m_in = m_in
        self.m_out = m_out
        self.lam = lam

    def check_params(self) -> None:
        check_positive(self.name, "lam", self.lam)
        if not self.m_in < self.m_out:
            raise ValueError(f"{self.name}: m_in must be below m_out (ID energies are pushed lower), got "
                             f"m_in={self.m_in!r}, m_out={self.m_out!r}")

    def loss(self, logits, labels, outlier_logits=None):
        from torch.nn import functional as F

        ce = F.cross_entropy(logits, labels)
        energy_in = -logits.logsumexp(dim=1)
        energy_out = -outlier_logits.logsumexp(dim=1)
        hinge = F.relu(energy_in - self.m_in).pow(2).mean() + F.relu(self.m_out - energy_out).pow(2).mean()
        return ce + self.lam * hinge, {"ce": float(ce.detach()), "energy": float(hinge.detach())}
