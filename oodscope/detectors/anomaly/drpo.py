"""Deep random projection outlyingness (DRPO).

Bauw, Velasco-Forero, Angulo, Adnet & Airiau, "Deep Random Projection Outlyingness for Unsupervised Anomaly
Detection", ICML 2021 UDL workshop (arXiv:2106.15307). The random projection outlyingness of :mod:`.rp_depth`,
``|u^T z - Med(u^T Z)| / MAD(u^T Z)``, is computed on the output ``z = phi(x)`` of a network, with the
**mean** over ``n_projections`` random unit directions replacing the supremum (the estimator the paper argues for:
smooth, and less sensitive to the number of projections). The network is trained to minimise the mean
outlyingness of the training rows, the median and MAD being those of the mini-batch; after training they are
re-estimated on all training rows and the score is the mean outlyingness of ``phi(x)``. Because the ratio is
invariant to a rescaling of ``phi``, the network cannot shrink its way to a trivial zero loss.

The paper trains convolutional networks on images; for rows we use an MLP (``64 -> 32``, leaky ReLU), Adam
``lr = 1e-3``, batch 128, 100 epochs and 1000 projections (our choices, not tuned on the benchmarks).
"""

from __future__ import annotations

import numpy as np

from ...extraction.outputs import Outputs
from ._base import (AnomalyDetector, check_hidden, check_int, check_training, in_blocks, predict_in_blocks,
                    seeded, train_minibatches)
from .rp_depth import median_mad, projected_outlyingness, random_directions



def leaky_mlp(sizes: list[int]):
    """``Linear -> LeakyReLU -> ... -> Linear`` through the given layer sizes (biases kept)."""
    import torch.nn as nn

    layers: list = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU())
    return nn.Sequential(*layers)

class DeepRPO(AnomalyDetector):
    """Mean random-projection outlyingness of a network's output, the network trained to minimise it."""

    name = "drpo"
    trains_network = True
    grid = {"n_projections": [100, 1000], "hidden": [(64, 32), (128, 64)]}

    def __init__(self, hidden: tuple[int, ...] = (64, 32), n_projections: int = 1000, epochs: int = 100,
                 batch_size: int = 128, lr: float = 1e-3, seed: int = 0, device: str = "cpu"):
        self.hidden = hidden
        self.n_projections = n_projections
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.device = device  # where the network trains; scores are computed on the CPU

    def _check_params(self) -> None:
        check_int(self.name, "n_projections", self.n_projections)
        check_training(self.name, self.epochs, self.batch_size, self.lr)
        if self.batch_size < 3:
            raise ValueError(f"{self.name}: batch_size must be >= 3 (a median and MAD per batch), "
                             f"got {self.batch_size}")
        check_hidden(self.name, self.hidden)

    def _fit(self, train: Outputs) -> None:
        import torch

        X = self._x(train)
        sizes = [X.shape[1], *self.hidden]
        directions = torch.from_numpy(random_directions(sizes[-1], self.n_projections, self.seed)).float()

        def loss_fn(net, batch, generator):
            projected = net(batch) @ directions.to(batch.device)
            median = projected.median(dim=0).values
            mad = (projected - median).abs().median(dim=0).values
            return ((projected - median).abs() / (mad + 1e-6)).mean()

        with seeded(self.seed) as generator:  # the layers' initial weights too: same seed, same network
            self.network_ = leaky_mlp(sizes)
            self.loss_history_ = train_minibatches(self.network_, X, loss_fn, epochs=self.epochs,
                                                   batch_size=min(self.batch_size, len(X)), lr=self.lr,
                                                   weight_decay=0.0, generator=generator, device=self.device,
                                                   desc=self.name)
        self.directions_ = directions.numpy().astype(np.float64)
        self.median_, self.mad_ = median_mad(self._project(X), self.name)

    def _init_networks(self) -> None:
        """Re-create the networks (architecture only) for :func:`oodscope.persistence.load`."""
        self.network_ = leaky_mlp([self.input_dims_["features"][0], *self.hidden])

    def _project(self, x: np.ndarray) -> np.ndarray:
        return in_blocks(lambda rows: rows @ self.directions_, predict_in_blocks(self.network_, x))

    def _score(self, x: Outputs) -> np.ndarray:
        return projected_outlyingness(self._project(x.features), self.median_, self.mad_, "mean")
