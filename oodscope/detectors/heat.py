"""HEAT: hybrid energy-based model in the feature space (a trained residual correction of a prior density).

Lafon, Ramzi, Rambour & Thome, "Hybrid Energy Based Model in the Feature Space for Out-of-Distribution
Detection", ICML 2023 (arXiv:2305.16966).

For each prior density ``q`` on penultimate features ``z`` the hybrid energy is

    E(z) = E_theta(z) + E_q(z) / T_q,

with ``E_theta`` a small MLP (the residual) and ``E_q = -log q`` the prior energy:

* ``gmm`` (HEAT-GMM): the class-conditional Gaussian mixture with a tied covariance on L2-normalised features,
  ``E_q(z) = -log sum_c pi_c N(z; mu_c, Sigma)``, ``T_q = 1000``;
* ``el`` (HEAT-EL): the classifier's energy, ``E_q(z) = -log sum_k exp(W_k z + b_k)``, ``T_q = 1``.

``E_theta`` is trained post hoc on the cached features by maximum likelihood with contrastive divergence
``L = E_theta(z_real) - E_theta(z_gen) + lambda (E_theta(z_real)^2 + E_theta(z_gen)^2)``, where
``z_gen`` are SGLD samples of the hybrid model, ``z <- z - eta_t grad_z E(z) + sigma_t eps`` (``eta_t, sigma_t``
decay polynomially to a tenth of their start), started from the prior (GMM: samples of the mixture) or from
``N(0, I)`` (EL), projected on ``z >= 0`` (features are post-ReLU) and, for the GMM, on the unit sphere; the
initial points join the negatives, and real and generated points get ``N(0, 1e-4)`` jitter, as in the authors'
code. Per-prior hyperparameters follow the authors' CIFAR-10 configuration: SGLD steps 40 / 50, step size
``1e-4`` / ``1e-1``, noise ``5e-3`` / ``1e-1``, ``lambda = 10`` / ``0.1``, Adam ``lr = 1e-5``, ``betas = (0, 0.999)``.

The energies are composed as the sum of the per-prior energies, each standardised by its
mean and standard deviation on the training features. The paper's CIFAR composition also has a GMM on
std-pooled layer-4 maps, which the penultimate-feature cache does not hold.

**Deviation**: the last layer of ``E_theta`` starts at zero, so the untrained hybrid model is exactly the prior
and training only adds the residual correction (the authors' code uses PyTorch's default initialisation, whose
random output is larger than ``E_q / 1000`` and is only washed out by their long GPU schedule).

**Reduced CPU schedule**: the paper trains a 1024-wide, 4-hidden-layer MLP for 20 epochs (batch 1024 / 256)
on a GPU. Here the defaults are ``hidden_dim = 256``, ``n_hidden_layers = 2``, ``n_iter = 200`` updates of
batch 128, with ``lr = 1e-4``, a 10x larger step than the paper's to make up for ~100x fewer updates; all of
these, and ``sgld_steps``, are parameters. Training uses ``torch`` in float32 (imported lazily) and is seeded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._classstats import class_stats, n_classes_for
from .base import Detector

PRIORS = {
    # prior: temperature, SGLD steps, step size, noise, l2 coefficient, normalise features
    "gmm": dict(temperature=1e3, steps=40, step_size=1e-4, noise=5e-3, l2=10.0, normalize=True),
    "el": dict(temperature=1.0, steps=50, step_size=1e-1, noise=1e-1, l2=0.1, normalize=False),
}
DATA_JITTER = 1e-4


def _schedule(t: int, total: int, start: float, end: float, power: float = 2.0) -> float:
    return (start - end) * (1.0 - t / total) ** power + end


def _mlp(dim: int, hidden_dim: int, n_hidden_layers: int):
    """The residual energy network E_theta: ``dim`` -> ``hidden_dim`` (x ``1 + n_hidden_layers``) -> 1."""
    from torch import nn

    layers = [nn.Linear(dim, hidden_dim), nn.LeakyReLU(0.2)]
    for _ in range(n_hidden_layers):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Linear(hidden_dim, 1))


def _normal_like(z, generator):
    """Standard normal noise shaped like ``z``, drawn on the CPU ``generator`` and moved to ``z``'s device."""
    import torch

    return torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)


