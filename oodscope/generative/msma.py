"""MSMA: multiscale score matching, the norms of a score network's outputs as a feature vector.

Mahmood, Oliva & Styner, "Multiscale Score Matching for Out-of-Distribution Detection", ICLR 2021, Sec. 3-4: a
noise-conditional score network ``s(x, sigma)`` trained on the ID images by denoising score matching at ``L`` noise
levels (:mod:`oodscope.generative.score_network`; NCSN's geometric 1.0 to 0.01, ``L = 10``) maps an input to the
vector of score norms

    ``v(x) = ( ||s(x, sigma_1)||_2, ..., ||s(x, sigma_L)||_2 )``;

an auxiliary density model fitted on the ID training vectors scores an input by its negative log-likelihood
(the paper's GMM variant: a Gaussian mixture, full covariances, here ``n_components = 5`` by default, scikit-learn's
``GaussianMixture``). A typical ID image sits where the smoothed density's gradient has the usual size at every
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

    def __init__(self, levels: int = 10, sigma_max: float = 1.0, sigma_min: float = 0.01, n_components: int = 5,
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
        for name in ("hidden", "blocks", "epochs", "batch_size", "n_components"):
            value = getattr(self, name)
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                raise ValueError(f"{self.name}: {name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.levels, (int, np.integer)) and self.levels >= 2):
            raise ValueError(f"{self.name}: levels must be an integer >= 2, got {self.levels!r}")
        if not 0 < float(self.sigma_min) < float(self.sigma_max):
            raise ValueError(f"{self.name}: need 0 < sigma_min < sigma_max, got {self.sigma_min!r}, "
                             f"{self.sigma_max!r}")
        if not float(self.lr) > 0:
            raise ValueError(f"{self.name}: lr must be > 0, got {self.lr!r}")

    def _model_settings(self, perturb: float) -> dict[str, Any]:
        return {"model": "ncsn", "hidden": int(self.hidden), "blocks": int(self.blocks), "epochs": int(self.epochs),
                "batch_size": int(self.batch_size), "lr": float(self.lr), "seed": int(self.seed),
                "sigmas": (float(self.sigma_max), float(self.sigma_min), int(self.levels))}

    def _fit(self, images: np.ndarray) -> None:
        from sklearn.mixture import GaussianMixture

        if images.shape[2] % 2 or images.shape[3] % 2:
            raise ValueError(f"{self.name}: the score network halves the image once; height and width must be "
                             f"even, got {images.shape[2:]}")
        if len(images) < 2 * int(self.n_components):
            raise ValueError(f"{self.name}: {len(images)} training images are too few for a GMM with "
                             f"{self.n_components} components (need at least {2 * int(self.n_components)})")
        self.network_, self.training_ = self._density_model(images)
        features = self.score_norms(images)
        self.mixture_ = GaussianMixture(int(self.n_components), covariance_type="full", reg_covar=1e-6,
                                        random_state=int(self.seed)).fit(features)

    def score_norms(self, images: np.ndarray) -> np.ndarray:
        """``(N, levels)`` score norms of uint8 ``(N, C, H, W)`` images."""
        from .score_network import score_norms

        return score_norms(self.network_, images)

    def _score(self, images: np.ndarray) -> np.ndarray:
        return -self.mixture_.score_samples(self.score_norms(images))
