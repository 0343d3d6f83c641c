"""AdaSCALE: adaptive, per-sample activation scaling.

Regmi, "AdaSCALE: Adaptive Scaling for OOD Detection", 2025. SCALE (Xu et al., ICLR 2024) scales the
penultimate activations by ``exp(r)``, ``r = sum(a) / sum(a above the p-th percentile)``, with one fixed ``p``.
AdaSCALE chooses ``p`` per sample from how much its features move under a small input perturbation (OOD samples
move more):

1. Perturb the input: with ``g`` the gradient of the maximum logit w.r.t. the (preprocessed) input, add
   ``step * sign(g)`` to the ``pixel_fraction`` of input elements with the smallest ``|g|``; ``z̃`` is the
   feature of the perturbed input.
2. ``Q'(x) = Σ_{j ∈ top_k1(z)} relu(z̃_j) + λ Σ_{j ∈ top_k2(z)} |z_j - z̃_j|`` (top by the unperturbed ``z``;
   ``k1``, ``k2`` in percent of the units).
3. ``p(x) = p_min + (1 - F_ID(Q'(x))) (p_max - p_min)``, ``F_ID`` the empirical CDF of ``Q'`` on ID data.
4. AdaSCALE-A (the default ``variant="a"``): ``z' = z exp(r)`` with ``r`` computed at ``p(x)`` on ``relu(z)``,
   score = energy of ``W z' + b``; AdaSCALE-L (``variant="l"``) multiplies the logits by ``r^2`` instead.

Defaults are the authors' (OpenOOD release): ``p ∈ [75, 85]``, ``k1 = 5 %``, ``k2 = 1 %``, ``λ = 10``,
``pixel_fraction = 0.05``, ``step = 0.5``, ``F_ID`` from 5,000 ID samples. The method runs the network again
(one backward and one extra forward pass per sample), so it needs outputs that carry the model
(``oodscope.extract`` attaches it); ``k1``/``k2`` are at least one unit.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from ..extraction.outputs import ModelSource, Need, Outputs
from ._common import as_float64, energy
from ._shaping import check_percentile, check_positive, head_logits, n_kept, sum_ratio, top_k_mask
from .base import Detector


def perturbed_features(source: ModelSource, pixel_fraction: float, step: float, who: str) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features of the inputs and of their AdaSCALE perturbation, both ``(N, D)``."""
    import torch

    from ..extraction.rerun import rerun

    if source.head is None:
        raise ValueError(f"{who}: the model source names no classifier head, so penultimate features cannot be "
                         "caught; extract with head='auto' (a model whose last layer is nn.Linear) or a module name")

    def batch(x: "torch.Tensor", probe) -> "torch.Tensor":
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = probe(x)
            (grad,) = torch.autograd.grad(out["logits"].max(dim=1).values.sum(), x)
        features = out["features"].detach()
        flat = grad.abs().flatten(1)
        n_pixels = max(int(flat.shape[1] * pixel_fraction), 1)
        smallest = flat.topk(n_pixels, dim=1, largest=False).indices
        mask = torch.zeros_like(flat).scatter_(1, smallest, 1.0).view_as(grad)
        with torch.no_grad():
            moved = probe(x.detach() + step * grad.sign() * mask)["features"]
        return torch.cat([features, moved.detach()], dim=1)

    both = rerun(source, batch)
    half = both.shape[1] // 2
    return both[:, :half], both[:, half:]


def _subset(source: ModelSource, index: np.ndarray) -> ModelSource:
    inputs = source.inputs
    if hasattr(inputs, "__getitem__") and hasattr(inputs, "shape"):
        picked = inputs[index]
    else:
        import torch

        picked = torch.utils.data.Subset(inputs, index.tolist())
    return dataclasses.replace(source, inputs=picked)


