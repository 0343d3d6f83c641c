"""Likelihood ratio with a background model trained on perturbed inputs.

Ren, Liu, Fertig, Snoek, Poplin, DePristo, Dillon & Lakshminarayanan, "Likelihood Ratios for Out-of-Distribution
Detection", NeurIPS 2019, Eq. 5: ``LLR(x) = log p_theta(x) - log p_theta0(x)``, where ``p_theta0`` is the same model
trained on the ID images perturbed by replacing each value with a uniform random one with probability ``mu``
(Sec. 3: the background model learns the population-level statistics, such as the share of constant background, so
the ratio cancels them). ``mu`` in [0.1, 0.2] in the paper's image experiments; here ``perturb = 0.2``. The OOD
score is ``-LLR`` in bits per dimension: ``bpd_theta(x) - bpd_theta0(x)``. (The paper also adds L2 regularisation
to the background model; not done here.)
"""

from __future__ import annotations

import numpy as np

from .base import GenerativeDetector


class LikelihoodRatio(GenerativeDetector):
    """``score(x) = bpd_theta(x) - bpd_theta0(x)`` with ``theta0`` trained on perturbed images."""

    name = "likelihood_ratio"

    def __init__(self, perturb: float = 0.2, model: str = "pixelcnn", hidden: int = 64, blocks: int = 5,
                 epochs: int = 3, batch_size: int = 64, lr: float = 1e-3, seed: int = 0, device: str = "cpu"):
        super().__init__(model=model, hidden=hidden, blocks=blocks, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                         device=device)
        self.perturb = perturb

    def _check_params(self) -> None:
        super()._check_params()
        if not 0.0 < float(self.perturb) < 1.0:
            raise ValueError(f"{self.name}: perturb (the replacement probability mu) must lie in (0, 1), got "
                             f"{self.perturb!r}")

    def _fit(self, images: np.ndarray) -> None:
        self.network_, self.training_ = self._density_model(images)
        self.background_, self.background_training_ = self._density_model(images, perturb=float(self.perturb))

    def _score(self, images: np.ndarray) -> np.ndarray:
        return self._bits_per_dim(images) - self._bits_per_dim(images, self.background_)