class _Energy:
    """Prior energy + MLP residual for one prior (torch tensors in, per-sample energies out)."""

    def __init__(self, prior: str, dim: int, hidden_dim: int, n_hidden_layers: int, stats, head):
        import torch

        self.prior, self.config = prior, PRIORS[prior]
        self.mlp = _mlp(dim, hidden_dim, n_hidden_layers)
        with torch.no_grad():           # start at the prior: E_theta = 0 before training (see module docstring)
            self.mlp[-1].weight.zero_()
            self.mlp[-1].bias.zero_()
        if prior == "gmm":
            covariance = stats.within + 1e-12 * np.eye(dim)
            cholesky = np.linalg.cholesky(covariance)
            self.cholesky = torch.from_numpy(cholesky).float()
            self.whitener = torch.from_numpy(np.linalg.inv(cholesky).T.copy()).float()  # (z - mu) @ whitener
            self.means = torch.from_numpy(stats.means).float()
            self.log_weights = torch.from_numpy(np.log(stats.counts / stats.counts.sum())).float()
        else:
            self.W = torch.from_numpy(np.asarray(head.W, dtype=np.float32))
            self.b = torch.from_numpy(np.asarray(head.b, dtype=np.float32))

    def to(self, device) -> "_Energy":
        """Move the network and the prior's tensors to ``device`` (training may run on a GPU; scoring runs on
        the CPU)."""
        self.mlp.to(device)
        for key in ("cholesky", "whitener", "means", "log_weights", "W", "b"):
            if hasattr(self, key):
                setattr(self, key, getattr(self, key).to(device))
        return self

    def project(self, z):
        import torch

        z = torch.relu(z)
        if self.config["normalize"]:
            z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return z

    def prior_energy(self, z):
        import torch

        if self.prior == "gmm":
            white = z @ self.whitener
            mw = self.means @ self.whitener
            squared = (white**2).sum(1, keepdim=True) - 2 * white @ mw.T + (mw**2).sum(1)
            return -torch.logsumexp(self.log_weights - 0.5 * squared, dim=1)
        return -torch.logsumexp(z @ self.W.T + self.b, dim=1)

    def energy(self, z):
        return self.mlp(z).view(-1) + self.prior_energy(z) / self.config["temperature"]

    def sample_prior(self, n: int, generator):
        import torch

        # drawn on the CPU generator (the same draws on every device), then moved
        if self.prior == "gmm":
            classes = torch.multinomial(self.log_weights.exp().cpu(), n, replacement=True, generator=generator)
            eps = torch.randn(n, self.means.shape[1], generator=generator).to(self.means.device)
            return self.means[classes.to(self.means.device)] + eps @ self.cholesky.T
        return torch.randn(n, self.W.shape[1], generator=generator).to(self.W.device)

    def sgld(self, z, steps: int, generator):
        import torch

        cfg = self.config
        for p in self.mlp.parameters():
            p.requires_grad_(False)
        for t in range(steps):
            z = z.detach().requires_grad_(True)
            grad = torch.autograd.grad(self.energy(z).sum(), [z])[0]
            step = _schedule(t, steps, cfg["step_size"], cfg["step_size"] * 0.1)
            noise = _schedule(t, steps, cfg["noise"], cfg["noise"] * 0.1)
            z = self.project(z - step * grad - noise * _normal_like(z, generator))
        for p in self.mlp.parameters():
            p.requires_grad_(True)
        return z.detach()


