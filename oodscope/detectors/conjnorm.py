"""ConjNorm: Bregman-divergence class densities with a tractable (importance-sampled) normaliser.

Peng, Luo, Zhang, Li & Wang, "ConjNorm: Tractable Density Estimation for Out-of-Distribution Detection",
ICLR 2024 (arXiv:2402.17888).

The class-conditional density is an exponential family written with a Bregman divergence,
``p(x | k) = exp(-D_psi(x, mu_k) / T) / Z_k``, with the conjugate pair of norms
``psi(x) = 1/2 ||x||_q^2`` and features scaled to unit ``p``-norm, ``1/p + 1/q = 1``.
Up to terms that are constant for a class (and cancel against ``Z_k``),

    -D_psi(x, mu_k) = -1/2 ||x||_q^2 + <x, grad psi(mu_k)>,   grad psi(mu) = sign(mu) |mu|^(q-1) / ||mu||_q^(q-2),

where ``mu_k`` is the class mean of the training features scaled to unit ``p``-norm. The partition function is
estimated without bias by importance sampling over the training features,
``Z_k ~ 1/N sum_i exp(-D_psi(x_i, mu_k) / T)``, and the ID score is the log density
``log sum_k exp(-D_psi(x, mu_k) / T) / Z_k``; we return its negative. The defaults ``p = 2.2, T = 0.05`` are the
authors' CIFAR-10 setting (the paper searches ``p`` per model on ID data). With ``p = 2`` the density is an
isotropic Gaussian mixture on the unit sphere, ``N(x; mu_k, T I) / Z_k`` (tested).

Everything is log-space (``logsumexp``) and chunked over samples, so large banks stay memory bounded.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from ..extraction.outputs import Need, Outputs
from ._classstats import class_stats, rows_per_chunk, n_classes_for
from .base import Detector


def p_normalize(x: np.ndarray, p: float, eps: float = 1e-10) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, ord=p, axis=1, keepdims=True) + eps)


def conjugate_exponent(p: float) -> float:
    return p / (p - 1.0)


def bregman_gradient(mu: np.ndarray, q: float, eps: float = 1e-10) -> np.ndarray:
    """Row-wise ``grad (1/2 ||mu||_q^2) = sign(mu) |mu|^(q-1) / ||mu||_q^(q-2)``."""
    norm = np.linalg.norm(mu, ord=q, axis=1, keepdims=True) + eps
    return np.sign(mu) * np.abs(mu) ** (q - 1.0) / norm ** (q - 2.0)


class ConjNorm(Detector):
    """``score(x) = -log sum_k exp(-D_psi(x, mu_k) / T) / Z_k`` (higher = more OOD)."""

    name = "conjnorm"
    needs = frozenset({Need.FEATURES, Need.LABELS})
    grid = {"p": [1.5, 1.8, 2.0, 2.2, 2.5, 3.0], "temperature": [0.01, 0.05, 0.1, 0.5]}

    def __init__(self, p: float = 2.2, temperature: float = 0.05, n_samples: int | None = None, seed: int = 0):
        self.p = p
        self.temperature = temperature
        self.n_samples = n_samples
        self.seed = seed

    def _check_params(self) -> None:
        if not (np.isfinite(self.p) and self.p > 1.0):
            raise ValueError(f"conjnorm: p must be > 1 (its conjugate q = p / (p - 1) must exist), got {self.p!r}")
        if not self.temperature > 0:
            raise ValueError(f"conjnorm: temperature must be > 0, got {self.temperature!r}")
        if self.n_samples is not None and not (isinstance(self.n_samples, (int, np.integer)) and self.n_samples >= 1):
            raise ValueError(f"conjnorm: n_samples (importance samples for Z_k) must be a positive integer or None, "
                             f"got {self.n_samples!r}")

    def _log_kernel(self, features: np.ndarray) -> np.ndarray:
        """``-D_psi(x, mu_k) / T`` up to per-class constants, for every row and class: (n, C)."""
        x = p_normalize(features, self.p)
        q = conjugate_exponent(self.p)
        half_norm = 0.5 * np.linalg.norm(x, ord=q, axis=1, keepdims=True) ** 2
        return (x @ self.gradients_.T - half_norm) / self.temperature

    def _fit(self, train: Outputs) -> None:
        n_classes = n_classes_for(train, self.name)
        stats = class_stats(train.features, train.labels, n_classes, self.name, covariance=False)
        self.prototypes_ = p_normalize(stats.means, self.p)
        self.gradients_ = bregman_gradient(self.prototypes_, conjugate_exponent(self.p))
        n = len(train)
        rows = np.arange(n)
        if self.n_samples is not None and self.n_samples < n:
            rows = np.sort(np.random.default_rng(self.seed).choice(n, self.n_samples, replace=False))
        # log Z_k = log mean_i exp(-D(x_i, mu_k) / T), accumulated chunk by chunk in log space
        log_z = np.full(n_classes, -np.inf)
        chunk = rows_per_chunk(max(train.features.shape[1], n_classes))
        for start in range(0, len(rows), chunk):
            block = self._log_kernel(train.features[rows[start:start + chunk]])
            log_z = np.logaddexp(log_z, logsumexp(block, axis=0))
        self.log_partition_ = log_z - np.log(len(rows))

    def _score(self, x: Outputs) -> np.ndarray:
        out = np.empty(len(x))
        chunk = rows_per_chunk(max(x.features.shape[1], len(self.gradients_)))
        for start in range(0, len(x), chunk):
            block = self._log_kernel(x.features[start:start + chunk])
            out[start:start + chunk] = -logsumexp(block - self.log_partition_, axis=1)
        return out
