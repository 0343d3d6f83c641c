"""Negative log-likelihood of a PixelCNN (bits per dimension) as the OOD score.

The baseline of density-based OOD detection: ``score(x) = -log2 p(x) / D`` under a PixelCNN trained on the ID
images (:mod:`oodscope.generative.pixelcnn`). Nalisnick et al., "Do Deep Generative Models Know What They Don't
Know?", ICLR 2019, showed its failure: models trained on CIFAR-10 give *higher* likelihood to SVHN (and MNIST-like
simple images), so this score ranks them as more in-distribution.
"""

from __future__ import annotations

import numpy as np

from .base import GenerativeDetector


class PixelCNNNLL(GenerativeDetector):
    """``score(x) = -log2 p(x) / D`` (bits/dim)."""

    name = "pixelcnn_nll"

    def _fit(self, images: np.ndarray) -> None:
        self.network_, self.training_ = self._density_model(images)

    def _score(self, images: np.ndarray) -> np.ndarray:
        return self._bits_per_dim(images)
