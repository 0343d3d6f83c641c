"""Input complexity: the likelihood corrected by a lossless compressor's code length.

Serrà, Álvarez, Gómez, Slizovskaia, Núñez & Luque, "Input Complexity and Out-of-Distribution Detection with
Likelihood-based Generative Models", ICLR 2020, Eq. 2: ``S(x) = -l_M(x) - L(x)`` with ``l_M(x) = log2 p_M(x)`` the
model's log-likelihood in bits and ``L(x)`` the length in bits of ``x`` compressed by a generic lossless compressor
(the paper's PNG, JPEG2000 or FLIF; PNG here, Pillow's encoder at compression level 9). Simple images (constant
backgrounds, MNIST) compress well, which offsets their high likelihood. Per dimension:
``score(x) = bpd_M(x) - 8 len(png(x)) / D`` (higher = more OOD).
"""

from __future__ import annotations

import io

import numpy as np

from .base import GenerativeDetector


def png_bits_per_dim(images: np.ndarray) -> np.ndarray:
    """``8 len(PNG(x)) / D`` for each uint8 ``(N, C, H, W)`` image (PNG, compression level 9)."""
    from PIL import Image

    out = np.empty(len(images))
    for i, image in enumerate(images):  # one encoder call per image: the compressor is the statistic
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=9)
        out[i] = 8.0 * buffer.getbuffer().nbytes / image.size
    return out


class InputComplexity(GenerativeDetector):
    """``score(x) = bpd_M(x) - L_PNG(x) / D``."""

    name = "input_complexity"

    def _fit(self, images: np.ndarray) -> None:
        self.network_, self.training_ = self._density_model(images)

    def _score(self, images: np.ndarray) -> np.ndarray:
        return self._bits_per_dim(images) - png_bits_per_dim(images)
