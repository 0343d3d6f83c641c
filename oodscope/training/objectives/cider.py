"""CIDER: compactness and dispersion of class prototypes on the hypersphere.

Ming, Sun, Dia & Li, "How to Exploit Hyperspherical Embeddings for Out-of-Distribution Detection?", ICLR 2023
(Sec. 3; defaults from the authors' ``train_cider.py`` / ``utils/losses.py`` and ``scripts/train_cider_cifar10.sh``).
A projection head ``g`` maps the penultimate features to the unit sphere, ``z = g(phi(x)) / ||g(phi(x))||``; each
class ``c`` has one prototype ``mu_c`` on the sphere, an exponential moving average of its samples' embeddings,
updated sample by sample (Eq. 6)

    ``mu_c := Normalize(alpha mu_c + (1 - alpha) z)``  for every ``z`` of class ``c`` in the batch,

and the loss (Eq. 7) is ``L = L_dis + lambda_c L_comp`` with the compactness term (Eq. 5, the vMF likelihood)

    ``L_comp = -(tau / tau_0) (1/B) sum_i log( exp(z_i . mu_{y_i} / tau) / sum_c exp(z_i . mu_c / tau) )``

and the dispersion term (Eq. 4)

    ``L_dis = (1/C) sum_i log( 1/(C-1) sum_{j != i} exp(mu_i . mu_j / tau) )``.

As in the authors' code, ``L_comp`` uses the updated prototypes as constants (detached) and ``L_dis`` the updated
prototypes with the gradient of the current batch's contribution ``(1 - alpha) z``; ``L_comp`` keeps the code's
scale ``tau / tau_0`` with ``tau_0 = 0.07`` (its ``CompLoss`` default), ``L_dis`` has ``tau / tau_0 = 1``. Defaults
(CIFAR-10 script): ``dim = 128`` (the "mlp" head ``Linear(d, d) - ReLU - Linear(d, 128)``), ``tau = 0.1``,
``alpha = 0.95`` (0.5 for CIFAR-100), ``lambda_c = 2`` (``--w``). The prototypes start at the normalised class means
of the embeddings of (up to 5,000) training images before the first step (the code's ``init_class_prototypes``).

**Scored** with KNN on the L2-normalised penultimate features (the paper's Sec. 4 and ``eval_ood.py``; the
projection head is discarded): ``score = "knn"`` (oodscope's default ``k = 50``; the authors use ``k = 300`` for
the 50k CIFAR-10 training images). The papers train no classifier and measure ID accuracy with a linear probe;
here the model's classifier head is trained in the same steps on the *detached* features (an online linear probe,
``probe=True``, its cross-entropy added to the loss), which does not change the representation and gives the
fine-tuned model meaningful logits. Differences from the paper's schedule: one augmented view per image (the code
uses two crops per image), fine-tuning a pretrained classifier on the engine's schedule instead of 500 epochs from
scratch (lr 0.5, batch 512).
"""

from __future__ import annotations

import numpy as np

from ..objective import check_positive
from ._hypersphere import (N_INIT_IMAGES, HypersphereObjective, check_hypersphere_params,  # noqa: F401
                           training_embeddings)

COMP_BASE_TEMPERATURE = 0.07  # tau_0 of the authors' CompLoss


def class_mean_prototypes(z, labels: np.ndarray, n_classes: int, who: str):
    """``Normalize(mean of z over class c)`` for every class; a class without training image is an error."""
    import torch
    from torch.nn import functional as F

    counts = np.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        raise ValueError(f"{who}: classes {np.flatnonzero(counts == 0)[:5].tolist()} have no training image; every "
                         "class needs one for its prototype")
    index = torch.as_tensor(labels, device=z.device)
    sums = torch.zeros(n_classes, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, index, z)
    return F.normalize(sums, dim=1)


def ema_update(prototypes, z, labels, momentum: float):
    """CIDER's prototype update (Eq. 6), sample by sample in batch order: ``mu_y := Normalize(alpha mu_y +
    (1 - alpha) z)``. Vectorised over classes: step ``r`` updates every class with its ``r``-th sample of the batch
    (updates of different classes commute), so the loop runs over ranks within a class, not over samples. The
    result carries the gradient of ``z``; ``prototypes`` itself is not modified."""
    import torch
    from torch.nn import functional as F

    order = torch.sort(labels, stable=True).indices
    sorted_labels = labels[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels)  # first position of each sample's class
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels), device=labels.device) - starts
    mu = prototypes.clone()
    for r in range(int(rank.max()) + 1 if len(labels) else 0):
        rows = torch.nonzero(rank == r).squeeze(1)
        classes = labels[rows]
        mu = mu.index_copy(0, classes, F.normalize(momentum * mu[classes] + (1 - momentum) * z[rows], dim=1))
    return mu


def compactness_loss(z, prototypes, labels, temperature: float, base_temperature: float = COMP_BASE_TEMPERATURE):
    """``-(tau / tau_0) mean_i log softmax_c(z_i . mu_c / tau)_{y_i}`` (CIDER Eq. 5)."""
    return -(temperature / base_temperature) * (z @ prototypes.T / temperature).log_softmax(dim=1).gather(
        1, labels[:, None]).mean()


def dispersion_loss(prototypes, temperature: float):
    """``mean_i log( 1/(C-1) sum_{j != i} exp(mu_i . mu_j / tau) )`` (CIDER Eq. 4)."""
    import torch

    n = len(prototypes)
    logits = prototypes @ prototypes.T / temperature
    off = ~torch.eye(n, dtype=torch.bool, device=prototypes.device)
    return (logits.masked_fill(~off, float("-inf")).logsumexp(dim=1) - np.log(n - 1)).mean()


class CIDER(HypersphereObjective):
    """``L = L_dis + lambda_c L_comp`` on a projection head on the hypersphere, one EMA prototype per class."""

    name = "cider"
    score = "knn"

    def __init__(self, dim: int = 128, temperature: float = 0.1, proto_m: float = 0.95, lam: float = 2.0,
                 probe: bool = True):
        self.dim = dim
        self.temperature = temperature
        self.proto_m = proto_m
        self.lam = lam
        self.probe = probe

    def check_params(self) -> None:
        check_hypersphere_params(self.name, self.dim, self.temperature, self.proto_m)
        check_positive(self.name, "lam", self.lam)

    def _init_prototypes(self, model, head, train, preprocess) -> None:
        z, labels = training_embeddings(model, head, train, preprocess)
        head.prototypes.copy_(class_mean_prototypes(z, labels, self.n_classes_, self.name))

    def loss(self, logits, labels, outlier_logits=None, features=None, **context):
        z = self.head_.embed(features)
        mu = ema_update(self.head_.prototypes, z, labels, self.proto_m)
        self.head_.prototypes.copy_(mu.detach())
        comp = compactness_loss(z, mu.detach(), labels, self.temperature)
        dis = dispersion_loss(mu, self.temperature)
        return self.with_probe(dis + self.lam * comp, {"comp": float(comp.detach()), "dis": float(dis.detach())},
                               logits, labels)