class AdaSCALE(Detector):
    """SCALE with a per-sample percentile from the feature shift under a small input perturbation."""

    name = "adascale"
    needs = frozenset({Need.FEATURES, Need.HEAD, Need.MODEL})
    grid = {"min_percentile": [60, 70, 75, 80], "max_percentile": [85, 90, 95, 99]}

    def __init__(self, min_percentile: float = 75, max_percentile: float = 85, k1: float = 5.0, k2: float = 1.0,
                 lam: float = 10.0, pixel_fraction: float = 0.05, step: float = 0.5, variant: str = "a",
                 fit_samples: int | None = 5000, seed: int = 0):
        self.min_percentile = min_percentile
        self.max_percentile = max_percentile
        self.k1 = k1
        self.k2 = k2
        self.lam = lam
        self.pixel_fraction = pixel_fraction
        self.step = step
        self.variant = variant
        self.fit_samples = fit_samples
        self.seed = seed

    def _check_params(self) -> None:
        for name in ("min_percentile", "max_percentile", "k1", "k2"):
            check_percentile(self.name, name, getattr(self, name))
        if not self.min_percentile <= self.max_percentile:
            raise ValueError(f"adascale: min_percentile ({self.min_percentile}) must not exceed max_percentile "
                             f"({self.max_percentile})")
        check_positive(self.name, "lam", self.lam, allow_zero=True)
        check_positive(self.name, "step", self.step)
        if not (isinstance(self.pixel_fraction, numbers.Real) and 0 < self.pixel_fraction <= 1):
            raise ValueError(f"adascale: pixel_fraction must be in (0, 1], got {self.pixel_fraction!r}")
        if self.variant not in ("a", "l"):
            raise ValueError(f"adascale: variant must be 'a' (activation scaling) or 'l' (logit scaling), "
                             f"got {self.variant!r}")
        if self.fit_samples is not None and not (isinstance(self.fit_samples, numbers.Integral)
                                                 and self.fit_samples > 0):
            raise ValueError(f"adascale: fit_samples must be a positive integer or None, got {self.fit_samples!r}")

    def _shift_statistic(self, z: np.ndarray, moved: np.ndarray) -> np.ndarray:
        """``Q'`` of step 2."""
        n_units = z.shape[1]
        k1 = max(int(n_units * self.k1 / 100), 1)
        k2 = max(int(n_units * self.k2 / 100), 1)
        correction = np.where(top_k_mask(z, k1), np.maximum(moved, 0.0), 0.0).sum(axis=1)
        shift = np.where(top_k_mask(z, k2), np.abs(z - moved), 0.0).sum(axis=1)
        return correction + self.lam * shift

    def _rerun(self, data: Outputs, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        source = data.get(Need.MODEL, who=self.name)
        if index is not None:
            source = _subset(source, index)
        z, moved = perturbed_features(source, self.pixel_fraction, self.step, self.name)
        expected = len(data) if index is None else len(index)
        if len(z) != expected:
            raise ValueError(f"adascale: re-running the model on {data.name!r} gave {len(z)} samples, but the "
                             f"outputs hold {expected}; pass outputs and model source of the same data")
        return as_float64(z), as_float64(moved)

    def _fit(self, train: Outputs) -> None:
        index = None
        if self.fit_samples is not None and self.fit_samples < len(train):
            index = np.sort(np.random.default_rng(self.seed).choice(len(train), self.fit_samples, replace=False))
        self.id_statistic_ = np.sort(self._shift_statistic(*self._rerun(train, index)))

    def percentiles(self, z: np.ndarray, moved: np.ndarray) -> np.ndarray:
        """Per-sample percentile ``p(x)`` of step 3."""
        cdf = np.searchsorted(self.id_statistic_, self._shift_statistic(z, moved), side="right")
        share = 1.0 - cdf / len(self.id_statistic_)
        return self.min_percentile + share * (self.max_percentile - self.min_percentile)

    def _score(self, x: Outputs) -> np.ndarray:
        z, moved = self._rerun(x)
        r = sum_ratio(np.maximum(z, 0.0), n_kept(z.shape[1], self.percentiles(z, moved)))
        if self.variant == "l":
            return energy(head_logits(z, x.head) * (r ** 2)[:, None])
        return energy(head_logits(z * np.exp(r)[:, None], x.head))
