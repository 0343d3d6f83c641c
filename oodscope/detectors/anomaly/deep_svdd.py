"""Deep SVDD, one-class objective.

Ruff, Vandermeulen, Görnitz, Deecke, Siddiqui, Binder, Müller & Kloft, "Deep One-Class Classification", ICML 2018.
A network ``phi`` without bias terms (Prop. 2: biases allow the trivial constant solution) maps the training rows
close to a fixed centre ``c``: ``min_W 1/n sum_i ||phi(x_i; W) - c||^2 + lambda/2 sum ||W||^2`` (Eq. 4), with
``c`` the mean of the initial network outputs and coordinates ``|c_j| < eps = 0.1`` pushed to ``+-eps`` (as in
the authors' code). The anomaly score is ``s(x) = ||phi(x) - c||^2`` (Eq. 5). The paper's optimiser is Adam
with ``lr = 1e-4`` and weight decay ``lambda = 1e-6`` (batch size 200); we keep its learning rate (also PyOD
3.x's default) and, for tabular rows, the MLP of PyOD and ADBench (the baselines of the DTE paper): bias-free
``64 -> 32`` with leaky ReLU, 100 epochs, batch 32. (No autoencoder pre-training.) The learning rate matters: on
ADBench WDBC (70/30 split, min-max scaled, seeds 1-3) ``lr = 1e-3`` collapses the hypersphere (AUROC 57.0) where
the paper's ``1e-4`` gives 96.6 (``benchmarks/adbench_vs_pyod.py --protocol adbench --neural``).
"""

from __future__ import annotations

import numpy as np

from ...extraction.outputs import Outputs
from ._base import AnomalyDetector, check_hidden, check_training, predict_in_blocks, seeded, train_minibatches


def bias_free_mlp(n_features: int, hidden: tuple[int, ...]):
    import torch.nn as nn

    sizes = [n_features, *hidden]
    layers: list = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=False))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU())
    return nn.Sequential(*layers)


def initial_centre(network, X: np.ndarray, eps: float = 0.1) -> np.ndarray:
    """Mean initial output, coordinates closer than ``eps`` to zero moved to ``+-eps``."""
    centre = predict_in_blocks(network, X).mean(axis=0)
    centre[(np.abs(centre) < eps) & (centre < 0)] = -eps
    centre[(np.abs(centre) < eps) & (centre >= 0)] = eps
    return centre


class DeepSVDDBase(AnomalyDetector):
    """Shared network, centre and scoring of Deep SVDD and Deep SAD."""

    trains_network = True

    def __init__(self, hidden: tuple[int, ...] = (64, 32), epochs: int = 100, batch_size: int = 32,
                 lr: float = 1e-4, weight_decay: float = 1e-6, seed: int = 0, device: str = "cpu"):
        self.hidden = hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed
        self.device = device  # where the network trains; scores are computed on the CPU

    def _check_params(self) -> None:
        check_training(self.name, self.epochs, self.batch_size, self.lr)
        check_hidden(self.name, self.hidden)

    def _init_networks(self) -> None:
        """Re-create the networks (architecture only) for :func:`oodscope.persistence.load`."""
        self.network_ = bias_free_mlp(self.input_dims_["features"][0], tuple(self.hidden))

    def _score(self, x: Outputs) -> np.ndarray:
        import torch

        centre = torch.from_numpy(self.centre_).float()
        return predict_in_blocks(lambda b: ((self.network_(b) - centre) ** 2).sum(dim=1), x.features)


class DeepSVDD(DeepSVDDBase):
    """One-class Deep SVDD: ``score(x) = ||phi(x) - c||^2``."""

    name = "deep_svdd"
    grid = {"hidden": [(64, 32), (128, 64)], "lr": [1e-4, 1e-3]}

    def _fit(self, train: Outputs) -> None:
        import torch

        X = self._x(train)
        with seeded(self.seed) as generator:
            self.network_ = bias_free_mlp(X.shape[1], tuple(self.hidden))
            self.network_.eval()
            self.centre_ = initial_centre(self.network_, X)
            centre = torch.from_numpy(self.centre_).float()
            self.loss_history_ = train_minibatches(
                self.network_, X, lambda net, batch, gen: ((net(batch) - centre.to(batch.device)) ** 2).sum(
                    dim=1).mean(), epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                weight_decay=self.weight_decay, generator=generator, device=self.device, desc=self.name)
