"""DP-SGD: differentially private training by per-sample gradient clipping and Gaussian noise.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Algorithm 1: at every step a *lot* of expected
size ``L`` is drawn, each sample's gradient ``g_i`` is clipped to L2 norm at most ``C``
(``g_i / max(1, ||g_i|| / C)``), the clipped gradients are summed, Gaussian noise ``N(0, sigma^2 C^2 I)`` is added
and the sum is divided by ``L``; ``sigma`` is the *noise multiplier*.

* :func:`per_sample_gradients`: one gradient per sample with ``torch.func`` (``vmap`` over ``grad`` of a
  ``functional_call``), flattened to ``(B, P)`` rows.
* :func:`clip_and_noise`: Algorithm 1's clip, sum, noise and average on those rows.
* :func:`train_dp_linear`: a softmax-regression head (one ``nn.Linear``, zero-initialised) trained with DP-SGD on
  fixed feature vectors; lots by Poisson sampling (each row joins a lot with probability ``q = L / N``, what the
  RDP accountant assumes), plain SGD at a constant learning rate.
* :func:`dp_epsilon`: the ``epsilon`` of such a training at ``delta`` from Opacus' RDP accountant (Mironov,
  "Renyi Differential Privacy", CSF 2017; Mironov, Talwar & Zhang 2019 for the sampled Gaussian mechanism):
  ``pip install oodscope[privacy]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 96, 128, 192, 256, 512, 1024]
"""The Renyi orders of the accountant: Opacus' default ones and larger ones for large noise multipliers."""


def per_sample_gradients(model: Any, inputs: Any, targets: Any) -> Any:
    """Per-sample gradients of the cross-entropy of ``model(inputs)`` w.r.t. every parameter, as ``(B, P)``
    rows (parameters flattened in ``named_parameters`` order); computed with ``torch.func.vmap``."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, targets)
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


def clip_and_noise(per_sample: Any, max_norm: float, noise_multiplier: float, generator: Any = None,
                   denominator: float | None = None) -> Any:
    """Abadi et al.'s Algorithm 1 on ``(B, P)`` per-sample gradient rows: each row clipped to L2 norm
    ``max_norm`` (``C``), the rows summed, ``N(0, (noise_multiplier C)^2 I)`` added, divided by ``denominator``
    (the expected lot size ``L``; default: ``B``, so with no noise the result is the mean clipped gradient)."""
    import torch

    if per_sample.ndim != 2:
        raise ValueError(f"clip_and_noise: expected (samples, parameters) gradient rows, got {tuple(per_sample.shape)}")
    if not (max_norm > 0 and noise_multiplier >= 0):
        raise ValueError(f"clip_and_noise: need max_norm > 0 and noise_multiplier >= 0, got {max_norm}, "
                         f"{noise_multiplier}")
    denominator = len(per_sample) if denominator is None else denominator
    if denominator <= 0:
        raise ValueError("clip_and_noise: an empty lot needs an explicit denominator (the expected lot size)")
    norms = per_sample.norm(dim=1, keepdim=True)
    clipped = per_sample * torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0)
    total = clipped.sum(dim=0)
    if noise_multiplier > 0:
        noise = torch.randn(total.shape, generator=generator, dtype=total.dtype).to(total.device)
        total = total + noise_multiplier * max_norm * noise
    return total / denominator


def _check_features(features: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"train_dp_linear: features must be a non-empty (N, D) array, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("train_dp_linear: features contain NaN or inf")
    if labels.shape != (len(features),) or labels.dtype.kind not in "iu":
        raise ValueError(f"train_dp_linear: need one integer label per row, got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"train_dp_linear: labels must lie in [0, {n_classes}), got {labels.min()}..{labels.max()}")
    return features.astype(np.float32), labels.astype(np.int64)


def train_dp_linear(features: np.ndarray, labels: np.ndarray, n_classes: int, noise_multiplier: float, *,
                    max_norm: float = 1.0, lot_size: int = 256, epochs: int = 10, lr: float = 1.0, seed: int = 0,
                    device: str = "cpu", progress: bool = True) -> Any:
    """A zero-initialised ``nn.Linear(D, n_classes)`` trained with DP-SGD on ``(features, labels)``.

    ``epochs * round(N / lot_size)`` steps of plain SGD at ``lr``; each lot is a Poisson sample (rate
    ``lot_size / N``) and its update :func:`clip_and_noise` with denominator ``lot_size``. Seeded: the lots and
    the noise come from one ``torch.Generator``. Returns the trained layer on the CPU, in eval mode."""
    import torch
    from tqdm.auto import tqdm

    features, labels = _check_features(features, labels, n_classes)
    if not (isinstance(epochs, int) and epochs >= 1 and 1 <= lot_size <= len(features) and lr > 0):
        raise ValueError(f"train_dp_linear: need epochs >= 1, 1 <= lot_size <= N ({len(features)}) and lr > 0, "
                         f"got {epochs}, {lot_size}, {lr}")
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(features).to(device), torch.from_numpy(labels).to(device)
    layer = torch.nn.Linear(features.shape[1], n_classes).to(device)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    rate, steps = lot_size / len(features), epochs * max(1, round(len(features) / lot_size))
    shapes = [p.shape for p in layer.parameters()]
    for _ in tqdm(range(steps), desc=f"DP-SGD sigma={noise_multiplier:g}", disable=None if progress else True,
                  leave=False):
        rows = torch.nonzero(torch.rand(len(features), generator=generator) < rate)[:, 0].to(device)
        if len(rows):
            grads = per_sample_gradients(layer, x[rows], y[rows])
        else:  # an empty Poisson lot: the update is noise only
            grads = torch.zeros((0, sum(int(np.prod(s)) for s in shapes)), device=device)
        update = clip_and_noise(grads, max_norm, noise_multiplier, generator, denominator=lot_size)
        with torch.no_grad():
            for p, part in zip(layer.parameters(), torch.split(update, [int(np.prod(s)) for s in shapes])):
                p -= lr * part.view(p.shape)
    return layer.cpu().eval()


def dp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """``epsilon`` of ``steps`` sampled Gaussian mechanism steps (Poisson rate ``sample_rate``, noise multiplier
    ``noise_multiplier``) at ``delta``, from Opacus' RDP accountant; ``inf`` without noise."""
    if noise_multiplier == 0:
        return float("inf")
    if not (0 < sample_rate <= 1 and steps >= 1 and 0 < delta < 1 and noise_multiplier > 0):
        raise ValueError(f"dp_epsilon: need 0 < sample_rate <= 1, steps >= 1, 0 < delta < 1 and noise_multiplier "
                         f">= 0, got {sample_rate}, {steps}, {delta}, {noise_multiplier}")
    try:
        from opacus.accountants.analysis import rdp
    except ImportError:
        raise ImportError("dp_epsilon needs Opacus' accountant: pip install oodscope[privacy]") from None
    import warnings

    orders = RDP_ORDERS
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a valid, slightly loose bound
        warnings.simplefilter("ignore", UserWarning)
        values = rdp.compute_rdp(q=float(sample_rate), noise_multiplier=float(noise_multiplier), steps=int(steps),
                                 orders=orders)
        epsilon, _ = rdp.get_privacy_spent(orders=orders, rdp=values, delta=float(delta))
    return float(epsilon)
