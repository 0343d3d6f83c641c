"""DTE-NP: non-parametric diffusion time estimation.

Livernoche, Jain, Hezaveh & Ravanbakhsh, "On Diffusion Modeling for Anomaly Detection", ICLR 2024, Sec. 4.1.
A variance-exploding diffusion ``x_t = x_0 + sigma_t eps`` with the DDPM schedule ``beta_t`` linear in
``[1e-4, 0.01]`` over ``T = 300`` steps, ``sigma_t^2 = 1 - prod_{s<=t} (1 - beta_s)``. Treating a test point as a
noisy training point, the posterior over the diffusion variance is approximately inverse-gamma,
``p(sigma_t^2 | x) ~ InvGamma(alpha = d/2 - 1, beta = ||x - x_0||^2 / 2)`` (Eq. 9), with ``||x - x_0||^2``
estimated by the mean squared distance to the ``k = 5`` nearest training rows. The anomaly score is the diffusion
time of the posterior mode on the grid of the ``T`` steps (``statistic="mode"``, as in the authors' code), or
the posterior mean time (``statistic="mean"``). Needs ``d >= 3`` columns (``alpha > 0``).
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from ...extraction.outputs import Outputs
from ._base import AnomalyDetector, NeighbourBank, check_int, check_neighbours
from .._sharded_index import check_shards


def variance_schedule(T: int, beta_start: float = 1e-4, beta_end: float = 0.01) -> np.ndarray:
    """``sigma_t^2 = 1 - prod_{s<=t}(1 - beta_s)`` for the linear DDPM schedule (float64, length T)."""
    betas = np.linspace(beta_start, beta_end, T)
    return 1.0 - np.cumprod(1.0 - betas)


def inverse_gamma_time_posterior(mean_squared: np.ndarray, dim: int, variances: np.ndarray) -> np.ndarray:
    """Normalised log posterior over the steps, ``log InvGamma(sigma_t^2; d/2 - 1, m/2)``, shape (N, T)."""
    a = 0.5 * dim - 1.0
    b = 0.5 * mean_squared[:, None]
    log_density = -(a + 1.0) * np.log(variances)[None, :] - b / variances[None, :]  # terms that depend on t
    return log_density - logsumexp(log_density, axis=1, keepdims=True)


class DTENonParametric(AnomalyDetector):
    """Diffusion time of the inverse-gamma posterior built from the k nearest training distances."""

    name = "dte_np"
    grid = {"k": [1, 5, 10, 20]}

    def __init__(self, k: int = 5, T: int = 300, statistic: str = "mode", shards: int = 1):
        self.k = k
        self.T = T
        self.statistic = statistic
        self.shards = shards

    def _check_params(self) -> None:
        check_int(self.name, "k", self.k)
        check_shards(self.name, self.shards)
        check_int(self.name, "T", self.T, minimum=2)
        if self.statistic not in ("mode", "mean"):
            raise ValueError(f"{self.name}: statistic must be 'mode' or 'mean', got {self.statistic!r}")

    def _fit(self, train: Outputs) -> None:
        dim = train.features.shape[1]
        if dim < 3:
            raise ValueError(f"{self.name}: the inverse-gamma posterior needs at least 3 columns (alpha = d/2 - 1 > 0),"
                             f" got {dim}; use knn_distance for 1- or 2-d data")
        check_neighbours(self.name, self.k, len(train))
        self.bank_ = NeighbourBank(self._x(train), shards=self.shards, who=self.name)
        self.variances_ = variance_schedule(self.T)

    def _score(self, x: Outputs) -> np.ndarray:
        squared, _ = self.bank_.search(self._x(x), self.k)
        log_post = inverse_gamma_time_posterior(squared.mean(axis=1), self.bank_.dim, self.variances_)
        if self.statistic == "mode":
            return np.argmax(log_post, axis=1).astype(np.float64)
        return np.exp(log_post) @ np.arange(self.T, dtype=np.float64)
