"""A small RealNVP: exact log-likelihoods of 8-bit images through an invertible network.

Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017. An 8-bit image ``x`` is dequantised
and mapped to the real line (Sec. 4.1): ``y = (x + u) / 256`` with ``u ~ U[0, 1)^D``, then
``s = logit(alpha + (1 - 2 alpha) y)`` with ``alpha = 0.05``. A bijection ``f`` of affine coupling layers (Eq. 7-9)

    ``z_b = s_b * exp(scale(s_a)) + shift(s_a)``,  ``z_a = s_a``,  ``log |det| = sum scale(s_a)``

alternates checkerboard and channel-wise masks; each scale applies three checkerboard couplings, a squeeze
(space-to-depth), three channel-wise couplings and factors half of the channels out to the prior (Sec. 3.6); the
last scale applies four checkerboard couplings. The prior is a standard normal on every factored-out and final
variable. By the change of variables (Eq. 3),

    ``log p(x) = log N(f(s); 0, I) + log |det df/ds| + log |ds/dy| - D log 256``,

an unbiased estimate (over ``u``) of a lower bound on the discrete log-likelihood (Theis et al., 2016), reported
as bits per dimension ``-log p(x) / (D log 2)``. The published CIFAR-10 test figure of the paper's (much larger)
model is 3.49 bits/dim.

Differences from the paper, stated: the scale and shift networks are small ResNets without batch normalisation
(its last convolution starts at zero, so the flow starts as the identity); the scale is ``c * tanh(.)`` with a
learned ``c`` per channel, as in the authors' code, for stability; no L2 weight decay.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ALPHA = 0.05  # Sec. 4.1: the logit of alpha + (1 - 2 alpha) y keeps the boundary values finite


class _ResidualNet(nn.Module):
    """conv3x3 -> ``blocks`` residual blocks -> conv3x3 to ``out_channels`` (the last one zero: identity start)."""

    def __init__(self, in_channels: int, hidden: int, blocks: int, out_channels: int):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(hidden, hidden, 3, padding=1)) for _ in range(blocks))
        self.head = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(F.relu(h))


def checkerboard(height: int, width: int, parity: int, device=None) -> torch.Tensor:
    """``(1, 1, H, W)`` mask, 1 where ``(i + j + parity)`` is even: the half a checkerboard coupling conditions on."""
    rows = torch.arange(height, device=device).view(-1, 1)
    cols = torch.arange(width, device=device).view(1, -1)
    return (((rows + cols + parity) % 2) == 0).float().view(1, 1, height, width)


class AffineCoupling(nn.Module):
    """One affine coupling layer (Eq. 7-9) with a checkerboard or a channel-wise mask."""

    def __init__(self, channels: int, hidden: int, blocks: int, mask: str, parity: int):
        super().__init__()
        if mask not in ("checkerboard", "channel"):
            raise ValueError(f"mask must be 'checkerboard' or 'channel', got {mask!r}")
        self.mask, self.parity = mask, parity
        if mask == "checkerboard":
            self.net = _ResidualNet(channels, hidden, blocks, 2 * channels)
            changed = channels
        else:
            self.split = (channels // 2, channels - channels // 2)  # parity 0 conditions on the first part
            conditioning, changed = self.split if parity == 0 else self.split[::-1]
            self.net = _ResidualNet(conditioning, hidden, blocks, 2 * changed)
        self.scale_factor = nn.Parameter(torch.ones(1, changed, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log |det dz/dx|)`` per sample."""
        if self.mask == "checkerboard":
            keep = checkerboard(x.shape[2], x.shape[3], self.parity, x.device)
            scale, shift = self.net(x * keep).chunk(2, dim=1)
            scale = self.scale_factor * torch.tanh(scale) * (1.0 - keep)
            z = x * torch.exp(scale) + shift * (1.0 - keep)
            return z, scale.flatten(1).sum(dim=1)
        first, second = x.split(self.split, dim=1)
        x_a, x_b = (first, second) if self.parity == 0 else (second, first)
        scale, shift = self.net(x_a).chunk(2, dim=1)
        scale = self.scale_factor * torch.tanh(scale)
        z_b = x_b * torch.exp(scale) + shift
        parts = (x_a, z_b) if self.parity == 0 else (z_b, x_a)
        return torch.cat(parts, dim=1), scale.flatten(1).sum(dim=1)


