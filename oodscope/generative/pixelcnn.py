"""A small PixelCNN with a discretised logistic likelihood: exact log-likelihoods of 8-bit images.

van den Oord, Kalchbrenner & Kavukcuoglu, "Pixel Recurrent Neural Networks", ICML 2016 (PixelCNN: masked
convolutions, mask A for the first layer, mask B after it) with the discretised logistic output of Salimans et al.,
"PixelCNN++", ICLR 2017 (Sec. 2.1, one mixture component). The image is modelled pixel by pixel in raster order,

    ``log p(x) = sum_i sum_c log P(x_{i,c} | x_{<i})``,

the three channels of a pixel conditionally independent given the previous pixels (a valid normalised
autoregressive model; the original PixelCNN also orders R -> G -> B within a pixel). ``P(v | mu, s)`` for an 8-bit
value ``v`` (scaled to ``[-1, 1]``, bin width ``2/255``) is the logistic CDF mass of its bin, with the edge bins
open to -inf and +inf, so the 256 probabilities sum to one. Bits per dimension ``= -log2 p(x) / (H W C)``; the
published CIFAR-10 test figures are 3.00 (PixelCNN, van den Oord et al. 2016) and 2.92 (PixelCNN++).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only the pixels above and to the left (mask ``A`` also hides the centre)."""

    def __init__(self, mask: str, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        centre = kernel_size // 2
        weight_mask = torch.ones_like(self.weight)
        weight_mask[:, :, centre, centre + (mask == "B"):] = 0
        weight_mask[:, :, centre + 1:] = 0
        self.register_buffer("mask", weight_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNN(nn.Module):
    """Masked 7x7 (A) stem, ``blocks`` residual blocks of masked 3x3 (B) convolutions, then two 1x1 layers that
    give each channel's logistic mean and log-scale: output ``(N, 2 C, H, W)``."""

    def __init__(self, channels: int = 3, hidden: int = 64, blocks: int = 5):
        super().__init__()
        self.channels = channels
        self.stem = MaskedConv2d("A", channels, hidden, 7)
        self.blocks = nn.ModuleList(MaskedConv2d("B", hidden, hidden, 3) for _ in range(blocks))
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, 2 * channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(F.relu(h))
        return self.out(h)

    def bits_per_dim(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``-log2 p(x) / D`` per uint8 ``(N, C, H, W)`` image (exact: no noise, ``generator`` unused)."""
        return nll_bits_per_dim(self, images)


def scale_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..255 as floats in [-1, 1]."""
    return images.float() * (2.0 / 255.0) - 1.0


def discretised_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """``log P(x | mean, s)`` per element for ``x`` on the 8-bit grid scaled to [-1, 1] (PixelCNN++ Eq. 2)."""
    log_scale = log_scale.clamp(min=-7.0)
    centred = x - mean
    inv_scale = torch.exp(-log_scale)
    plus = inv_scale * (centred + 1.0 / 255.0)
    minus = inv_scale * (centred - 1.0 / 255.0)
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): the lowest bin, open to -inf
    log_one_minus_cdf_minus = -F.softplus(minus)  # the highest bin, open to +inf
    delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    middle = inv_scale * centred
    log_pdf_middle = middle - log_scale - 2.0 * F.softplus(middle) - math.log(127.5)  # tiny bins: density x width
    inner = torch.where(delta > 1e-5, torch.log(delta.clamp(min=1e-12)), log_pdf_middle)
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, inner))


def nll_bits_per_dim(model: PixelCNN, images: torch.Tensor) -> torch.Tensor:
    """``-log2 p(x) / (H W C)`` per image of a uint8 ``(N, C, H, W)`` batch."""
    x = scale_images(images)
    params = model(x)
    c = model.channels
    log_prob = discretised_logistic_log_prob(x, params[:, :c], params[:, c:])
    return -log_prob.flatten(1).sum(dim=1) / (x[0].numel() * math.log(2.0))
