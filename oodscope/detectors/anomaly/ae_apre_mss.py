"""Probabilistic autoencoder with the adjustable probabilistic reconstruction error (APRE) and mean-shift scoring (MSS).

Tan, Yang, Chen, Rahardja & Rahardja, "Improving Autoencoder-based Outlier Detection with Adjustable Probabilistic
Reconstruction Error and Mean-shift Outlier Scoring", arXiv:2304.00709 (v1, 2023; journal version "MSS-PAE: Saving
Autoencoder-based Outlier Detection from Unexpected Reconstruction", Pattern Recognition 2025).

* **PAE.** The decoder outputs, per input dimension ``d``, a mean ``mu_d(x)`` and a variance
  ``sigma^2_d(x) = softplus(raw_d(x)) + 1e-5`` (aleatoric "judgment uncertainty").
* **PRE** (training loss): the Gaussian negative log-likelihood up to constants,
  ``PRE(x) = sum_d (x_d - mu_d(x))^2 / sigma^2_d(x) + sum_d log sigma^2_d(x)``.
* **APRE** (the score): two weights trade reconstruction bias against uncertainty,
  ``APRE(x, t) = alpha sum_d (t_d - mu_d(x))^2 / sigma^2_d(x) + beta sum_d log sigma^2_d(x)``;
  ``alpha = beta = 1`` is PRE (= ``2 NLL - D log 2 pi``). Defaults ``alpha = 0.5``, ``beta = 2`` (the authors'
  ``run_main`` defaults).
* **MSS**: instead of comparing the reconstruction with ``x`` itself, compare it with the *mean-shifted* ``x``: one
  shift replaces a point by the mean of itself and its ``k - 1`` nearest training rows,
  ``x^(t) = (x^(t-1) + sum_{j in N_{k-1}(x^(t-1))} z_j^(t-1)) / k``, where the training rows ``z^(t-1)`` have been
  shifted ``t - 1`` times themselves (each training row replaced by the mean of its ``k`` nearest, itself included).
  The score is ``APRE(x, x^(m))`` after ``m = shifts`` shifts: an outlier that the autoencoder reconstructs
  unexpectedly well is still pulled towards its (distant) neighbours, so its target moves away from the
  reconstruction; inliers barely move. ``shifts = 0`` is plain APRE scoring.

Training follows the authors' code: full-batch Adam (``lr = 1e-3``, step decay x0.5 every 1000 steps), PRE loss,
``epochs = 1000``; the encoder/decoder widths depend on the input dimension ``D`` (``D < 20``: ``D -> D/2 -> 2D``;
``20 <= D < 100``: ``D -> D/2 -> D/4 -> D/2 -> 2D``; ``100 <= D < 200``: three layers down to ``D/8``; above: ``D/16``),
ReLU, linear output. The authors pick ``k in [2, 100]``, ``m in {1, 2, 3}``, the training epoch and the best of 20
initialisations by AUROC on *labelled* validation data; an unsupervised detector cannot, so we use one seeded network,
the last epoch, and ``k = 10``, ``m = 1`` by default (``grid`` holds the authors' search range for tuning).
"""

from __future__ import annotations

import numpy as np

from ...extraction.outputs import Outputs
from ._base import AnomalyDetector, NeighbourBank, check_int, check_neighbours, check_training, predict_in_blocks, seeded

VARIANCE_FLOOR = 1e-5  # added to softplus(raw) as in the authors' loss


def layer_sizes(dim: int) -> tuple[list[int], list[int]]:
    """Encoder sizes (input ... latent) and decoder sizes (latent ... 2 * dim) of the authors' PAE for ``dim`` inputs."""
    if dim < 20:
        encoder, latent = [dim], round(dim / 2)
    elif dim < 100:
        encoder, latent = [dim, round(dim / 2)], round(dim / 4)
    elif dim < 200:
        encoder, latent = [dim, round(dim / 2), round(dim / 4)], round(dim / 8)
    else:
        encoder, latent = [dim, round(dim / 2), round(dim / 4)], round(dim / 16)
    latent = max(latent, 1)
    decoder = [latent, *reversed(encoder[1:]), 2 * dim]
    return [*encoder, latent], decoder


