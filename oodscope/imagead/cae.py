"""Convolutional-autoencoder reconstruction baseline with a feature-space comparison (gas pump PCBs).

Candido de Oliveira, Nassu & Wehrmeister, "Image-Based Detection of Modifications in Gas Pump PCBs with Deep
Convolutional Autoencoders" (arXiv 2210.00100; journal version "... in Assembled PCBs ...", Sensors 23(3) 1353,
2023), following the architecture and settings of the authors' published training/test notebooks:

* **Autoencoder.** Encoder: 7 convolutions, kernel 5, stride 2, "same" padding, batch norm, LeakyReLU(0.2), with
  32, 64, 128, 128, 256, 256, 256 channels (a ``S x S`` input becomes ``S/128 x S/128 x 256``); a dense
  bottleneck ``Dense(S/128 * S/128 * 256)``-BN-LReLU, ``Dense(500)``-LReLU (the latent code),
  ``Dense(S/128 * S/128 * 256)``-BN-LReLU; decoder: 6 transposed convolutions (kernel 5, stride 2, BN, LReLU)
  with 256, 256, 128, 128, 64, 32 channels and a last transposed convolution to 3 channels with a sigmoid.
* **Training** (denoising, anomaly-free images only): the input gets ``k ~ U{0, ..., 14}`` black "cutout"
  rectangles (sides ``U[10, 80)`` px at 256 px, scaled here to the input size) and the target is the clean image.
  Loss: ``lambda_mse * MSE(x_hat, x) + lambda_content * sum_l MSE(phi_l(x_hat), phi_l(x))`` with
  ``lambda_mse = 0.01``, ``lambda_content = 1`` and ``phi_l`` the outputs of four layers of an ImageNet network
  (the "content loss" of perceptual losses). Adam, learning rate ramped up to ``9e-4`` and decayed with a
  half cosine to ``1e-5``.
* **Comparison function and scores.** Anomaly map = ``sum_c |phi_c(x) - phi_c(x_hat)|`` at one higher-level
  layer (stride 8), upsampled bilinearly to the image; the authors min-max normalise it over the test set, an
  increasing affine map that leaves every ranking metric unchanged, so it is left out. An image is flagged at
  threshold ``t`` when more than ``min_pixels`` (10) map pixels exceed ``t``: the image score is therefore the
  ``(min_pixels + 1)``-th largest value of its map.

Substitutions, stated: the feature network is the ImageNet EfficientNet-Lite0 of this package instead of VGG-19
(no VGG weights ship here). VGG-19's loss layers (block2_conv2, block3_conv2, block4_conv2, block5_conv2, output
strides 2, 4, 8, 16) become the Lite0 stage ends at the same strides (``stage1``, ``stage2``, ``stage3``,
``stage5``) and the comparison layer (block4_conv1, stride 8) becomes ``stage3``; features are computed at
``feature_size`` (the notebooks use 224, VGG's input size; default here: the autoencoder's ``input_size``).
``width`` scales every channel count (1 = the paper's). The authors' loss squares the pixel values before the
MSE and divides each content term once more by the layer size; here both are plain mean squared errors. The
paper trains 1000 epochs of batch 64 at 256 px on a GPU; the CPU default is ``input_size`` 128 (same 7-level
architecture, 1 x 1 bottleneck), batch 16 and ``steps`` 100 (a few minutes on 2 idle cores): raise ``steps`` and
``input_size`` for the full schedule.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import ImageDetector, resolve_backbone

ENCODER = (32, 64, 128, 128, 256, 256, 256)
DECODER = (256, 256, 128, 128, 64, 32)


def _block(c_in: int, c_out: int, transpose: bool) -> nn.Sequential:
    if transpose:  # "same" transposed convolution, stride 2: output = 2 x input
        conv = nn.ConvTranspose2d(c_in, c_out, 5, stride=2, padding=2, output_padding=1)
    else:
        conv = nn.Conv2d(c_in, c_out, 5, stride=2, padding=2)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


class PCBAutoencoder(nn.Module):
    """The CAE of Candido de Oliveira et al. (see module docstring) for ``size x size`` RGB inputs in [0, 1]."""

    def __init__(self, size: int = 256, latent_dim: int = 500, width: float = 1.0):
        super().__init__()
        levels = len(ENCODER)
        if size % 2 ** levels:
            raise ValueError(f"cae: input_size must be a multiple of {2 ** levels} (7 stride-2 levels), got {size}")
        enc = tuple(max(1, round(c * width)) for c in ENCODER)
        dec = tuple(max(1, round(c * width)) for c in DECODER)
        self.grid, self.last = size // 2 ** levels, enc[-1]
        flat = self.grid * self.grid * enc[-1]
        channels = (3,) + enc
        self.encoder = nn.Sequential(*[_block(a, b, False) for a, b in zip(channels[:-1], channels[1:])])
        self.bottleneck = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, flat), nn.BatchNorm1d(flat), nn.LeakyReLU(0.2),
            nn.Linear(flat, latent_dim), nn.LeakyReLU(0.2),
            nn.Linear(latent_dim, flat), nn.BatchNorm1d(flat), nn.LeakyReLU(0.2))
        channels = (enc[-1],) + dec
        self.decoder = nn.Sequential(*[_block(a, b, True) for a, b in zip(channels[:-1], channels[1:])],
                                     nn.ConvTranspose2d(dec[-1], 3, 5, stride=2, padding=2, output_padding=1),
                                     nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.bottleneck(self.encoder(x))
        return self.decoder(z.view(len(x), self.last, self.grid, self.grid))


def cutout(x: torch.Tensor, generator: torch.Generator, max_count: int = 14,
           side_range: tuple[float, float] = (10 / 256, 80 / 256)) -> torch.Tensor:
    """Copies of ``x`` (N, C, H, W) with ``U{0..max_count}`` black rectangles each (sides a fraction of H, W)."""
    n, _, h, w = x.shape
    count = torch.randint(0, max_count + 1, (n,), generator=generator)
    slots = torch.arange(max_count)[None] < count[:, None]  # (N, K): which of K candidate boxes are used
    lo, hi = side_range
    sides = lo + (hi - lo) * torch.rand(n, max_count, 2, generator=generator)
    bh = (sides[..., 0] * h).long().clamp(min=1)
    bw = (sides[..., 1] * w).long().clamp(min=1)
    top = (torch.rand(n, max_count, generator=generator) * (h - bh + 1)).long()
    left = (torch.rand(n, max_count, generator=generator) * (w - bw + 1)).long()
    rows = torch.arange(h).view(1, 1, h, 1)
    cols = torch.arange(w).view(1, 1, 1, w)
    inside = ((rows >= top[..., None, None]) & (rows < (top + bh)[..., None, None])
              & (cols >= left[..., None, None]) & (cols < (left + bw)[..., None, None]) & slots[..., None, None])
    keep = ~inside.any(dim=1, keepdim=True)  # (N, 1, H, W), drawn on the CPU generator: the same boxes everywhere
    return x * keep.to(x.device)


class ConvAutoencoderAD(ImageDetector):
    """Reconstruction by a denoising CAE, feature-space comparison map (see module docstring)."""

    name = "cae"
    trains_network = True
    grid = {"steps": [100, 300, 1000]}

    def __init__(self, backbone="efficientnet_lite0", input_size: int = 128, latent_dim: int = 500,
                 steps: int = 100, batch_size: int = 16, lr: float = 9e-4, lr_min: float = 1e-5,
                 lambda_mse: float = 0.01, lambda_content: float = 1.0,
                 loss_layers: Sequence[str] = ("stage1", "stage2", "stage3", "stage5"),
                 compare_layer: str = "stage3", feature_size: int | None = None, min_pixels: int = 10,
                 cutout_max: int = 14, width: float = 1.0, seed: int = 0, device: str = "cpu"):
        self.backbone = backbone
        self.input_size = input_size
        self.latent_dim = latent_dim
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.lr_min = lr_min
        self.lambda_mse = lambda_mse
        self.lambda_content = lambda_content
        self.loss_layers = loss_layers
        self.compare_layer = compare_layer
        self.feature_size = feature_size
        self.min_pixels = min_pixels
        self.cutout_max = cutout_max
        self.width = width
        self.seed = seed
        self.device = device  # where the autoencoder and the feature network train and run

    def _check_params(self) -> None:
        for key in ("input_size", "latent_dim", "steps", "batch_size", "feature_size"):
            value = getattr(self, key)
            if key == "feature_size" and value is None:
                continue
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"cae: {key} must be a positive integer, got {value!r}")
        if self.input_size % 128:
            raise ValueError(f"cae: input_size must be a multiple of 128 (7 stride-2 levels), got {self.input_size}")
        if not 0 < self.lr_min <= self.lr:
            raise ValueError(f"cae: need 0 < lr_min <= lr, got lr={self.lr}, lr_min={self.lr_min}")
        if self.lambda_mse < 0 or self.lambda_content < 0 or self.lambda_mse + self.lambda_content == 0:
            raise ValueError("cae: lambda_mse and lambda_content must be >= 0 and not both 0")
        if not (isinstance(self.min_pixels, int) and self.min_pixels >= 0):
            raise ValueError(f"cae: min_pixels must be an integer >= 0, got {self.min_pixels!r}")
        if not self.width > 0:
            raise ValueError(f"cae: width (channel multiplier) must be > 0, got {self.width}")
        if not (isinstance(self.cutout_max, int) and self.cutout_max >= 0):
            raise ValueError(f"cae: cutout_max must be an integer >= 0, got {self.cutout_max!r}")

    def _features(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        side = self.feature_size or self.input_size
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        return self.backbone_.forward(x, layers)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)

    def learning_rate(self, step: int) -> float:
        """Linear ramp-up (first 0.3 % of the steps, the notebooks' 3 of 1000 epochs), then a half cosine."""
        ramp = max(1, round(0.003 * self.steps))
        if step < ramp:
            return self.lr_min + (self.lr - self.lr_min) * step / ramp
        progress = (step - ramp) / max(self.steps - ramp, 1)
        return max(self.lr_min, self.lr * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def _fit(self, images: np.ndarray) -> None:
        from ..extraction.extract import resolve_device

        device = resolve_device(self.device)
        self.backbone_ = resolve_backbone(self.backbone, device=str(device))
        if len(images) < 2:
            raise ValueError(f"cae: training needs at least 2 images (batch norm), got {len(images)}")
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            generator = torch.Generator().manual_seed(self.seed)
            model = PCBAutoencoder(self.input_size, self.latent_dim, self.width).to(device)
            data = self._resize(torch.from_numpy(images).to(device))
            optimiser = torch.optim.Adam(model.parameters(), lr=self.lr)
            self.losses_ = np.empty(self.steps)
            batch = min(self.batch_size, len(images))
            model.train()
            from tqdm.auto import tqdm

            bar = tqdm(range(self.steps), desc=self.name, unit="step", leave=False, disable=None)
            for step in bar:
                for group in optimiser.param_groups:
                    group["lr"] = self.learning_rate(step)
                clean = data[torch.randperm(len(data), generator=generator)[:batch].to(device)]
                noisy = cutout(clean, generator, self.cutout_max) if self.cutout_max else clean
                out = model(noisy)
                loss = self.lambda_mse * F.mse_loss(out, clean)
                if self.lambda_content:
                    with torch.no_grad():
                        target = self._features(clean, self.loss_layers)
                    pred = self._features(out, self.loss_layers)
                    loss = loss + self.lambda_content * sum(F.mse_loss(pred[k], target[k]) for k in target)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                self.losses_[step] = loss.item()
                bar.set_postfix(loss=f"{self.losses_[step]:.4g}", refresh=False)
        self.model_ = model.eval()
        for p in self.model_.parameters():
            p.requires_grad_(False)

    def _init_networks(self) -> None:
        """Re-create the networks (architecture only) for :func:`oodscope.persistence.load`."""
        from ..extraction.extract import resolve_device

        super()._init_networks()
        self.model_ = PCBAutoencoder(self.input_size, self.latent_dim, self.width).to(resolve_device(self.device))

    def _device(self) -> torch.device:
        return next(self.model_.parameters()).device

    def reconstruct(self, images) -> np.ndarray:
        """Reconstructions ``(N, 3, H, W)`` at the input resolution."""
        from .base import as_images

        x = as_images(images, "cae: images")
        out = []
        with torch.no_grad():
            for start in range(0, len(x), 32):
                batch = torch.from_numpy(x[start:start + 32]).to(self._device())
                rec = self.model_(self._resize(batch))
                out.append(F.interpolate(rec, size=batch.shape[2:], mode="bilinear", align_corners=False).cpu())
        return torch.cat(out).numpy()

    def _predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps = []
        with torch.no_grad():
            for start in range(0, len(images), 32):
                x = torch.from_numpy(images[start:start + 32]).to(self._device())
                # the reconstruction is brought back to the image size, then both go through the feature network
                rec = F.interpolate(self.model_(self._resize(x)), size=x.shape[2:], mode="bilinear",
                                    align_corners=False)
                fx = self._features(x, [self.compare_layer])[self.compare_layer]
                fr = self._features(rec, [self.compare_layer])[self.compare_layer]
                diff = (fx - fr).abs().sum(dim=1, keepdim=True)
                maps.append(F.interpolate(diff, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0].cpu())
        maps_t = torch.cat(maps).double()
        flat = maps_t.reshape(len(maps_t), -1)
        k = min(self.min_pixels + 1, flat.shape[1])
        scores = torch.topk(flat, k, dim=1).values[:, -1]
        return scores.numpy(), maps_t.numpy()
