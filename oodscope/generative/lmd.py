"""LMD (Lift, Map, Detect): inpaint masked parts of the input with a diffusion model of the ID data, score by the
reconstruction distance.

Liu, Zhou, Wang & Weinberger, "Unsupervised Out-of-distribution Detection with Diffusion Inpainting", ICML 2023,
Sec. 3 and Algorithm 1: an image is *lifted* off its manifold by masking part of it, *mapped* back towards the ID
manifold by a diffusion model trained on the ID images that inpaints the masked part, and an OOD image, whose
inpainting follows the ID manifold, ends far from where it started. For each of ``attempts`` masks the distance
between the image and its inpainting is measured, and the score is their median (the authors' ``detect.py``:
``agg_fn = np.median``). Defaults from the authors' README command for CIFAR-10: the alternating checkerboard
(``mask="checkerboard_alt"``: attempt ``j`` uses the checkerboard of ``mask_blocks = 8`` blocks per side, its
inverse when ``j`` is odd; ``mask_utils.get_checkerboard_mask``), ``attempts = 10``.

Where this differs from the authors' code, and why:

* **The distance is the mean squared error** of the [0, 1] images (``distance="mse"``, one of the metrics of their
  ``detect.py``). The paper's default, LPIPS, needs AlexNet weights that must be downloaded, which nothing here may
  do.
* **The diffusion model** is the small DDPM of :mod:`oodscope.generative.ddpm` (Ho et al. 2020, linear betas,
  ``T = 1000``, about 1M parameters at ``hidden=32``), not their sub-VP SDE on Ho et al.'s 35.7M-parameter
  CIFAR-10 U-Net (for CIFAR-10, Song et al.'s pretrained checkpoint).
* **The inpainter** is strided ancestral sampling with ``sampling_steps`` (default 50) DDPM steps on the respaced
  chain, replacing the known region after every step by the input noised to that step (RePaint's rule, which the
  authors' ``get_pc_inpainter`` applies to their SDE's 1,000 Euler-Maruyama steps). Ancestral sampling is the
  discrete form of the stochastic reverse process they integrate; 50 instead of 1,000 steps because every step is
  one U-Net pass per image and mask on the CPU.

The noise of each attempt is drawn from ``seed`` and the attempt's index, one draw per step shared by every image
(so an image's score depends on the image alone).
"""

from __future__ import annotations

import numpy as np

from ._diffusion import DiffusionDetector

MASKS = ("checkerboard_alt", "checkerboard", "center")
DISTANCES = ("mse",)