class HEAT(Detector):
    """``score(x) = sum_q standardised(E_theta_q(z) + E_q(z) / T_q)`` over the priors (higher = more OOD)."""

    name = "heat"
    needs = frozenset({Need.FEATURES, Need.LABELS, Need.HEAD})
    trains_network = True
    grid = {"n_iter": [100, 200, 500, 1000]}

    def __init__(self, priors: Sequence[str] = ("gmm", "el"), hidden_dim: int = 256, n_hidden_layers: int = 2,
                 n_iter: int = 200, batch_size: int = 128, lr: float = 1e-4, sgld_steps: int | None = None,
                 seed: int = 0, device: str = "cpu"):
        self.priors = priors
        self.hidden_dim = hidden_dim
        self.n_hidden_layers = n_hidden_layers
        self.n_iter = n_iter
        self.batch_size = batch_size
        self.lr = lr
        self.sgld_steps = sgld_steps
        self.seed = seed
        self.device = device  # where the energy networks train; scores are computed on the CPU

    def _check_params(self) -> None:
        priors = [self.priors] if isinstance(self.priors, str) else list(self.priors)
        unknown = [p for p in priors if p not in PRIORS]
        if not priors or unknown:
            raise ValueError(f"heat: priors must be a non-empty subset of {sorted(PRIORS)}, got {self.priors!r}")
        for key in ("hidden_dim", "n_iter", "batch_size"):
            value = getattr(self, key)
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                raise ValueError(f"heat: {key} must be a positive integer, got {value!r}")
        if not (isinstance(self.n_hidden_layers, (int, np.integer)) and self.n_hidden_layers >= 0):
            raise ValueError(f"heat: n_hidden_layers must be an integer >= 0, got {self.n_hidden_layers!r}")
        if self.sgld_steps is not None and not (isinstance(self.sgld_steps, (int, np.integer)) and self.sgld_steps >= 0):
            raise ValueError(f"heat: sgld_steps must be an integer >= 0 or None (paper's), got {self.sgld_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"heat: lr must be > 0, got {self.lr!r}")

    def _prior_list(self) -> list[str]:
        return [self.priors] if isinstance(self.priors, str) else list(self.priors)

    def _fit(self, train: Outputs) -> None:
        import torch

        from ..extraction.extract import resolve_device

        device = resolve_device(self.device)
        n_classes = n_classes_for(train, self.name)
        features = np.asarray(train.features, dtype=np.float64)
        normalized = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        generator = torch.Generator().manual_seed(int(self.seed))
        self.energies_, self.losses_ = {}, {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            for prior in self._prior_list():
                data = normalized if PRIORS[prior]["normalize"] else features
                stats = class_stats(data, train.labels, n_classes, self.name) if prior == "gmm" else None
                energy = _Energy(prior, data.shape[1], self.hidden_dim, self.n_hidden_layers, stats, train.head)
                energy.to(device)
                self.losses_[prior] = self._train(energy, torch.from_numpy(data.astype(np.float32)).to(device),
                                                  generator)
                self.energies_[prior] = energy.to("cpu")
        # standardisation of each energy on (a subsample of) the training features
        rows = np.random.default_rng(self.seed).choice(len(features), min(len(features), 10000), replace=False)
        raw = self._raw_energies(features[rows])
        self.offsets_ = {k: float(v.mean()) for k, v in raw.items()}
        self.scales_ = {k: float(max(v.std(), 1e-12)) for k, v in raw.items()}

    def _init_networks(self) -> None:
        """Re-create the networks (architecture only) for :func:`oodscope.persistence.load`."""
        for energy in self.energies_.values():
            energy.mlp = _mlp(self.input_dims_["features"][0], self.hidden_dim, self.n_hidden_layers)

    def _train(self, energy: _Energy, data, generator) -> list[float]:
        import torch

        cfg = energy.config
        steps = cfg["steps"] if self.sgld_steps is None else int(self.sgld_steps)
        optimizer = torch.optim.Adam(energy.mlp.parameters(), lr=self.lr, betas=(0.0, 0.999))
        batch = min(self.batch_size, len(data))
        losses = []
        from tqdm.auto import tqdm

        bar = tqdm(range(self.n_iter), desc=f"{self.name} {energy.prior}", unit="step", leave=False, disable=None)
        for _ in bar:
            real = data[torch.randint(len(data), (batch,), generator=generator).to(data.device)]
            init = energy.project(energy.sample_prior(batch, generator))
            generated = torch.cat([energy.sgld(init, steps, generator), init])
            jitter = lambda z: z + DATA_JITTER * _normal_like(z, generator)
            e_real, e_gen = energy.mlp(jitter(real)).view(-1), energy.mlp(jitter(generated)).view(-1)
            loss = e_real.mean() - e_gen.mean() + cfg["l2"] * (e_real.pow(2).mean() + e_gen.pow(2).mean())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
        bar.close()
        return losses

    def _raw_energies(self, features: np.ndarray, chunk: int = 16384) -> dict[str, np.ndarray]:
        import torch

        out = {k: np.empty(len(features)) for k in self.energies_}
        with torch.no_grad():
            for start in range(0, len(features), chunk):
                block = np.asarray(features[start:start + chunk], dtype=np.float64)
                unit = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
                for prior, energy in self.energies_.items():
                    z = torch.from_numpy((unit if PRIORS[prior]["normalize"] else block).astype(np.float32))
                    out[prior][start:start + chunk] = energy.energy(z).numpy()
        return out

    def component_scores(self, x: Outputs | np.ndarray) -> dict[str, np.ndarray]:
        """The hybrid energy of each prior separately (HEAT-GMM, HEAT-EL), not standardised."""
        from ..extraction.outputs import as_outputs

        return self._raw_energies(as_outputs(x).features)

    def _score(self, x: Outputs) -> np.ndarray:
        raw = self._raw_energies(x.features)
        return sum((raw[k] - self.offsets_[k]) / self.scales_[k] for k in raw)
