"""The shared part of the detectors that run the small DDPM (:mod:`oodscope.generative.ddpm`): LMD and DiffGuard.

Both train one unconditional DDPM on the ID images with the family's trainer (seeded, resumable, progress bar,
NaN-loss stop) and share it: fitted on the same images with the same network settings (``hidden``, ``blocks``,
``diffusion_steps``, ``epochs``, ``batch_size``, ``lr``, ``seed``), the second detector reuses the first one's
network. Scoring runs the network on ``device``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import GenerativeDetector


class DiffusionDetector(GenerativeDetector):
    """Base of the DDPM detectors: the network's settings, checks and fit."""

    model = "ddpm"

    def _check_diffusion_params(self, *sizes: str) -> None:
        self._check_training_params("hidden", "blocks", "diffusion_steps", *sizes)
        if self.hidden < 2:
            raise ValueError(f"{self.name}: hidden must be at least 2 (the sinusoidal step embedding), got "
                             f"{self.hidden!r}")

    def _model_settings(self, perturb: float) -> dict[str, Any]:
        return {"model": "ddpm", "hidden": int(self.hidden), "blocks": int(self.blocks),
                "diffusion_steps": int(self.diffusion_steps), "epochs": int(self.epochs),
                "batch_size": int(self.batch_size), "lr": float(self.lr), "seed": int(self.seed)}

    def _fit_network(self, images: np.ndarray) -> None:
        if images.shape[2] % 4 or images.shape[3] % 4:
            raise ValueError(f"{self.name}: the DDPM's U-Net halves the image twice; height and width must divide "
                             f"by 4, got {images.shape[2:]}")
        self.network_, self.training_ = self._density_model(images)

    def _network_on_device(self):
        """The trained network on ``device`` (in eval mode) and that device."""
        from ..extraction.extract import resolve_device

        target = resolve_device(self.device)
        return self.network_.to(target).eval(), target

    def diffusion_loss(self, images: Any) -> np.ndarray:
        """The DDPM's simple loss (Ho et al. Eq. 14) of each image, over 10 fixed (step, noise) pairs: the model's
        quality on held-out ID images (:func:`oodscope.generative.ddpm.evaluation_loss`)."""
        from .base import as_uint8_images
        from .ddpm import evaluation_loss

        if not hasattr(self, "network_"):
            from ..detectors.base import NotFittedError

            raise NotFittedError(f"{self.name} is not fitted: call fit(train_images) first")
        self._network_on_device()
        return evaluation_loss(self.network_, as_uint8_images(images, f"{self.name}: images"), int(self.seed))