def _network(dim: int):
    import torch.nn as nn

    encoder, decoder = layer_sizes(dim)
    layers: list = []
    for a, b in zip(encoder[:-1], encoder[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    for i, (a, b) in enumerate(zip(decoder[:-1], decoder[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(decoder) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def apre(mu: np.ndarray, variance: np.ndarray, target: np.ndarray, alpha: float = 0.5, beta: float = 2.0) -> np.ndarray:
    """``alpha sum_d (t_d - mu_d)^2 / var_d + beta sum_d log var_d`` per row (``variance`` already floored)."""
    mu, variance, target = (np.asarray(a, dtype=np.float64) for a in (mu, variance, target))
    return alpha * ((target - mu) ** 2 / variance).sum(axis=-1) + beta * np.log(variance).sum(axis=-1)


def shift_levels(train: np.ndarray, k: int, shifts: int) -> list[np.ndarray]:
    """The training rows shifted ``0 .. shifts - 1`` times (each row -> mean of its ``k`` nearest, itself included)."""
    levels = [np.asarray(train, dtype=np.float64)]
    for _ in range(1, shifts):
        current = levels[-1]
        _, neighbours = NeighbourBank(current).search(current, k)
        levels.append(current[neighbours].mean(axis=1))
    return levels


def mean_shift(levels: list[np.ndarray], queries: np.ndarray, k: int, banks: list | None = None) -> np.ndarray:
    """``len(levels)`` mean shifts of ``queries``: shift ``t`` averages the query with its ``k - 1`` nearest rows of
    ``levels[t - 1]`` (the training rows shifted ``t - 1`` times)."""
    shifted = np.asarray(queries, dtype=np.float64)
    banks = banks if banks is not None else [NeighbourBank(level) for level in levels]
    for level, bank in zip(levels, banks):
        _, neighbours = bank.search(shifted, k - 1)
        shifted = (shifted + level[neighbours].sum(axis=1)) / k
    return shifted


class AutoencoderAPREMSS(AnomalyDetector):
    """Probabilistic autoencoder scored with APRE against the mean-shifted input (see module docstring)."""

    name = "ae_apre_mss"
    trains_network = True
    grid = {"k": [2, 5, 10, 20, 50, 100], "shifts": [0, 1, 2, 3], "alpha": [0.5, 1.0], "beta": [1.0, 2.0]}

    def __init__(self, alpha: float = 0.5, beta: float = 2.0, k: int = 10, shifts: int = 1, epochs: int = 1000,
                 lr: float = 1e-3, seed: int = 0, device: str = "cpu"):
        self.alpha = alpha
        self.beta = beta
        self.k = k
        self.shifts = shifts
        self.epochs = epochs
        self.lr = lr
        self.seed = seed
        self.device = device  # where the autoencoder trains; scores are computed on the CPU

    def _check_params(self) -> None:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.number)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"{self.name}: {name} must be a finite number >= 0, got {value!r}")
        if self.alpha == 0 and self.beta == 0:
            raise ValueError(f"{self.name}: alpha and beta are both 0, the score would be constant")
        check_int(self.name, "k", self.k, minimum=2)
        check_int(self.name, "shifts", self.shifts, minimum=0)
        check_training(self.name, self.epochs, 1, self.lr)

    def _fit(self, train: Outputs) -> None:
        import torch
        import torch.nn.functional as F
        from tqdm.auto import tqdm

        from ...extraction.extract import resolve_device

        device = resolve_device(self.device)
        X = self._x(train)
        if self.shifts:
            check_neighbours(self.name, self.k, len(X))
        with seeded(self.seed):
            network = _network(X.shape[1]).to(device)
            data = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(device)
            optimizer = torch.optim.Adam(network.parameters(), lr=self.lr)
            schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1000, gamma=0.5)
            history = []
            network.train()
            bar = tqdm(range(self.epochs), desc=self.name, unit="epoch", leave=False, disable=None)
            for _ in bar:  # full batch, PRE loss (alpha = beta = 1), as the authors train
                optimizer.zero_grad()
                mu, raw = network(data).chunk(2, dim=1)
                variance = F.softplus(raw) + VARIANCE_FLOOR
                loss = (((data - mu) ** 2 / variance).sum(dim=1) + torch.log(variance).sum(dim=1)).mean()
                loss.backward()
                optimizer.step()
                schedule.step()
                history.append(float(loss.detach()))
                bar.set_postfix(loss=f"{history[-1]:.4g}", refresh=False)
            network.eval()
        self.network_ = network.cpu()
        self.loss_history_ = history
        self.levels_ = shift_levels(X, self.k, self.shifts) if self.shifts else []
        self.banks_ = [NeighbourBank(level) for level in self.levels_]

    def _init_networks(self) -> None:
        """Re-create the networks (architecture only) for :func:`oodscope.persistence.load`."""
        self.network_ = _network(self.input_dims_["features"][0])

    def reconstruct(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decoder mean and variance (``softplus + 1e-5``) for each row, float64."""
        out = predict_in_blocks(lambda b: self.network_(b), np.asarray(x))
        dim = out.shape[1] // 2
        return out[:, :dim], np.logaddexp(0.0, out[:, dim:]) + VARIANCE_FLOOR  # softplus

    def targets(self, x: np.ndarray) -> np.ndarray:
        """``x`` after ``shifts`` mean shifts (``x`` itself when ``shifts = 0``)."""
        x = np.asarray(x, dtype=np.float64)
        return mean_shift(self.levels_, x, self.k, self.banks_) if self.shifts else x

    def _score(self, x: Outputs) -> np.ndarray:
        X = self._x(x)
        mu, variance = self.reconstruct(X)
        return apre(mu, variance, self.targets(X), self.alpha, self.beta)

