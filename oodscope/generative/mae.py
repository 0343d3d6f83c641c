"""A small masked autoencoder (MAE) on image patches: the encoder whose features MOODv2 scores.

He, Chen, Xie, Li, Dollár & Girshick, "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022: the image is
cut into ``p x p`` patches, a random ``mask_ratio`` (0.75) of them is removed per image, a ViT encoder sees only
the visible patches (plus fixed 2-D sine-cosine position embeddings), a light decoder gets the encoded visible
tokens and a shared learned mask token at every removed position, and the loss is the mean squared error of the
predicted pixels **on the removed patches only**, against per-patch normalised pixels (Sec. 3, "normalized pixels"
variant, the paper's default). At inference the encoder sees every patch; the image feature is the mean of its
output tokens (after the final layer norm).

Sizes here are small for CPU schedules: patch 4 on 32x32 (64 tokens), width 128, 4 encoder and 2 decoder blocks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def sincos_position_embedding(grid: int, width: int) -> torch.Tensor:
    """``(grid * grid, width)`` fixed 2-D sine-cosine embeddings (half the width per axis, MAE's ``get_2d_sincos``)."""
    if width % 4:
        raise ValueError(f"the embedding width must divide by 4, got {width}")
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for axis in (rows.flatten(), cols.flatten()):
        angles = axis[:, None] * frequencies[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, H W / p^2, p^2 C)`` patches in raster order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """The inverse of :func:`patchify` for square images."""
    n, tokens, _ = patches.shape
    grid = int(math.isqrt(tokens))
    x = patches.reshape(n, grid, grid, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, grid * patch, grid * patch)


def _blocks(width: int, depth: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class MaskedAutoencoder(nn.Module):
    """The MAE of the module docstring on square ``(channels, S, S)`` images with ``S`` divisible by ``patch``."""

    loss_name = "masked_mse"

    def __init__(self, channels: int = 3, image_size: int = 32, patch: int = 4, width: int = 128, depth: int = 4,
                 heads: int = 4, decoder_width: int = 64, decoder_depth: int = 2, mask_ratio: float = 0.75):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} does not divide into {patch}x{patch} patches")
        self.channels, self.patch, self.mask_ratio = channels, patch, mask_ratio
        grid = image_size // patch
        self.embed = nn.Linear(patch * patch * channels, width)
        self.register_buffer("position", sincos_position_embedding(grid, width))
        self.encoder = _blocks(width, depth, heads)
        self.norm = nn.LayerNorm(width)
        self.to_decoder = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_position", sincos_position_embedding(grid, decoder_width))
        self.decoder = _blocks(decoder_width, decoder_depth, max(1, heads // 2))
        self.decoder_norm = nn.LayerNorm(decoder_width)
        self.predict = nn.Linear(decoder_width, patch * patch * channels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the encoder's output tokens with every patch visible: ``(N, width)``."""
        tokens = self.embed(patchify(x, self.patch)) + self.position
        return self.norm(self.encoder(tokens)).mean(dim=1)

    def random_masking(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the indices of the kept patches ``(N, keep)`` and a 0/1 mask ``(N, L)`` (1 = removed)."""
        tokens = self.position.shape[0]
        keep = max(1, int(round(tokens * (1 - self.mask_ratio))))
        order = torch.argsort(torch.rand(n, tokens, generator=generator), dim=1)
        kept = order[:, :keep]
        removed = torch.ones(n, tokens)
        removed.scatter_(1, kept, 0.0)
        return kept, removed

    def reconstruct(self, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Predicted patches ``(N, L, p^2 C)`` from the patches at ``kept`` only."""
        patches = patchify(x, self.patch)
        tokens = self.embed(patches) + self.position
        index = kept.to(x.device)
        visible = torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[2]))
        encoded = self.to_decoder(self.norm(self.encoder(visible)))
        full = self.mask_token.expand(len(x), patches.shape[1], -1).clone()
        full = full.scatter(1, index[..., None].expand(-1, -1, full.shape[2]), encoded)
        return self.predict(self.decoder_norm(self.decoder(full + self.decoder_position)))

    def masked_loss(self, x: torch.Tensor, predicted: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
        """Per image: mean over removed patches of the MSE against per-patch normalised pixels."""
        target = patchify(x, self.patch)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (predicted - target).pow(2).mean(dim=-1)
        removed = removed.to(x.device)
        return (per_patch * removed).sum(dim=1) / removed.sum(dim=1)

    def training_loss(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      progress: float = 1.0) -> torch.Tensor:
        x = images.float() / 255.0
        kept, removed = self.random_masking(len(x), generator)
        return self.masked_loss(x, self.reconstruct(x, kept), removed)


def encode(model: MaskedAutoencoder, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """float64 ``(N, width)`` features of uint8 ``(N, C, H, W)`` images (no masking, no gradient)."""
    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.no_grad():
        for begin in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[begin:begin + batch_size])).to(device).float() / 255.0
            out.append(model.features(x).double().cpu().numpy())
    return np.concatenate(out)
