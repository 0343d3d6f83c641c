"""Batch preprocessing applied on the device during extraction, with stable cache keys."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ImageNormalize(nn.Module):
    """uint8 (or [0, 1] float) image batches to normalised float NCHW: ``(x / 255 - mean) / std``.

    ``channels_last=True`` takes ``N x H x W x C`` arrays (the ``.npz`` layout) and permutes them.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = True,
                 scale: float = 255.0):
        super().__init__()
        self.channels_last, self.scale = channels_last, scale
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def cache_key(self) -> str:
        return (f"ImageNormalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, "
                f"channels_last={self.channels_last}, scale={self.scale})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.unsqueeze(1)
        return (x.float() / self.scale - self.mean) / self.std
