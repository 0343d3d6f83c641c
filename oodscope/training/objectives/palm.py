"""PALM: a mixture of prototypes per class on the hypersphere, MLE and prototype-contrastive losses.

Lu, Gong, Wang, Xue, Yao & Moore, "Learning with Mixture of Prototypes for Out-of-Distribution Detection", ICLR 2024
(Sec. 3: mixture-of-prototypes modelling, soft assignment, MLE loss, prototype-level contrastive loss, EMA update;
details and defaults from the authors' ``util/loss_functions.py``, ``util/loaders/args_loader.py`` and
``runner.sh``). CIDER (:mod:`.cider`) with ``M`` prototypes per class instead of one. The projection head and the
embedding ``z = g(phi(x)) / ||g(phi(x))||`` are CIDER's; prototype ``p`` (of ``P = C M``) belongs to class
``p mod C`` (the code's ``arange(C).repeat(M)``). Per step, with ``m_ip = 1[y_i = class(p)]``:

1. **soft assignment** (Sinkhorn-Knopp, ``epsilon = 0.05``, 3 iterations): ``Q = exp(z P^T / epsilon)``,
   alternately scaled so that every prototype holds ``1/P`` and every sample ``1/B`` of the mass, times ``B``;
   the weights ``w_ip = m_ip Q_ip`` are kept only on each sample's ``k`` largest (``k = 5``; ``k = 0``: all);
2. **prototype update** (EMA, momentum ``alpha = 0.999``): ``p := Normalize(alpha p + (1 - alpha) sum_i u_ip z_i)``,
   ``u`` = ``w`` normalised to sum 1 per sample, then per prototype (a prototype no sample is assigned to keeps its
   direction);
3. **MLE loss** with the updated prototypes as constants and the weights ``w'`` of a second assignment on them
   (same top-k prototypes), normalised per sample:
   ``L_MLE = -(1/B) sum_i [ sum_p w'_ip z_i . p / tau - log sum_p exp(z_i . p / tau) ]``,  ``tau = 0.1``;
4. **prototype contrastive loss** on the updated prototypes (with the gradient of the batch's share in the update),
   temperature 0.5, the other prototypes of the same class as positives:
   ``L_pcon = -(1/P) sum_p [ mean_{q != p, class(q) = class(p)} p . q / 0.5 - log sum_{q != p} exp(p . q / 0.5) ]``;

``L = L_MLE + lambda L_pcon``, ``lambda = 1``. Defaults: ``M = 6`` prototypes per class (``--cache-size``), ``k = 5``,
``alpha = 0.999``, ``dim = 128``. The authors draw the initial prototypes uniformly from ``[0, 1)^dim`` (then
normalise); here the draw is seeded by the engine's seed.

**Scored** with Mahalanobis on the penultimate features (the paper's main score and OpenOOD v1.5's "MDS" row:
90.32 / 96.55 near / far AUROC on CIFAR-10); ``score = "mahalanobis"``, the class-conditional tied-covariance
score. (The authors' ``eval_cifar.py`` computes a class-agnostic Gaussian on L2-normalised features; ``knn`` is the
other distance score.) As for CIDER, the classifier head is trained in the same steps on detached features
(``probe=True``), one augmented view per image (the code uses two), fine-tuning instead of 500 epochs from scratch.
"""

from __future__ import annotations

import numpy as np

from ..objective import check_positive
from ._hypersphere import HypersphereObjective, check_hypersphere_params

PCON_TEMPERATURE = 0.5  # the code's fixed temperature of the prototype contrastive loss


def sinkhorn(z, prototypes, epsilon: float = 0.05, iterations: int = 3):
    """PALM's soft assignment ``(B, P)``: Sinkhorn-Knopp on ``exp(z . p / epsilon)``, each iteration scaling the
    prototypes' rows to ``1/P`` and the samples' columns to ``1/B``; the result times ``B`` (rows sum to 1).
    Computed after subtracting the maximum (the scalings cancel any constant factor); no gradient."""
    import torch

    with torch.no_grad():
        scores = z @ prototypes.T / epsilon
        q = torch.exp(scores - scores.max()).T  # (P, B)
        q = q / q.sum()
        n_prototypes, n_samples = q.shape
        for _ in range(iterations):
            q = q / q.sum(dim=1, keepdim=True).clamp(min=1e-30) / n_prototypes
            q = q / q.sum(dim=0, keepdim=True).clamp(min=1e-30) / n_samples
        return (q * n_samples).T


def top_k_mask(weights, k: int):
    """1 on each row's ``k`` largest entries (all entries when ``k = 0``)."""
    import torch

    if k == 0:
        return torch.ones_like(weights)
    return torch.zeros_like(weights).scatter(1, weights.topk(k, dim=1).indices, 1.0)


def _normalise(x, dim: int):
    return x / x.sum(dim=dim, keepdim=True).clamp(min=1e-12)


