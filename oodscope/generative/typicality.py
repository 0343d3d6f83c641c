"""Typicality test: distance of the likelihood from the typical set's.

Nalisnick, Matsukawa, Teh & Lakshminarayanan, "Detecting Out-of-Distribution Inputs to Deep Generative Models
Using Typicality", arXiv 1906.02994 (2019), Eq. 4: a batch is OOD when its mean negative log-likelihood is far from
the model's entropy ``H``, estimated by the mean NLL of ID data; for one input (batch size ``M = 1``)

    ``score(x) = | bpd(x) - mean_{x' in ID} bpd(x') |``.

Both tails count: inputs *more* likely than typical ID images (SVHN, MNIST under a CIFAR-10 model) are flagged too.
The entropy is estimated on the training images here (the paper uses held-out ID data).
"""

from __future__ import annotations

import numpy as np

from .base import GenerativeDetector


def typicality_score(nll: np.ndarray, entropy: float) -> np.ndarray:
    """``|nll(x) - H|``: Eq. 4 for a batch of one, in the units of ``nll`` and ``H``."""
    return np.abs(np.asarray(nll, dtype=np.float64) - float(entropy))


class Typicality(GenerativeDetector):
    """``score(x) = |bpd(x) - H|``, ``H`` the mean bits/dim of the ID training images."""

    name = "typicality"

    def _fit(self, images: np.ndarray) -> None:
        self.network_, self.training_ = self._density_model(images)
        self.entropy_ = float(np.mean(self._bits_per_dim(images)))

    def _score(self, images: np.ndarray) -> np.ndarray:
        return typicality_score(self._bits_per_dim(images), self.entropy_)
