"""A small DDPM at 32x32: the epsilon-prediction U-Net, its simple loss, and the samplers LMD and DiffGuard use.

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020. The forward process adds Gaussian
noise over ``T = 1000`` steps with the linear schedule ``beta_t`` from ``1e-4`` to ``0.02`` (Sec. 4), so
``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` with ``abar_t = prod_{s <= t} (1 - beta_s)`` (Eq. 4). A
network ``eps_theta(x_t, t)`` predicts the noise; training minimises the simple loss (Eq. 14)

    ``L_simple = E_{t, x_0, eps} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2``

(``t`` uniform, the squared error averaged over the dimensions as in the authors' code). Images are scaled to
[-1, 1]. The network is Ho et al.'s U-Net made small for CPU schedules: ``hidden`` base channels with multipliers
(1, 2, 2) (three resolutions: 32, 16, 8 for a 32x32 image), ``blocks`` residual blocks per resolution with
GroupNorm, SiLU and the sinusoidal time embedding added in every block, self-attention only in the middle (the
lowest resolution; Ho et al. also attend at 16x16), no dropout (Ho et al. use 0.1 on CIFAR-10, for 800k steps),
the output convolution zero-initialised (so an untrained network predicts ``eps = 0``).

Sampling runs fewer steps than training, on an evenly strided subsequence ``tau`` of the ``T`` steps:

* :func:`ancestral_step`, the DDPM reverse step (Eq. 6-7 with ``sigma_t^2 = beta~_t``) on the respaced chain of
  Nichol & Dhariwal 2021 (Sec. 4: ``beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}}``), with ``x_0`` predicted and
  clipped to [-1, 1] as in the authors' sampler. This is a stochastic sampler, as the reverse SDE that LMD
  integrates, and the one RePaint's known-region replacement (:func:`inpaint`) is defined for.
* :func:`ddim_step` / :func:`ddim_invert`, the deterministic DDIM update (Song et al., ICLR 2021, Eq. 12 with
  ``eta = 0``) and its reverse, which DiffGuard uses to map an input to a noised latent and back, optionally with
  classifier guidance (Dhariwal & Nichol 2021, Algorithm 2).

Noise in the samplers is drawn per step from a seeded generator as one ``(1, C, H, W)`` tensor shared by every image
of the batch (so an image's result depends on the image and the seed alone, not on its batch).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

MULTIPLIERS = (1, 2, 2)


def linear_alphas_cumprod(steps: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> torch.Tensor:
    """``abar_t`` for ``t = 1..steps`` of the linear schedule (float64), index ``t - 1``."""
    return torch.cumprod(1.0 - torch.linspace(beta_1, beta_T, steps, dtype=torch.float64), dim=0)


def strided_timesteps(steps: int, total: int = 1000) -> list[int]:
    """``steps`` evenly strided step indices of ``0..total-1``, increasing (the respaced chain's ``tau``)."""
    if not 1 <= int(steps) <= int(total):
        raise ValueError(f"sampling steps must be in 1..{total}, got {steps}")
    return sorted({int(round(v)) for v in np.linspace(0, total - 1, int(steps))})


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


def timestep_embedding(t: torch.Tensor, width: int) -> torch.Tensor:
    """The transformer sinusoidal embedding of integer steps ``t`` ``(N,)`` -> ``(N, width)`` (Ho et al. App. B)."""
    half = width // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * frequencies[None, :]
    embedded = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(embedded, (0, width % 2))


class _ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, embedding: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(embedding, out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedded: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        steps, inverse = embedded  # one embedding row per distinct step, and each sample's row
        h = self.conv1(F.silu(self.norm1(x))) + self.time(F.silu(steps))[inverse][:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class _Attention(nn.Module):
    """Single-head self-attention over the pixels, residual (Ho et al.'s attention block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, embedded: object = None) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).unbind(1)
        weights = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(c), dim=-1)
        return x + self.out(torch.einsum("nqk,nck->ncq", weights, v).reshape(n, c, h, w))


class DDPM(nn.Module):
    """``eps_theta(x_t, t)`` on ``(channels, H, W)`` images in [-1, 1], ``H, W`` divisible by 4."""

    loss_name = "simple_loss"

    def __init__(self, channels: int = 3, hidden: int = 32, blocks: int = 1, steps: int = 1000,
                 beta_1: float = 1e-4, beta_T: float = 0.02):
        super().__init__()
        self.channels, self.steps = channels, int(steps)
        self.alphas_cumprod = linear_alphas_cumprod(self.steps, beta_1, beta_T)  # float64, not a parameter
        embedding = 4 * hidden
        self.hidden = hidden
        self.embed = nn.Sequential(nn.Linear(hidden, embedding), nn.SiLU(), nn.Linear(embedding, embedding))
        self.stem = nn.Conv2d(channels, hidden, 3, padding=1)
        self.down = nn.ModuleList()
        skips, width = [hidden], hidden
        for level, multiplier in enumerate(MULTIPLIERS):
            for _ in range(blocks):
                self.down.append(_ResBlock(width, hidden * multiplier, embedding))
                width = hidden * multiplier
                skips.append(width)
            if level < len(MULTIPLIERS) - 1:
                self.down.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skips.append(width)
        self.middle = nn.ModuleList([_ResBlock(width, width, embedding), _Attention(width),
                                     _ResBlock(width, width, embedding)])
        self.up = nn.ModuleList()
        for level, multiplier in reversed(list(enumerate(MULTIPLIERS))):
            for _ in range(blocks + 1):
                self.up.append(_ResBlock(width + skips.pop(), hidden * multiplier, embedding))
                width = hidden * multiplier
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up.append(nn.Conv2d(width, width, 3, padding=1))
        self.out_norm = nn.GroupNorm(_groups(width), width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predicted noise for ``x_t`` at integer steps ``t`` ``(N,)`` (0-based: ``t = 0`` is the first step). The
        step embedding is computed once per distinct step (in sampling, one row for the whole batch, so a sample's
        output does not depend on its batch's size)."""
        unique, inverse = torch.unique(t, return_inverse=True)
        embedded = (self.embed(timestep_embedding(unique, self.hidden)), inverse)
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, embedded) if isinstance(layer, _ResBlock) else layer(h)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, embedded)
        for layer in self.up:
            if isinstance(layer, _ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), embedded)
            else:
                h = layer(h)
        return self.out(F.silu(self.out_norm(h)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (Eq. 4), ``t`` per sample."""
        abar = self.alphas_cumprod[t.cpu()].to(x0.device, x0.dtype).view(-1, 1, 1, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def simple_loss(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``mean_d (eps - eps_theta(x_t, t))^2`` per sample (Eq. 14) for given steps and noise."""
        return (eps - self(self.q_sample(x0, t, eps), t)).pow(2).flatten(1).mean(dim=1)

    def training_loss(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      progress: float = 1.0) -> torch.Tensor:
        """The simple loss of uint8 images (scaled to [-1, 1]), a uniform random step and noise per image."""
        x0 = to_model_range(images)
        t = torch.randint(0, self.steps, (len(x0),), generator=generator)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        return self.simple_loss(x0, t.to(x0.device), eps)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> floats in [-1, 1]."""
    return images.float() * (2.0 / 255.0) - 1.0


def _noise(generator: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One ``(1, C, H, W)`` standard normal draw, shared by every image of a batch."""
    return torch.randn((1, *shape[1:]), generator=generator).to(device)


def _abar(model: nn.Module, t: int) -> float:
    return 1.0 if t < 0 else float(model.alphas_cumprod[t])


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    """``(x_t - sqrt(1 - abar) eps) / sqrt(abar)`` (Eq. 4 solved for ``x_0``)."""
    return (x_t - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)


def ancestral_step(model: nn.Module, x_t: torch.Tensor, t: int, t_prev: int,
                   noise: torch.Tensor | None) -> torch.Tensor:
    """One DDPM reverse step from step ``t`` to ``t_prev`` (``-1``: to ``x_0``) of the respaced chain: the posterior
    ``q(x_prev | x_t, x0_hat)`` with ``x0_hat`` predicted and clipped, variance ``beta~`` (Ho et al. Eq. 6-7),
    plus ``noise`` (none at the last step)."""
    abar_t, abar_prev = _abar(model, t), _abar(model, t_prev)
    beta = 1.0 - abar_t / abar_prev
    eps = model(x_t, torch.full((len(x_t),), t, dtype=torch.long, device=x_t.device))
    x0 = predict_x0(x_t, eps, abar_t).clamp(-1.0, 1.0)
    mean = (math.sqrt(abar_prev) * beta / (1.0 - abar_t)) * x0 \
        + (math.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar_t)) * x_t
    if t_prev < 0 or noise is None:
        return mean
    return mean + math.sqrt(beta * (1.0 - abar_prev) / (1.0 - abar_t)) * noise


def inpaint(model: nn.Module, x0: torch.Tensor, mask: torch.Tensor, steps: int,
            generator: torch.Generator) -> torch.Tensor:
    """Fill the pixels where ``mask == 0`` of ``x0`` (in [-1, 1]) by ancestral sampling over ``steps`` strided steps,
    replacing the known region (``mask == 1``) after every step by ``x0`` noised to that step (RePaint's Eq. 8,
    Lugmayr et al. 2022, without its resampling; LMD's inpainter). The last step's known region is ``x0`` itself,
    so the known pixels come back exactly."""
    mask = mask.to(x0.device, x0.dtype)
    timesteps = strided_timesteps(steps, model.steps)[::-1]
    first = timesteps[0]
    start = math.sqrt(_abar(model, first)) * x0 + math.sqrt(1 - _abar(model, first)) * _noise(
        generator, x0.shape, x0.device)
    x = mask * start + (1 - mask) * _noise(generator, x0.shape, x0.device)
    for index, t in enumerate(timesteps):
        t_prev = timesteps[index + 1] if index + 1 < len(timesteps) else -1
        x = ancestral_step(model, x, t, t_prev, _noise(generator, x0.shape, x0.device) if t_prev >= 0 else None)
        abar = _abar(model, t_prev)
        known = x0 if t_prev < 0 else math.sqrt(abar) * x0 + math.sqrt(1 - abar) * _noise(
            generator, x0.shape, x0.device)
        x = mask * known + (1 - mask) * x
    return x


def sample(model: nn.Module, shape: tuple[int, ...], steps: int, generator: torch.Generator,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """``shape[0]`` images from pure noise by strided ancestral sampling (:func:`inpaint` with nothing known)."""
    zeros = torch.zeros(shape, device=device)
    return inpaint(model, zeros, torch.zeros(shape, device=device), steps, generator)


Guidance = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def ddim_step(model: nn.Module, x_t: torch.Tensor, t: int, t_next: int, guidance: Guidance | None = None,
              clip: bool = True) -> torch.Tensor:
    """The deterministic DDIM update (Song et al. Eq. 12, ``eta = 0``) from step ``t`` to ``t_next`` (``-1``: to
    ``x_0``; ``t_next > t`` runs it in reverse, the DDIM inversion): ``x_next = sqrt(abar') x0_hat +
    sqrt(1 - abar') eps``. ``guidance(x_t, eps_raw, t)`` (the network's unclipped prediction) returns
    ``grad log p(y | x_t)``; the noise prediction is then
    ``eps - sqrt(1 - abar_t) grad`` (Dhariwal & Nichol, Algorithm 2), applied after ``x0_hat`` is clipped, as in
    their ``condition_score``."""
    abar_t, abar_next = _abar(model, t), _abar(model, t_next)
    raw = model(x_t, torch.full((len(x_t),), t, dtype=torch.long, device=x_t.device))
    x0 = predict_x0(x_t, raw, abar_t)
    eps = raw
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x_t - math.sqrt(abar_t) * x0) / math.sqrt(1.0 - abar_t)
    if guidance is not None:
        eps = eps - math.sqrt(1.0 - abar_t) * guidance(x_t, raw, t)
        x0 = predict_x0(x_t, eps, abar_t)
    return math.sqrt(abar_next) * x0 + math.sqrt(1.0 - abar_next) * eps


def ddim_invert(model: nn.Module, x0: torch.Tensor, timesteps: list[int], clip: bool = True) -> torch.Tensor:
    """``x0`` mapped up the increasing ``timesteps`` by the DDIM update run forward (the DDIM inversion): ``x0`` is
    read as ``x_{timesteps[0]}`` (``abar`` of step 0 is ``1 - 1e-4``), then each step ``tau_i -> tau_{i+1}`` uses the
    network at ``tau_i``, as guided diffusion's ``ddim_reverse_sample`` does; returns ``x_{timesteps[-1]}``."""
    x = x0
    for t, t_next in zip(timesteps[:-1], timesteps[1:]):
        x = ddim_step(model, x, t, t_next, clip=clip)
    return x


def ddim_sample(model: nn.Module, x_t: torch.Tensor, timesteps: list[int], guidance: Guidance | None = None,
                clip: bool = True) -> torch.Tensor:
    """``x_t`` at ``timesteps[-1]`` denoised down the increasing ``timesteps`` to ``x_0`` by DDIM."""
    x = x_t
    order = timesteps[::-1]
    for index, t in enumerate(order):
        t_next = order[index + 1] if index + 1 < len(order) else -1
        x = ddim_step(model, x, t, t_next, guidance, clip)
    return x


def evaluation_loss(model: DDPM, images: np.ndarray, seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """The simple loss (Eq. 14) of each uint8 ``(N, C, H, W)`` image: its mean over ``K = 10`` (step, noise) pairs
    shared by every image (steps evenly strided over ``0..T-1``, noise drawn from ``seed``), so an image's value
    depends on the image alone. float64 out, no gradient."""
    generator = torch.Generator().manual_seed(int(seed) + 7919)
    steps = torch.tensor(strided_timesteps(10, model.steps))
    noise = torch.randn((len(steps), *images.shape[1:]), generator=generator)
    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.no_grad():
        for begin in range(0, len(images), batch_size):
            x0 = to_model_range(torch.from_numpy(np.ascontiguousarray(images[begin:begin + batch_size]))).to(device)
            losses = [model.simple_loss(x0, torch.full((len(x0),), int(t), device=device),
                                        noise[k:k + 1].to(device).expand_as(x0)) for k, t in enumerate(steps)]
            out.append(torch.stack(losses, dim=1).mean(dim=1).double().cpu().numpy())
    return np.concatenate(out)
