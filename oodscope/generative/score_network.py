"""A small noise-conditional score network trained by denoising score matching.

Song & Ermon, "Generative Modeling by Estimating Gradients of the Data Distribution", NeurIPS 2019 (NCSN): a
network ``s(x, sigma)`` estimates the score ``grad_x log q_sigma(x)`` of the data convolved with ``N(0, sigma^2 I)``
at ``L`` noise levels ``sigma_1 > ... > sigma_L`` (a geometric sequence; 1.0 to 0.01 for CIFAR-10, Sec. 5). Its
objective (Eq. 5-6) with the weight ``lambda(sigma) = sigma^2`` is, per sample with a random level,

    ``1/2 || sigma s(x + sigma z, sigma) + z ||^2``,  ``z ~ N(0, I)``

(denoising score matching: the score of ``N(x, sigma^2 I)`` at ``x + sigma z`` is ``-z / sigma``). Images are scaled
to [0, 1] as in the paper. The network here is a small U-Net (one down- and one up-sampling stage, residual
blocks) whose blocks are conditioned on the level by a learned per-channel scale and shift of ``log sigma``'s
embedding, instead of NCSN's RefineNet with conditional instance normalisation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def geometric_sigmas(sigma_max: float, sigma_min: float, levels: int) -> torch.Tensor:
    """``levels`` noise levels from ``sigma_max`` down to ``sigma_min``, geometric (NCSN Sec. 5)."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), levels))


class _ConditionalBlock(nn.Module):
    """Residual block whose hidden activations are scaled and shifted by an embedding of the noise level."""

    def __init__(self, channels: int, embedding: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(embedding, 2 * channels)

    def forward(self, x: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(embedded)[:, :, None, None].chunk(2, dim=1)
        h = self.conv1(F.silu(x))
        h = h * (1 + scale) + shift
        return x + self.conv2(F.silu(h))


class ScoreNetwork(nn.Module):
    """``s(x, sigma)`` on ``(channels, H, W)`` images in [0, 1] (``H, W`` even)."""

    loss_name = "dsm"

    def __init__(self, channels: int = 3, hidden: int = 64, blocks: int = 2, sigmas: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("sigmas", geometric_sigmas(1.0, 0.01, 10) if sigmas is None else sigmas.float())
        embedding = hidden
        self.embed = nn.Sequential(nn.Linear(1, embedding), nn.SiLU(), nn.Linear(embedding, embedding))
        self.stem = nn.Conv2d(channels, hidden, 3, padding=1)
        self.high = nn.ModuleList(_ConditionalBlock(hidden, embedding) for _ in range(blocks))
        self.down = nn.Conv2d(hidden, hidden, 4, stride=2, padding=1)
        self.low = nn.ModuleList(_ConditionalBlock(hidden, embedding) for _ in range(blocks))
        self.up = nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1)
        self.merge = nn.ModuleList(_ConditionalBlock(hidden, embedding) for _ in range(blocks))
        self.head = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The estimated score at ``x`` for per-sample noise levels ``sigma`` ``(N,)``."""
        embedded = self.embed(torch.log(sigma).view(-1, 1).to(x.dtype))
        h = self.stem(x)
        for block in self.high:
            h = block(h, embedded)
        skip = h
        h = self.down(h)
        for block in self.low:
            h = block(h, embedded)
        h = self.up(h) + skip
        for block in self.merge:
            h = block(h, embedded)
        return self.head(F.silu(h)) / sigma.view(-1, 1, 1, 1)  # the score of q_sigma scales like 1 / sigma

    def denoising_loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``1/2 || sigma s(x + sigma z, sigma) + z ||^2`` per sample, a random level per sample (Eq. 6)."""
        level = torch.randint(0, len(self.sigmas), (len(x),), generator=generator).to(x.device)
        sigma = self.sigmas[level]
        z = torch.randn(x.shape, generator=generator).to(x.device)
        predicted = self(x + sigma.view(-1, 1, 1, 1) * z, sigma)
        return 0.5 * (sigma.view(-1, 1, 1, 1) * predicted + z).pow(2).flatten(1).sum(dim=1)

    def training_loss(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      progress: float = 1.0) -> torch.Tensor:
        """The denoising loss of uint8 images, scaled to [0, 1], per dimension."""
        return self.denoising_loss(images.float() / 255.0, generator) / images[0].numel()


def score_norms(model: ScoreNetwork, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """``|| sigma_l s(x, sigma_l) ||_2`` for every level ``l``: an ``(N, L)`` float64 array for uint8
    ``(N, C, H, W)`` images (MSMA's weighted score norms), on the model's device, no gradient."""
    device = next(model.parameters()).device
    sigmas = model.sigmas.to(device)
    out = []
    model.eval()
    with torch.no_grad():
        for begin in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[begin:begin + batch_size])).to(device).float() / 255.0
            norms = [sigma * model(x, sigma.expand(len(x))).flatten(1).norm(dim=1) for sigma in sigmas]
            out.append(torch.stack(norms, dim=1).double().cpu().numpy())
    return np.concatenate(out)
