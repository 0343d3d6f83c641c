"""A small hierarchical VAE with top-down inference, its ELBO and the bound ``L^{>k}`` of Havtorn et al.

Havtorn, Frellsen, Hauberg & Maaløe, "Hierarchical VAEs Know What They Don't Know", ICML 2021. Three stochastic
layers ``z_1`` (16x16 for a 32x32 image), ``z_2`` (8x8), ``z_3`` (4x4), generative model
``p(x | z_1) p(z_1 | z_2, z_3) p(z_2 | z_3) p(z_3)`` with a standard normal ``p(z_3)``, diagonal Gaussian
conditionals and the discretised logistic likelihood of :mod:`oodscope.generative.pixelcnn` for the pixels.
Inference is top-down, ``q(z_3 | x) q(z_2 | z_3, x) q(z_1 | z_2, z_3, x)``: a bottom-up pass of ``x`` gives a feature
map per layer, each posterior reads it together with the top-down state (the Ladder VAE's order, Sønderby et al.
2016, with concatenation instead of precision weighting). The ELBO (Eq. 2) and the paper's Eq. 6,

    ``L^{>k}(x) = E_{p(z_{<=k} | z_{>k}) q(z_{>k} | x)} [ log p(x | z) p(z_{>k}) / q(z_{>k} | x) ]``

(the top ``L - k`` latents inferred from ``x``, the ``k`` lowest drawn from the prior given them), estimated with
``S`` importance samples (log-mean-exp of the weights). ``L^{>0}`` is the ELBO itself, so ``LLR^{>0} = 0``. Training
maximises the ELBO with analytic per-layer KL terms and a linear KL warm-up (Sønderby et al. 2016; Havtorn et al.
also warm up, over far longer schedules).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .pixelcnn import discretised_logistic_log_prob, scale_images

LAYERS = 3
#: every latent Gaussian's log standard deviation is clamped to +-LOG_STD_LIMIT, in training and evaluation alike.
#: Trained models keep their log-stds near [-2, 2] on their data, so the clamp does not act there; it matters for
#: L^{>k}, whose lowest latents come from the prior given the upper ones: for an atypical image a broad prior at
#: z_2 (log-std 6.1) gave |z_2| ~ 800 and then a log-std of 99 at z_1, whose exp overflowed to inf and NaN.
LOG_STD_LIMIT = 7.0


def _block(channels: int) -> nn.Module:
    return nn.Sequential(nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
                         nn.Conv2d(channels, channels, 3, padding=1))


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = _block(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def mean_and_log_std(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian layer's ``(mean, log_std)`` from its ``2 latent`` channels, the log-std clamped to
    ``[-LOG_STD_LIMIT, LOG_STD_LIMIT]``."""
    mean, log_std = params.chunk(2, dim=1)
    return mean, log_std.clamp(-LOG_STD_LIMIT, LOG_STD_LIMIT)


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """``sum log N(z; mean, exp(log_std)^2)`` per sample."""
    return (-0.5 * ((z - mean) * torch.exp(-log_std)).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def gaussian_kl(mean_q, log_std_q, mean_p, log_std_p) -> torch.Tensor:
    """``KL(N_q || N_p)`` of diagonal Gaussians, summed per sample."""
    var_ratio = torch.exp(2 * (log_std_q - log_std_p))
    kl = 0.5 * (var_ratio + ((mean_q - mean_p) * torch.exp(-log_std_p)).pow(2) - 1) - (log_std_q - log_std_p)
    return kl.flatten(1).sum(1)


class HierarchicalVAE(nn.Module):
    """The three-layer HVAE of the module docstring on ``(channels, H, W)`` images with ``H, W`` divisible by 8."""

    def __init__(self, channels: int = 3, hidden: int = 64, latent: int = 8):
        super().__init__()
        self.channels, self.latent = channels, latent
        self.up_convs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(channels, hidden, 4, stride=2, padding=1), _Residual(hidden)),
            nn.Sequential(nn.Conv2d(hidden, hidden, 4, stride=2, padding=1), _Residual(hidden)),
            nn.Sequential(nn.Conv2d(hidden, hidden, 4, stride=2, padding=1), _Residual(hidden))])
        self.posterior = nn.ModuleList([nn.Conv2d(2 * hidden, 2 * latent, 3, padding=1) for _ in range(LAYERS - 1)]
                                       + [nn.Conv2d(hidden, 2 * latent, 3, padding=1)])
        self.prior = nn.ModuleList(nn.Conv2d(hidden, 2 * latent, 3, padding=1) for _ in range(LAYERS - 1))
        self.from_latent = nn.ModuleList(nn.Conv2d(latent, hidden, 3, padding=1) for _ in range(LAYERS))
        self.down_convs = nn.ModuleList(
            nn.Sequential(_Residual(hidden), nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1))
            for _ in range(LAYERS))
        self.out = nn.Sequential(_Residual(hidden), nn.Conv2d(hidden, 2 * channels, 3, padding=1))

    def _bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        features, h = [], x
        for conv in self.up_convs:
            h = conv(h)
            features.append(h)
        return features

    def log_weights(self, images: torch.Tensor, k: int = 0, noise: list[torch.Tensor] | None = None,
                    generator: torch.Generator | None = None, kl_weight: float | None = None) -> torch.Tensor:
        """Per image: ``log p(x | z) + sum_{i > k} [log p(z_i | z_{>i}) - log q(z_i | z_{>i}, x)]`` for one draw of
        ``z`` (``z_{>k}`` from the posterior, ``z_{<=k}`` from the prior; standard normal ``noise`` per layer,
        bottom first, each ``(N|1, latent, h, w)``; drawn from ``generator`` when None). With ``kl_weight`` the
        latent terms are the analytic KLs times it (the training objective) instead of their one-sample estimate."""
        if not 0 <= k <= LAYERS:
            raise ValueError(f"k must be in 0..{LAYERS}, got {k}")
        x = scale_images(images)
        features = self._bottom_up(x)
        total = torch.zeros(len(x), device=x.device)
        state = None
        for layer in reversed(range(LAYERS)):  # top (z_3) first
            feature = features[layer]
            if state is None:
                prior_mean = torch.zeros(len(x), self.latent, *feature.shape[2:], device=x.device)
                prior_log_std = torch.zeros_like(prior_mean)
                posterior_input = feature
            else:
                prior_mean, prior_log_std = mean_and_log_std(self.prior[layer](state))
                posterior_input = torch.cat([state, feature], dim=1)
            eps = noise[layer] if noise is not None else torch.randn(
                prior_mean.shape, generator=generator).to(x.device)
            if layer < k:  # z_{<=k}: from the prior given the layers above; no weight terms
                z = prior_mean + torch.exp(prior_log_std) * eps
            else:
                post_mean, post_log_std = mean_and_log_std(self.posterior[layer](posterior_input))
                z = post_mean + torch.exp(post_log_std) * eps
                if kl_weight is not None:
                    total = total - kl_weight * gaussian_kl(post_mean, post_log_std, prior_mean, prior_log_std)
                else:
                    total = total + gaussian_log_density(z, prior_mean, prior_log_std) \
                        - gaussian_log_density(z, post_mean, post_log_std)
            h = self.from_latent[layer](z) + (state if state is not None else 0.0)
            state = self.down_convs[layer](h)
        mean, log_scale = self.out(state).chunk(2, dim=1)
        log_px = discretised_logistic_log_prob(x, torch.tanh(mean), log_scale).flatten(1).sum(1)
        return total + log_px

    def latent_shapes(self, image_shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """``(latent, h, w)`` of ``z_1 .. z_3`` for ``(C, H, W)`` images."""
        height, width = image_shape[1:]
        return [(self.latent, height // 2 ** (i + 1), width // 2 ** (i + 1)) for i in range(LAYERS)]

    def training_loss(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      progress: float = 1.0, warmup: float = 0.5) -> torch.Tensor:
        """Negative ELBO in bits/dim with the KL weight rising linearly to 1 over the first ``warmup`` of training."""
        weight = min(1.0, progress / warmup) if warmup > 0 else 1.0
        return -self.log_weights(images, generator=generator, kl_weight=weight) / (images[0].numel() * math.log(2.0))

    def bits_per_dim(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Negative ELBO (analytic KL) in bits/dim per image: the bound the training reports."""
        return -self.log_weights(images, generator=generator, kl_weight=1.0) / (images[0].numel() * math.log(2.0))


def importance_bound(model: HierarchicalVAE, images: torch.Tensor, k: int, noise: list[torch.Tensor]) -> torch.Tensor:
    """``log mean_s exp(w_s)`` (nats) per image over the ``S`` draws in ``noise`` (each layer ``(S, latent, h, w)``):
    the importance-weighted ``L^{>k}`` (``k = 0``: the ELBO's)."""
    draws = len(noise[0])
    weights = torch.stack([model.log_weights(images, k, [layer[s:s + 1] for layer in noise]) for s in range(draws)])
    return torch.logsumexp(weights.double(), dim=0) - math.log(draws)


def evaluation_noise(model: HierarchicalVAE, image_shape: tuple[int, ...], samples: int,
                     seed: int) -> list[torch.Tensor]:
    """Standard normal draws per layer ``(samples, latent, h, w)``, shared by every image (so an image's bound
    depends on the image alone), from ``seed``."""
    generator = torch.Generator().manual_seed(int(seed) + 104729)
    return [torch.randn((samples, *shape), generator=generator) for shape in model.latent_shapes(image_shape)]