def checkerboard_mask(height: int, width: int, blocks: int, inverted: bool = False) -> np.ndarray:
    """``(H, W)`` 0/1 mask (1 = known) of ``blocks x blocks`` squares; the top-left block is known unless
    ``inverted`` (the authors' ``get_checkerboard_mask``)."""
    if height % blocks or width % blocks:
        raise ValueError(f"a checkerboard of {blocks} blocks per side needs height and width divisible by "
                         f"{blocks}, got {height}x{width}; pass mask_blocks dividing the image size")
    rows, cols = np.indices((blocks, blocks))
    known = ((rows + cols) % 2 == (1 if inverted else 0)).astype(np.float32)
    return np.repeat(np.repeat(known, height // blocks, axis=0), width // blocks, axis=1)


def center_mask(height: int, width: int) -> np.ndarray:
    """``(H, W)`` mask with the central square ``[H/4, 3H/4) x [W/4, 3W/4)`` unknown (the authors' ``center``)."""
    mask = np.ones((height, width), np.float32)
    mask[height // 4:height * 3 // 4, width // 4:width * 3 // 4] = 0.0
    return mask


class LMD(DiffusionDetector):
    """``score(x) = median_j d(x, inpaint(x, m_j))`` over ``attempts`` masks ``m_j``."""

    name = "lmd"

    def __init__(self, attempts: int = 10, mask: str = "checkerboard_alt", mask_blocks: int = 8,
                 sampling_steps: int = 50, distance: str = "mse", hidden: int = 32, blocks: int = 1,
                 diffusion_steps: int = 1000, epochs: int = 3, batch_size: int = 64, lr: float = 1e-3,
                 seed: int = 0, device: str = "cpu"):
        self.attempts = attempts
        self.mask = mask
        self.mask_blocks = mask_blocks
        self.sampling_steps = sampling_steps
        self.distance = distance
        self.hidden = hidden
        self.blocks = blocks
        self.diffusion_steps = diffusion_steps
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        self._check_diffusion_params("attempts", "mask_blocks", "sampling_steps")
        if self.mask not in MASKS:
            raise ValueError(f"{self.name}: mask must be one of {', '.join(MASKS)}, got {self.mask!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"{self.name}: distance must be one of {', '.join(DISTANCES)} (LPIPS needs weights "
                             f"that are downloaded), got {self.distance!r}")
        if self.sampling_steps > self.diffusion_steps:
            raise ValueError(f"{self.name}: sampling_steps ({self.sampling_steps}) cannot exceed diffusion_steps "
                             f"({self.diffusion_steps})")

    def masks(self, height: int, width: int) -> np.ndarray:
        """The ``(attempts, H, W)`` masks, 1 = known pixel, 0 = inpainted."""
        if self.mask == "center":
            return np.stack([center_mask(height, width)] * int(self.attempts))
        blocks = int(self.mask_blocks)
        return np.stack([checkerboard_mask(height, width, blocks, self.mask == "checkerboard_alt" and j % 2 == 1)
                         for j in range(int(self.attempts))])

    def _fit(self, images: np.ndarray) -> None:
        self.masks(*images.shape[2:])  # a mask that does not fit the images is refused before training
        self._fit_network(images)

    def inpaint(self, images, mask: np.ndarray, attempt: int = 0) -> np.ndarray:
        """Inpaintings in [0, 1], float32 ``(N, C, H, W)``, of images (uint8 ``NHWC``/``NCHW`` or floats on the 1/255
        grid) where ``mask`` (``(H, W)``, 1 = known) is 0, with the noise of ``attempt``. Known pixels come back
        exactly (as ``(x * 2 / 255 - 1 + 1) / 2`` in float32)."""
        from ..detectors.base import NotFittedError
        from .base import as_uint8_images

        if not hasattr(self, "network_"):
            raise NotFittedError(f"{self.name} is not fitted: call fit(train_images) first")
        images = as_uint8_images(images, f"{self.name}: images")
        mask = np.asarray(mask, np.float32)
        if mask.shape != images.shape[2:] or not np.isin(mask, (0.0, 1.0)).all():
            raise ValueError(f"{self.name}: mask must be a 0/1 array of the image size {images.shape[2:]}, got "
                             f"shape {mask.shape}")
        return self._inpaint(images, mask, attempt)

    def _inpaint(self, images: np.ndarray, mask: np.ndarray, attempt: int) -> np.ndarray:
        import torch

        from .ddpm import inpaint, to_model_range

        network, target = self._network_on_device()
        mask_t = torch.from_numpy(mask)[None, None]
        out = []
        with torch.no_grad():
            for begin in range(0, len(images), 64):
                x0 = to_model_range(torch.from_numpy(np.ascontiguousarray(images[begin:begin + 64]))).to(target)
                generator = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(attempt) + 1)
                filled = inpaint(network, x0, mask_t, int(self.sampling_steps), generator)
                out.append(((filled + 1.0) / 2.0).float().cpu().numpy())
        return np.concatenate(out)

    def distances(self, images: np.ndarray) -> np.ndarray:
        """``(N, attempts)`` mean squared errors between each uint8 ``(N, C, H, W)`` image, in [0, 1], and its
        inpainting under each mask."""
        from tqdm.auto import tqdm

        x = (images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0) + np.float32(1.0)) / np.float32(2.0)
        masks = self.masks(*images.shape[2:])
        bar = tqdm(masks, desc=f"{self.name} masks", leave=False, disable=None)  # off when not a terminal
        columns = [np.mean((self._inpaint(images, mask, j) - x).astype(np.float64) ** 2, axis=(1, 2, 3))
                   for j, mask in enumerate(bar)]
        return np.stack(columns, axis=1)

    def _score(self, images: np.ndarray) -> np.ndarray:
        return np.median(self.distances(images), axis=1)
