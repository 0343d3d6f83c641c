"""Common corruptions for full-spectrum OOD detection: a covariate-shifted copy of the ID test set.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
ICLR 2019 (CIFAR-10-C). The corruptions below follow their CIFAR parameters (severity 1-5); they are
re-implemented with numpy/scipy/torch/PIL, nothing is downloaded:

* ``gaussian_noise``: ``x + N(0, c^2)`` on [0, 1], ``c = .04, .06, .08, .09, .10``;
* ``gaussian_blur``: Gaussian filter, ``sigma = .4, .6, .7, .8, 1`` pixels;
* ``defocus_blur``: convolution with an anti-aliased disk of radius ``r = .3, .4, .5, 1, 1.5`` (blur ``.4, .5,
  .6, .2, .1``);
* ``contrast``: ``(x - mean) c + mean`` per image, ``c = .75, .5, .4, .3, .15``;
* ``jpeg``: JPEG re-encoding at quality ``80, 65, 58, 50, 40``;
* ``pixelate``: box-downsampling by ``c = .95, .9, .85, .75, .65`` and nearest upsampling.

:func:`shifted_copy` gives every image one (corruption, severity) pair, cycling through all pairs in a fixed
order, with a fixed noise seed: the copy is identical on every run and machine (numpy's PCG64 stream).
Full-spectrum OOD detection (Yang et al., "Full-Spectrum Out-of-Distribution Detection", IJCV 2023) counts
these covariate-shifted images as in-distribution.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

SEVERITIES = (1, 3, 5)


def _as_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64) / 255.0


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    return _to_uint8(_as_float(images) + rng.normal(0.0, c, images.shape))


def gaussian_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1]
    return _to_uint8(gaussian_filter(_as_float(images), sigma=(0, sigma, sigma, 0), mode="reflect"))


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    extent = np.arange(-max(3, int(np.ceil(radius)) + 1), max(3, int(np.ceil(radius)) + 1) + 1)
    xx, yy = np.meshgrid(extent, extent)
    kernel = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float64)
    if kernel.sum() == 0:
        kernel[len(extent) // 2, len(extent) // 2] = 1.0
    kernel = gaussian_filter(kernel / kernel.sum(), alias_blur)
    return kernel / kernel.sum()


def defocus_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import convolve

    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))[severity - 1]
    kernel = _disk(radius, alias)[None, :, :, None]
    return _to_uint8(convolve(_as_float(images), kernel, mode="reflect"))


def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    x = _as_float(images)
    means = x.mean(axis=(1, 2, 3), keepdims=True)
    return _to_uint8((x - means) * c + means)


def jpeg(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    import io

    from PIL import Image

    quality = (80, 65, 58, 50, 40)[severity - 1]
    out = np.empty_like(images)
    for index, image in enumerate(images):  # the JPEG codec encodes one image at a time
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out[index] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def pixelate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    c = (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1]
    height, width = images.shape[1:3]
    x = torch.as_tensor(images).permute(0, 3, 1, 2).double()
    small = F.interpolate(x, size=(int(height * c), int(width * c)), mode="area")
    big = F.interpolate(small, size=(height, width), mode="nearest")
    return np.clip(np.rint(big.permute(0, 2, 3, 1).numpy()), 0, 255).astype(np.uint8)


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise, "gaussian_blur": gaussian_blur, "defocus_blur": defocus_blur,
    "contrast": contrast, "jpeg": jpeg, "pixelate": pixelate,
}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1-5) to uint8 N x H x W x 3 images."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"corruption severity must be 1-5, got {severity!r}")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"corruptions take uint8 N x H x W x 3 images, got {images.dtype} {images.shape}")
    return CORRUPTIONS[name](images, severity, np.random.default_rng(seed))


def shifted_copy(images: np.ndarray, corruptions: Sequence[str] = tuple(CORRUPTIONS),
                 severities: Sequence[int] = SEVERITIES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A covariate-shifted copy of ``images``: image ``i`` gets pair ``i mod P`` of (corruption, severity).

    Returns the corrupted images and the pair index of each image (``pairs()[index]`` names it).
    """
    combos = pairs(corruptions, severities)
    assignment = np.arange(len(images)) % len(combos)
    out = np.empty_like(np.asarray(images))
    for index, (name, severity) in enumerate(combos):  # one vectorised call per pair
        rows = np.flatnonzero(assignment == index)
        if rows.size:
            out[rows] = corrupt(images[rows], name, severity, seed=seed + index)
    return out, assignment


def pairs(corruptions: Sequence[str] = tuple(CORRUPTIONS), severities: Sequence[int] = SEVERITIES
          ) -> list[tuple[str, int]]:
    return [(name, severity) for name in corruptions for severity in severities]
