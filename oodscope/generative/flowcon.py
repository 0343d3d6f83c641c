"""FlowCon: a normalising flow on the classifier's features, trained with a contrastive objective.

Aathreya & Canavan, "FlowCon: Out-of-Distribution Detection using Flow-Based Contrastive Learning", ECCV 2024.
The penultimate features ``x`` (standardised with the training mean and standard deviation here) go through a
RealNVP of ``blocks`` affine couplings with alternating halves, ``x_b <- (x_b + t(x_a)) exp(s(x_a))``,
``s = c tanh(.)`` (authors' code: ``RealNVPTabular``, 8 couplings, ``Linear(D, 256) - SiLU - Linear(256, 256) -
SiLU - Linear`` nets, the last layer zero). A head on the half the last coupling left unchanged predicts a
per-sample Gaussian ``(mu(z), sigma(z))`` in the latent space. With ``b_ij = log N(z_i; mu_j, sigma_j) / (D ln 2)``
(sample ``i`` under sample ``j``'s Gaussian) the loss of a mini-batch is, as in the authors' ``losses.py``,

    ``L = lambda L_nll + mean_i L_con,i``,  ``L_nll = -mean_i [ b_ii + log|det J_i| / (D ln 2) ]``,
    ``a_ij = tau (b_ij + b_ii)``,  ``e_ij = (exp(a_ij - max_k a_ik) + 1e-5) / tau_2``,
    ``L_con,i = -mean_{j in P(i)} [ e_ij - log sum_{k != i} exp(e_ik) ]``,

``P(i)`` the other samples of ``i``'s class, ``tau = 1.5``, ``tau_2 = 0.1``, ``lambda = 0.07`` (their
``LMBDA_MIN``; their NLL also carries a constant ``-D ln 32`` and averages the log-determinant over the batch,
neither of which changes the gradient). The score is the negative log-likelihood in bits/dim of a feature under
its own predicted Gaussian, ``-(b_ii + log|det J| / (D ln 2))`` (higher = more OOD). The authors train 701 epochs
with AdamW (lr 1e-5, weight decay 1e-5, batch 128); those are the defaults, and ``docs/generative.md`` states the
CPU schedule used for its numbers.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from ..detectors.anomaly._base import check_int, check_training, seeded
from ..detectors.base import Detector
from ..extraction.outputs import Need, Outputs


def tabular_flow(dims: int, blocks: int, hidden: int):
    """The flow and its Gaussian head (``torch.nn.Module``; ``forward(x) -> (z, log|det|, mu, log_sigma)``)."""
    import torch
    from torch import nn

    class Coupling(nn.Module):
        def __init__(self, parity: int):
            super().__init__()
            self.parity = parity
            self.kept = dims // 2 if parity == 0 else dims - dims // 2
            changed = dims - self.kept
            last = nn.Linear(hidden, 2 * changed)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.net = nn.Sequential(nn.Linear(self.kept, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                     last)
            self.scale = nn.Parameter(torch.ones(changed))

        def split(self, x):
            a, b = x[:, :dims // 2], x[:, dims // 2:]
            return (a, b) if self.parity == 0 else (b, a)

        def forward(self, x):
            kept, changed = self.split(x)
            s, t = self.net(kept).chunk(2, dim=1)
            s = self.scale * torch.tanh(s)
            changed = (changed + t) * torch.exp(s)
            parts = (kept, changed) if self.parity == 0 else (changed, kept)
            return torch.cat(parts, dim=1), s.sum(dim=1), kept

    class Flow(nn.Module):
        def __init__(self):
            super().__init__()
            self.couplings = nn.ModuleList(Coupling(i % 2) for i in range(blocks))
            self.head = nn.Linear(self.couplings[-1].kept, 2 * dims)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

        def forward(self, x):
            log_det = torch.zeros(len(x), dtype=x.dtype, device=x.device)
            for coupling in self.couplings:
                x, d, kept = coupling(x)
                log_det = log_det + d
            mu, log_sigma = self.head(kept).chunk(2, dim=1)
            return x, log_det, mu, log_sigma

    return Flow()


def pairwise_log_density(z, mu, log_sigma):
    """``B_ij = sum_d log N(z_i,d; mu_j,d, sigma_j,d)`` in nats, ``(N, N)``."""
    import torch

    inv = torch.exp(-log_sigma)  # (N, D) of the Gaussians j
    quad = ((z[:, None, :] - mu[None, :, :]) * inv[None, :, :]).pow(2).sum(dim=2)
    return -0.5 * quad - log_sigma.sum(dim=1)[None, :] - 0.5 * z.shape[1] * math.log(2 * math.pi)


def flowcon_loss(z, log_det, mu, log_sigma, labels, tau: float = 1.5, tau2: float = 0.1, lam: float = 0.07):
    """``(L, L_nll, L_con)`` of the module docstring for one mini-batch."""
    import torch

    bits = z.shape[1] * math.log(2.0)
    b = pairwise_log_density(z, mu, log_sigma) / bits
    own = torch.diagonal(b)
    nll = -(own + log_det / bits).mean()
    a = tau * (b + own[:, None])
    e = (torch.exp(a - a.max(dim=1, keepdim=True).values) + 1e-5) / tau2
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_norm = torch.logsumexp(e.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    counts = positives.sum(dim=1)
    has = counts > 0
    contrast = -((e - log_norm) * positives).sum(dim=1)[has] / counts[has]
    con = contrast.mean() if bool(has.any()) else torch.zeros((), device=z.device)
    return lam * nll + con, nll, con


class FlowCon(Detector):
    """``score(x) = -log2 N(f(x); mu(f(x)), sigma(f(x))) / D - log2|det J| / D`` (module docstring)."""

    name = "flowcon"
    family: ClassVar[str] = "generative"
    needs = frozenset({Need.FEATURES, Need.LABELS})
    trains_network = True

    def __init__(self, blocks: int = 8, hidden: int = 256, tau: float = 1.5, tau2: float = 0.1, lam: float = 0.07,
                 epochs: int = 701, batch_size: int = 128, lr: float = 1e-5, weight_decay: float = 1e-5,
                 seed: int = 0, device: str = "cpu"):
        self.blocks = blocks
        self.hidden = hidden
        self.tau = tau
        self.tau2 = tau2
        self.lam = lam
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        check_training(self.name, self.epochs, self.batch_size, self.lr)
        check_int(self.name, "blocks", self.blocks, minimum=2)
        check_int(self.name, "hidden", self.hidden)
        for name in ("tau", "tau2"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{self.name}: {name} must be > 0, got {getattr(self, name)!r}")
        if not float(self.lam) >= 0:
            raise ValueError(f"{self.name}: lam must be >= 0, got {self.lam!r}")

    def _init_networks(self) -> None:
        self.network_ = tabular_flow(self.input_dims_["features"][0], int(self.blocks), int(self.hidden))

    def _standardised(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, dtype=np.float64) - self.mean_) / self.std_).astype(np.float32)

    def _fit(self, train: Outputs) -> None:
        features, labels = np.asarray(train.features, dtype=np.float64), np.asarray(train.labels)
        if features.shape[1] < 2:
            raise ValueError(f"{self.name}: a coupling flow needs features of at least 2 dimensions, got "
                             f"{features.shape[1]}")
        if np.bincount(labels).max() < 2:
            raise ValueError(f"{self.name}: the contrastive loss needs at least 2 training samples of some class")
        self.mean_ = features.mean(axis=0)
        self.std_ = np.maximum(features.std(axis=0), 1e-8)
        with seeded(self.seed) as generator:
            self.network_ = tabular_flow(features.shape[1], int(self.blocks), int(self.hidden))
            self.loss_history_ = self._train(self._standardised(features), labels, generator)

    def _train(self, x: np.ndarray, labels: np.ndarray, generator) -> list[float]:
        import torch
        from tqdm.auto import tqdm

        from ..extraction.extract import resolve_device

        target = resolve_device(self.device)
        data, classes = torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))
        net = self.network_.to(target).train()
        optimiser = torch.optim.AdamW(net.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
        history = []
        bar = tqdm(range(int(self.epochs)), desc=self.name, unit="epoch", leave=False, disable=None)
        try:
            for _ in bar:
                order, total = torch.randperm(len(data), generator=generator), 0.0
                for start in range(0, len(data), int(self.batch_size)):
                    rows = order[start:start + int(self.batch_size)]
                    if len(rows) < 2:
                        continue
                    loss, _, _ = flowcon_loss(*net(data[rows].to(target)), classes[rows].to(target),
                                              float(self.tau), float(self.tau2), float(self.lam))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"{self.name}: the loss diverged; lower lr (now {self.lr})")
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    total += float(loss.detach()) * len(rows)
                history.append(total / len(data))
                bar.set_postfix(loss=f"{history[-1]:.4g}")
        finally:
            bar.close()
            net.to("cpu").eval()
        return history

    def _score(self, x: Outputs) -> np.ndarray:
        import torch

        data = torch.from_numpy(self._standardised(x.features))
        out = []
        with torch.no_grad():
            for start in range(0, len(data), 4096):
                z, log_det, mu, log_sigma = self.network_(data[start:start + 4096])
                own = (-0.5 * ((z - mu) * torch.exp(-log_sigma)).pow(2) - log_sigma
                       - 0.5 * math.log(2 * math.pi)).sum(dim=1)
                out.append((-(own + log_det) / (z.shape[1] * math.log(2.0))).double().numpy())
        return np.concatenate(out)
