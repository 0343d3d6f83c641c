"""Non-linear invariants: a volume-preserving network that maps the ID features onto coordinates that stay zero.

Doorenbos, Sznitman & Márquez-Neila, "Learning Non-Linear Invariants for Unsupervised Out-of-Distribution
Detection", ECCV 2024. An invertible, volume-preserving network ``f`` (``det df/dx = 1``: ``num_layers`` pairs of
a rotation ``x -> Q x + b``, ``Q = exp(A - A^T)`` with ``A`` strictly upper triangular, and an additive coupling
``x_1 <- x_1 + MLP(x_2)`` (NICE), then a last rotation) is trained on the ID features so that its last ``m`` output
coordinates are invariants, constant (zero) on ID data; volume preservation keeps it from collapsing everything.
With ``z = f(x)`` and ``z_inv`` its last ``m`` coordinates, each mini-batch takes two Adam steps (the authors'
code), on

    ``L_inv = mean_j z_inv,j^2``  and  ``L_rec = || f^{-1}([z_{1..D-m}, 0]) - x ||^2 / D``  (``z`` detached),

the second asking that the non-invariant coordinates alone reconstruct ``x``. ``m = D - n_0`` with ``n_0`` the
number of principal components that explain 95 % of the training variance. The score adds the normalised
deviation from the invariants and a ``k``-NN term on the raw features (``k = 2``, sum of squared distances; the
training bank excludes each point itself),

    ``S(x) = sum_j z_inv,j(x)^2 / mean_train(z_inv,j^2) + m * kNN(x) / mean_train(kNN)``  (higher = more OOD).

Inputs are features (the paper: ImageNet-pretrained ResNet-18 layer 2-4 features, one network per layer, the
layer-4 ones L2-normalised; here one feature matrix, L2-normalised when ``normalize``, then centred). Defaults from
the authors' ``params.yml``: 4 layers, MLP widths ``[1, 1, 1, 1] x`` its input, 5 epochs, batch 64, Adam lr 1e-4
decaying linearly to 1e-5.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..detectors._common import l2_normalize
from ..detectors.anomaly._base import AnomalyDetector, NeighbourBank, check_int, check_training, seeded
from ..extraction.outputs import Outputs

VARIANCE_KEPT = 0.95


def number_of_invariants(features: np.ndarray, kept: float = VARIANCE_KEPT) -> int:
    """``m = D - n_0``, ``n_0`` the fewest principal components whose explained variance exceeds ``kept``."""
    centred = features - features.mean(axis=0)
    variances = np.linalg.svd(centred, compute_uv=False) ** 2
    share = np.cumsum(variances) / variances.sum()
    n_0 = int(np.searchsorted(share, kept, side="right")) + 1
    return max(0, features.shape[1] - min(n_0, features.shape[1]))


def volume_preserving_net(dims: int, layers: int, widths: tuple[float, ...]):
    """The network of the module docstring (``torch.nn.Module`` with ``forward`` and ``inverse``)."""
    import torch
    from torch import nn

    class Rotation(nn.Module):
        def __init__(self):
            super().__init__()
            self.upper = nn.Parameter(torch.randn(dims, dims) * 0.01)
            self.shift = nn.Parameter(torch.zeros(dims))

        def matrix(self) -> torch.Tensor:
            upper = torch.triu(self.upper, diagonal=1)
            return torch.matrix_exp(upper - upper.T)

        def forward(self, x):
            return x @ self.matrix().T + self.shift

        def inverse(self, y):
            return (y - self.shift) @ self.matrix()

    class AdditiveCoupling(nn.Module):
        def __init__(self):
            super().__init__()
            self.half = dims // 2
            inputs = dims - self.half
            sizes = [inputs] + [max(1, int(round(w * inputs))) for w in widths]
            blocks: list[nn.Module] = []
            for a, b in zip(sizes[:-1], sizes[1:]):
                blocks += [nn.Linear(a, b), nn.ReLU()]
            self.mlp = nn.Sequential(*blocks, nn.Linear(sizes[-1], self.half))

        def forward(self, x):
            return torch.cat([x[:, :self.half] + self.mlp(x[:, self.half:]), x[:, self.half:]], dim=1)

        def inverse(self, y):
            return torch.cat([y[:, :self.half] - self.mlp(y[:, self.half:]), y[:, self.half:]], dim=1)

    class VolumePreserving(nn.Module):
        def __init__(self):
            super().__init__()
            parts: list[nn.Module] = []
            for _ in range(layers):
                parts += [Rotation(), AdditiveCoupling()]
            self.parts = nn.ModuleList(parts + [Rotation()])

        def forward(self, x):
            for part in self.parts:
                x = part(x)
            return x

        def inverse(self, z):
            for part in reversed(self.parts):
                z = part.inverse(z)
            return z

    return VolumePreserving()


class NonLinearInvariants(AnomalyDetector):
    """``S(x) = sum_j z_inv,j^2 / E_train[z_inv,j^2] + m kNN(x) / E_train[kNN]`` (module docstring)."""

    name = "nl_invariants"
    family: ClassVar[str] = "generative"
    trains_network = True

    def __init__(self, layers: int = 4, widths: tuple[float, ...] = (1, 1, 1, 1), k: int = 2,
                 normalize: bool = True, epochs: int = 5, batch_size: int = 64, lr: float = 1e-4, seed: int = 0,
                 device: str = "cpu"):
        self.layers = layers
        self.widths = widths
        self.k = k
        self.normalize = normalize
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        check_training(self.name, self.epochs, self.batch_size, self.lr)
        check_int(self.name, "layers", self.layers)
        check_int(self.name, "k", self.k)
        if not self.widths or any(not float(w) > 0 for w in self.widths):
            raise ValueError(f"{self.name}: widths must be positive multiples of the MLP input, got {self.widths!r}")

    def _prepared(self, features: np.ndarray) -> np.ndarray:
        values = l2_normalize(features) if self.normalize else np.asarray(features, dtype=np.float64)
        return values - self.mean_

    def _init_networks(self) -> None:
        self.network_ = volume_preserving_net(self.input_dims_["features"][0], int(self.layers), tuple(self.widths))

    def _fit(self, train: Outputs) -> None:
        raw = self._x(train).astype(np.float64)
        if len(raw) <= int(self.k):
            raise ValueError(f"{self.name}: {len(raw)} training rows; the k-NN term needs more than k={self.k}")
        self.mean_ = (l2_normalize(raw) if self.normalize else raw).mean(axis=0)
        x = self._prepared(raw)
        self.invariants_ = number_of_invariants(x)
        if self.invariants_ == 0:
            raise ValueError(f"{self.name}: 95 % of the training variance needs all {x.shape[1]} dimensions, so "
                             "there is no invariant to learn (the features have no low-variance directions)")
        with seeded(self.seed) as generator:
            self.network_ = volume_preserving_net(x.shape[1], int(self.layers), tuple(self.widths))
            self.loss_history_ = self._train(x, generator)
        z = self._invariant_coordinates(x)
        self.invariant_scale_ = np.maximum((z ** 2).mean(axis=0), np.finfo(np.float64).tiny)
        self.bank_ = NeighbourBank(raw.astype(np.float32), who=self.name)
        distances, _ = self.bank_.search(raw.astype(np.float32), int(self.k) + 1)
        self.knn_scale_ = max(float(distances[:, 1:].sum(axis=1).mean()), np.finfo(np.float64).tiny)

    def _train(self, x: np.ndarray, generator) -> list[float]:
        import torch
        from tqdm.auto import tqdm

        from ..extraction.extract import resolve_device

        target = resolve_device(self.device)
        data = torch.from_numpy(x.astype(np.float32))
        net = self.network_.to(target).train()
        optimiser = torch.optim.Adam(net.parameters(), lr=float(self.lr))
        steps = int(self.epochs) * -(-len(data) // int(self.batch_size))
        schedule = torch.optim.lr_scheduler.LinearLR(optimiser, 1.0, 0.1, total_iters=steps)
        m, history = self.invariants_, []
        bar = tqdm(range(int(self.epochs)), desc=self.name, unit="epoch", leave=False, disable=None)
        try:
            for _ in bar:
                order, total = torch.randperm(len(data), generator=generator), 0.0
                for start in range(0, len(data), int(self.batch_size)):
                    batch = data[order[start:start + int(self.batch_size)]].to(target)
                    invariance = net(batch)[:, -m:].pow(2).mean()
                    optimiser.zero_grad()
                    invariance.backward()
                    optimiser.step()
                    with torch.no_grad():
                        z = net(batch)
                        z[:, -m:] = 0.0
                    reconstruction = (net.inverse(z) - batch).pow(2).mean()
                    optimiser.zero_grad()
                    reconstruction.backward()
                    optimiser.step()
                    schedule.step()
                    if not (torch.isfinite(invariance) and torch.isfinite(reconstruction)):
                        raise FloatingPointError(f"{self.name}: the loss diverged; lower lr (now {self.lr})")
                    total += float(invariance.detach()) * len(batch)
                history.append(total / len(data))
                bar.set_postfix(invariance=f"{history[-1]:.4g}")
        finally:
            bar.close()
            net.to("cpu").eval()
        return history

    def _invariant_coordinates(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            z = self.network_(torch.from_numpy(x.astype(np.float32)))
        return z[:, -self.invariants_:].double().numpy()

    def _score(self, x: Outputs) -> np.ndarray:
        raw = self._x(x).astype(np.float64)
        z = self._invariant_coordinates(self._prepared(raw))
        distances, _ = self.bank_.search(raw.astype(np.float32), int(self.k))
        knn = distances.sum(axis=1) / self.knn_scale_
        return (z ** 2 / self.invariant_scale_).sum(axis=1) + self.invariants_ * knn
