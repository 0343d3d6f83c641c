"""Deep SAD: semi-supervised Deep SVDD with a few labelled normal and anomalous rows.

Ruff, Vandermeulen, Görnitz, Binder, Müller, Müller & Kloft, "Deep Semi-Supervised Anomaly Detection", ICLR 2020,
Eq. 4: with ``n`` unlabelled rows and ``m`` labelled rows ``(x~_j, y~_j)``, ``y~ = +1`` (known normal) or
``-1`` (known anomaly), ``min_W 1/(n+m) sum_i ||phi(x_i) - c||^2 + eta/(n+m) sum_j (||phi(x~_j) - c||^2 + eps)^{y~_j}
+ lambda/2 ||W||^2``: labelled anomalies are pushed away from the centre through the inverse distance.
Defaults ``eta = 1`` and ``eps = 1e-6`` (paper and code); network, centre and optimiser as :mod:`.deep_svdd`.

``fit(X, y)`` takes ``y`` with ``0`` = unlabelled, ``+1`` = labelled normal, ``-1`` = labelled anomaly (the paper's
convention). Without ``y`` (or with only zeros) Deep SAD is exactly one-class Deep SVDD. The score is
``||phi(x) - c||^2``.
"""

from __future__ import annotations

import numpy as np

from ...extraction.outputs import Outputs
from ._base import seeded, train_minibatches
from .deep_svdd import DeepSVDDBase, bias_free_mlp, initial_centre


class DeepSAD(DeepSVDDBase):
    """Semi-supervised Deep SVDD (labelled anomalies repelled): ``score(x) = ||phi(x) - c||^2``."""

    name = "deep_sad"
    grid = {"eta": [0.5, 1.0, 2.0]}

    def __init__(self, hidden: tuple[int, ...] = (64, 32), eta: float = 1.0, epochs: int = 100,
                 batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 1e-6, eps: float = 1e-6,
                 seed: int = 0, device: str = "cpu"):
        super().__init__(hidden=hidden, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         seed=seed, device=device)
        self.eta = eta
        self.eps = eps

    def _check_params(self) -> None:
        super()._check_params()
        if not float(self.eta) > 0 or not float(self.eps) > 0:
            raise ValueError(f"{self.name}: eta and eps must be positive, got eta={self.eta!r}, eps={self.eps!r}")

    def _fit(self, train: Outputs) -> None:
        import torch

        X = self._x(train)
        labels = np.zeros(len(X)) if train.labels is None else np.asarray(train.labels, dtype=np.float64)
        if labels.shape != (len(X),) or not set(np.unique(labels)) <= {-1.0, 0.0, 1.0}:
            raise ValueError(f"{self.name}: y must hold 0 (unlabelled), +1 (labelled normal) or -1 (labelled "
                             f"anomaly) for each of the {len(X)} rows")
        if (labels == 0).sum() + (labels == 1).sum() == 0:
            raise ValueError(f"{self.name}: every row is a labelled anomaly; the centre needs normal or "
                             "unlabelled rows")
        eta, eps = float(self.eta), float(self.eps)
        with seeded(self.seed) as generator:
            self.network_ = bias_free_mlp(X.shape[1], tuple(self.hidden))
            self.network_.eval()
            self.centre_ = initial_centre(self.network_, X[labels >= 0])  # the centre from non-anomalous rows
            centre = torch.from_numpy(self.centre_).float()

            def loss_fn(net, batch, gen):
                rows, y = batch[:, :-1], batch[:, -1]
                distance = ((net(rows) - centre.to(rows.device)) ** 2).sum(dim=1)
                labelled = torch.where(y == 0, distance, eta * (distance + eps) ** y)
                return labelled.mean()

            self.loss_history_ = train_minibatches(
                self.network_, np.column_stack([X, labels]), loss_fn, epochs=self.epochs,
                batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay, generator=generator,
                device=self.device, desc=self.name)