class RealNVP(nn.Module):
    """The multi-scale RealNVP of the module docstring on ``(channels, H, W)`` inputs; ``scales`` squeezes."""

    def __init__(self, channels: int = 3, hidden: int = 32, blocks: int = 1, scales: int = 2):
        super().__init__()
        self.channels, self.scales = channels, scales
        self.stages = nn.ModuleList()
        c = channels
        for _ in range(scales):
            self.stages.append(nn.ModuleList(
                [AffineCoupling(c, hidden, blocks, "checkerboard", p) for p in (0, 1, 0)]
                + [AffineCoupling(4 * c, hidden, blocks, "channel", p) for p in (0, 1, 0)]))
            c = 2 * c  # squeeze to 4c, then half of it goes to the prior
        self.final = nn.ModuleList(AffineCoupling(c, hidden, blocks, "checkerboard", p) for p in (0, 1, 0, 1))

    def log_prob(self, s: torch.Tensor) -> torch.Tensor:
        """``log N(f(s)) + log |det df/ds|`` (nats) per sample of real-valued ``(N, C, H, W)`` inputs."""
        if s.shape[2] % (2 ** self.scales) or s.shape[3] % (2 ** self.scales):
            raise ValueError(f"RealNVP with {self.scales} scales needs H and W divisible by {2 ** self.scales}, "
                             f"got {tuple(s.shape[2:])}")
        log_det = torch.zeros(len(s), dtype=s.dtype, device=s.device)
        log_prior = torch.zeros_like(log_det)
        h = s
        for stage in self.stages:
            for layer in stage[:3]:
                h, d = layer(h)
                log_det = log_det + d
            h = F.pixel_unshuffle(h, 2)  # a permutation: log det 0
            for layer in stage[3:]:
                h, d = layer(h)
                log_det = log_det + d
            out, h = h.chunk(2, dim=1)
            log_prior = log_prior + standard_normal_log_density(out)
        for layer in self.final:
            h, d = layer(h)
            log_det = log_det + d
        return log_prior + standard_normal_log_density(h) + log_det

    def bits_per_dim(self, images: torch.Tensor, noise: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """``-log2 p(x) / D`` per uint8 ``(N, C, H, W)`` image with dequantisation ``noise`` (``(N|1, C, H, W)``
        in [0, 1); drawn from ``generator`` when None)."""
        if noise is None:
            noise = torch.rand(images.shape, generator=generator).to(images.device)
        s, log_ds_dy = logit_transform((images.double() + noise.double()) / 256.0)
        s = s.float()
        dims = images[0].numel()
        log_p = self.log_prob(s).double() + log_ds_dy - dims * math.log(256.0)
        return (-log_p / (dims * math.log(2.0))).float()


def standard_normal_log_density(z: torch.Tensor) -> torch.Tensor:
    """``sum log N(z_i; 0, 1)`` per sample."""
    return (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(dim=1)


def logit_transform(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = logit(alpha + (1 - 2 alpha) y)`` and ``log |ds/dy|`` per sample (float64)."""
    p = ALPHA + (1.0 - 2.0 * ALPHA) * y
    s = torch.log(p) - torch.log1p(-p)
    log_jacobian = math.log(1.0 - 2.0 * ALPHA) - torch.log(p) - torch.log1p(-p)
    return s, log_jacobian.flatten(1).sum(dim=1)


def evaluation_noise(shape: tuple[int, ...], seed: int, samples: int = 1) -> torch.Tensor:
    """``(samples, C, H, W)`` dequantisation noise drawn once from ``seed``: every image gets the same draws, so
    an image's bits/dim depend on the image alone (scoring a subset gives the subset of the scores)."""
    generator = torch.Generator().manual_seed(int(seed) + 7919)
    return torch.rand((samples, *shape), generator=generator)


def evaluate_flow_bits_per_dim(model: RealNVP, images: np.ndarray, noise: torch.Tensor,
                               batch_size: int = 256) -> np.ndarray:
    """Bits/dim of each uint8 ``(N, C, H, W)`` image, ``-log2 mean_k p(x | u_k) / D`` over the ``K`` noise draws
    (float64 out, on the model's device, no gradient)."""
    device = next(model.parameters()).device
    out = []
    model.eval()
    dims = int(np.prod(images.shape[1:]))
    with torch.no_grad():
        for begin in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[begin:begin + batch_size])).to(device)
            per_draw = torch.stack([model.bits_per_dim(batch, u.unsqueeze(0).to(device)).double() for u in noise])
            log_p = -per_draw * dims * math.log(2.0)  # (K, B) in nats
            mean_log_p = torch.logsumexp(log_p, dim=0) - math.log(len(noise))
            out.append((-mean_log_p / (dims * math.log(2.0))).cpu().numpy())
    return np.concatenate(out)
