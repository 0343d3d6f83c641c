"""MSMA: multiscale score matching, the norms of a score network's outputs as a feature vector.

Mahmood, Oliva & Styner, "Multiscale Score Matching for Out-of-Distribution Detection", ICLR 2021, Sec. 3-4: a
noise-conditional score network ``s(x, sigma)`` trained on the ID images by denoising score matching at ``L`` noise
levels (:mod:`oodscope.generative.score_network`; NCSN's geometric 1.0 to 0.01, ``L = 10``) maps an input to the
vector of weighted score norms (the authors' code, ``compute_weighted_scores``)

    ``v(x) = ( ||sigma_1 s(x, sigma_1)||_2, ..., ||sigma_L s(x, sigma_L)||_2 )``;

an auxiliary density model fitted on the ID training vectors scores an input by its negative log-likelihood.
The paper's GMM variant, as in the authors' code: the vectors are standardised, then a full-covariance Gaussian
mixture (scikit-learn's ``GaussianMixture``) is fitted with ``n_components`` chosen by 10-fold cross-validated
log-likelihood over 2, 4, ..., 20 (``n_components=None``, the default; their CIFAR-10 run chose 20) or fixed. A typical ID image sits where the smoothed density's gradient has the usual size at every
scale; an OOD image's gradients are too large at the small scales or too small at the large ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import GenerativeDetector


class MSMA(GenerativeDetector):
    """``score(x) = -log GMM(v(x))`` on the score norms ``v(x)`` at ``levels`` noise levels."""

    name = "msma"
    model = "ncsn"

    def __init__(self, levels: int = 10, sigma_max: float = 1.0, sigma_min: float = 0.01,
                 n_components: int | None = None,
                 hidden: int = 64, blocks: int = 2, epochs: int = 3, batch_size: int = 64, lr: float = 1e-3,
                 seed: int = 0, device: str = "cpu"):
        self.levels = levels
        self.sigma_max = sigma_max
        self.sigma_min = sigma_min
        self.n_components = n_components
        self.hidden = hidden
        self.blocks = blocks
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        if self.n_components is not None and not (isinstance(self.n_components, (int, np.integer))
                                                  and self.n_components >= 1):
            raise ValueError(f"{self.name}: n_components must be None (cross-validated) or an integer >= 1, got "
                             f"{self.n_components!r}")
        self._check_training_params("hidden", "blocks")
        if not (isinstance(self.levels, (int, np.integer)) and self.levels >= 2):
            raise ValueError(f"{self.name}: levels must be an integer >= 2, got {self.levels!r}")
        if not 0 < float(self.sigma_min) < float(self.sigma_max):
            raise ValueError(f"{self.name}: need 0 < sigma_min < sigma_max, got {self.sigma_min!r}, "
                             f"{self.sigma_max!r}")

    def _model_settings(self, perturb: float) -> dict[str, Any]:
        return {"model": "ncsn", "hidden": int(self.hidden), "blocks": int(self.blocks), "epochs": int(self.epochs),
                "batch_size": int(self.batch_size), "lr": float(self.lr), "seed": int(self.seed),
                "sigmas": (float(self.sigma_max), float(self.sigma_min), int(self.levels))}

    def _fit(self, images: np.ndarray) -> None:
        if images.shape[2] % 2 or images.shape[3] % 2:
            raise ValueError(f"{self.name}: the score network halves the image once; height and width must be "
                             f"even, got {images.shape[2:]}")
        least = 2 * (int(self.n_components) if self.n_components is not None else 20)
        if len(images) < least:
            raise ValueError(f"{self.name}: {len(images)} training images are too few for a GMM with "
                             f"{self.n_components or 'up to 20'} components (need at least {least})")
        self.network_, self.training_ = self._density_model(images)
        self.mixture_ = self._fit_mixture(self.score_norms(images))

    def _fit_mixture(self, features: np.ndarray):
        """StandardScaler + full-covariance GMM (components fixed, or by 10-fold CV log-likelihood over 2..20)."""
        from sklearn.mixture import GaussianMixture
        from sklearn.model_selection import GridSearchCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        def mixture(components: int):
            return make_pipeline(StandardScaler(), GaussianMixture(components, covariance_type="full",
                                                                   reg_covar=1e-6, random_state=int(self.seed)))
        if self.n_components is not None:
            return mixture(int(self.n_components)).fit(features)
        search = GridSearchCV(mixture(2), {"gaussianmixture__n_components": list(range(2, 21, 2))}, cv=10)
        return search.fit(features).best_estimator_

    def score_norms(self, images: np.ndarray) -> np.ndarray:
        """``(N, levels)`` score norms of uint8 ``(N, C, H, W)`` images."""
        from .score_network import score_norms

        return score_norms(self.network_, images)

    def _score(self, images: np.ndarray) -> np.ndarray:
        return -self.mixture_.score_samples(self.score_norms(images))