def prototype_update(prototypes, z, same_class, k: int, momentum: float, epsilon: float = 0.05):
    """Step 1-2: ``(updated prototypes, top-k mask)``; the update carries the gradient of ``z``."""
    from torch.nn import functional as F

    weights = same_class * sinkhorn(z, prototypes, epsilon)
    keep = top_k_mask(weights, k)
    update = _normalise(_normalise(keep * weights, dim=1), dim=0)  # per sample, then per prototype
    return F.normalize(momentum * prototypes + (1 - momentum) * update.T @ z, dim=1), keep


def mle_loss(z, prototypes, same_class, keep, temperature: float, epsilon: float = 0.05):
    """Step 3: ``-(1/B) sum_i [sum_p w'_ip z_i.p / tau - logsumexp_p z_i.p / tau]`` (``prototypes`` constant)."""
    weights = _normalise(keep * same_class * sinkhorn(z, prototypes, epsilon), dim=1)
    logits = z @ prototypes.T / temperature
    return -((weights * logits).sum(dim=1) - logits.logsumexp(dim=1)).mean()


def prototype_contrastive_loss(prototypes, classes, temperature: float = PCON_TEMPERATURE):
    """Step 4: the supervised contrastive loss among prototypes (positives: the other prototypes of its class)."""
    import torch

    logits = prototypes @ prototypes.T / temperature
    self_pair = torch.eye(len(prototypes), dtype=torch.bool, device=prototypes.device)
    positive = ((classes[:, None] == classes[None, :]) & ~self_pair).float()
    pos = (_normalise(positive, dim=1) * logits).sum(dim=1)
    return -(pos - logits.masked_fill(self_pair, float("-inf")).logsumexp(dim=1)).mean()


class PALM(HypersphereObjective):
    """``L = L_MLE + lambda L_pcon`` with ``M`` EMA prototypes per class, soft top-k Sinkhorn assignments."""

    name = "palm"
    score = "mahalanobis"

    def __init__(self, n_prototypes: int = 6, k: int = 5, dim: int = 128, temperature: float = 0.1,
                 proto_m: float = 0.999, lam: float = 1.0, epsilon: float = 0.05, probe: bool = True):
        self.n_prototypes = n_prototypes
        self.k = k
        self.dim = dim
        self.temperature = temperature
        self.proto_m = proto_m
        self.lam = lam
        self.epsilon = epsilon
        self.probe = probe

    def check_params(self) -> None:
        check_hypersphere_params(self.name, self.dim, self.temperature, self.proto_m)
        if not (isinstance(self.n_prototypes, (int, np.integer)) and self.n_prototypes >= 1):
            raise ValueError(f"{self.name}: n_prototypes (per class) must be an integer >= 1, got "
                             f"{self.n_prototypes!r}")
        if not (isinstance(self.k, (int, np.integer)) and 0 <= self.k <= self.n_prototypes):
            raise ValueError(f"{self.name}: k (prototypes a sample is assigned to) must be an integer in "
                             f"[0, n_prototypes = {self.n_prototypes}] (0: all), got {self.k!r}")
        check_positive(self.name, "lam", self.lam)
        check_positive(self.name, "epsilon", self.epsilon)

    def prototype_count(self, n_classes: int) -> int:
        """Rows of the head's ``prototypes`` buffer: ``n_prototypes`` per class, class of row ``p`` = ``p mod C``."""
        return n_classes * int(self.n_prototypes)

    def _check_counts(self, counts: np.ndarray) -> None:
        few = np.flatnonzero(counts < self.n_prototypes)
        if len(few):
            raise ValueError(f"{self.name}: {self.n_prototypes} prototypes per class but classes "
                             f"{few[:5].tolist()} have only {counts[few[:5]].tolist()} training images; use "
                             "n_prototypes <= the smallest class size")

    def _init_prototypes(self, model, head, train, preprocess) -> None:
        import torch
        from torch.nn import functional as F

        draw = torch.rand(head.prototypes.shape)  # the engine seeds adapt
        head.prototypes.copy_(F.normalize(draw, dim=1))

    def prototype_classes(self, device=None):
        import torch

        return torch.arange(self.n_classes_, device=device).repeat(int(self.n_prototypes))

    def loss(self, logits, labels, outlier_logits=None, features=None, **context):
        z = self.head_.embed(features)
        classes = self.prototype_classes(z.device)
        same_class = (labels[:, None] == classes[None, :]).float()
        updated, keep = prototype_update(self.head_.prototypes, z, same_class, int(self.k), self.proto_m,
                                         self.epsilon)
        self.head_.prototypes.copy_(updated.detach())
        mle = mle_loss(z, updated.detach(), same_class, keep, self.temperature, self.epsilon)
        pcon = prototype_contrastive_loss(updated, classes)
        return self.with_probe(mle + self.lam * pcon, {"mle": float(mle.detach()), "pcon": float(pcon.detach())},
                               logits, labels)
