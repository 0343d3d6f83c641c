"""The likelihood ratio ``LLR^{>k}`` of a hierarchical VAE.

Havtorn, Frellsen, Hauberg & Maaløe, "Hierarchical VAEs Know What They Don't Know", ICML 2021, Eq. 7:

    ``LLR^{>k}(x) = L(x) - L^{>k}(x)``

with ``L`` the ELBO and ``L^{>k}`` the bound in which the ``k`` lowest latents are drawn from the prior given the
higher ones (Eq. 6; :mod:`oodscope.generative.hvae`). The low latents model local, domain-general statistics that
make simple OOD images likely; ``L^{>k}`` keeps only what the high, semantic latents explain, so for an ID image
the two bounds are close and for an OOD image the full ELBO gains much more from the low latents: higher
``LLR^{>k}`` = more OOD. Both bounds are importance-weighted with the same ``samples`` draws (shared by every image,
seeded), in bits per dimension; ``k = 0`` gives exactly 0. The paper's CIFAR-10 model has 3 latent layers and
scores with ``k = 2`` (LLR^{>2}); ``k = 1`` is the default here because the CPU schedule's top layer carries
little information (see docs/generative.md for both).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import GenerativeDetector


class HVAELikelihoodRatio(GenerativeDetector):
    """``score(x) = (L(x) - L^{>k}(x)) / (D log 2)`` under a three-layer hierarchical VAE."""

    name = "hvae_llr"
    model = "hvae"

    def __init__(self, k: int = 1, samples: int = 8, hidden: int = 64, latent: int = 8, epochs: int = 3,
                 batch_size: int = 64, lr: float = 1e-3, seed: int = 0, device: str = "cpu"):
        self.k = k
        self.samples = samples
        self.hidden = hidden
        self.latent = latent
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        from .hvae import LAYERS

        self._check_training_params("hidden", "latent", "samples")
        if not (isinstance(self.k, (int, np.integer)) and 0 <= self.k <= LAYERS):
            raise ValueError(f"{self.name}: k (the latent layers drawn from the prior) must be an integer in "
                             f"0..{LAYERS}, got {self.k!r}")

    def _model_settings(self, perturb: float) -> dict[str, Any]:
        return {"model": "hvae", "hidden": int(self.hidden), "latent": int(self.latent), "epochs": int(self.epochs),
                "batch_size": int(self.batch_size), "lr": float(self.lr), "seed": int(self.seed)}

    def _fit(self, images: np.ndarray) -> None:
        if images.shape[2] % 8 or images.shape[3] % 8:
            raise ValueError(f"{self.name}: the hierarchical VAE halves the image three times; height and width "
                             f"must divide by 8, got {images.shape[2:]}")
        self.network_, self.training_ = self._density_model(images)

    def bounds(self, images: Any, ks: tuple[int, ...] | None = None) -> dict[int, np.ndarray]:
        """``{k: -L^{>k}(x) / (D log 2)}`` per image for each ``k`` in ``ks`` (default ``(0, self.k)``; ``k = 0`` is the
        importance-weighted ELBO), in bits/dim: lower = more likely. One pass computes them all."""
        from .base import as_uint8_images

        if not hasattr(self, "network_"):
            from ..detectors.base import NotFittedError

            raise NotFittedError(f"{self.name} is not fitted: call fit(train_images) first")
        return self._bounds(as_uint8_images(images, f"{self.name}: images"), ks or (0, int(self.k)))

    def _bounds(self, images: np.ndarray, ks: tuple[int, ...]) -> dict[int, np.ndarray]:
        import torch

        from .hvae import LAYERS, evaluation_noise, importance_bound

        ks = tuple(dict.fromkeys(int(k) for k in ks))  # once each (k = 0 both as the ELBO and as self.k)
        if any(not 0 <= k <= LAYERS for k in ks):
            raise ValueError(f"{self.name}: every k must be in 0..{LAYERS}, got {ks}")
        noise = evaluation_noise(self.network_, images.shape[1:], int(self.samples), int(self.seed))
        device = next(self.network_.parameters()).device
        noise = [layer.to(device) for layer in noise]
        to_bits = images[0].size * math.log(2.0)
        out: dict[int, list[np.ndarray]] = {k: [] for k in ks}
        self.network_.eval()
        with torch.no_grad():
            for begin in range(0, len(images), 256):
                batch = torch.from_numpy(np.ascontiguousarray(images[begin:begin + 256])).to(device)
                for k in ks:
                    out[k].append((-importance_bound(self.network_, batch, k, noise) / to_bits).cpu().numpy())
        bounds = {k: np.concatenate(parts) for k, parts in out.items()}
        for k, values in bounds.items():
            if not np.isfinite(values).all():
                raise FloatingPointError(f"{self.name}: the bound L^{{>{k}}} is not finite for "
                                         f"{int((~np.isfinite(values)).sum())} of {len(values)} images (a latent "
                                         "or pixel log-density overflowed); no score is returned for them")
        return bounds

    def _score(self, images: np.ndarray) -> np.ndarray:
        bounds = self._bounds(images, (0, int(self.k)))
        return bounds[int(self.k)] - bounds[0]  # (L - L^{>k}) / (D log 2): both are stored negated
