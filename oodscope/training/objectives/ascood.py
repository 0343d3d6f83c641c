"""ASCOOD: virtual outliers from ID images by destroying their invariant features, found with pixel attribution.

Regmi, "Going Beyond Conventional OOD Detection" (arXiv 2411.10794, 2024; published as "Image-based Outlier
Synthesis With Training Data"), Sec. 3; details and defaults from the author's ``openood/trainers/ascood_trainer.py``,
``openood/networks/ascood_net.py`` and ``scripts/ood/ascood/cifar10_train_ascood.sh``. No external data.

**Attribution** (Sec. 3.1): the gradient of the true-class logit w.r.t. the (preprocessed) input,
``g = d f_y(x) / d x`` (:func:`saliency`; the network in eval mode, as the code). The pixels with the largest
attribution are taken to carry the invariant (class-defining) features.

**Virtual outliers** ``x'`` from each ID image (:func:`virtual_outliers`), one kind per run (``ood_type``):

* ``"shuffle"`` (the CIFAR-10 script's choice): the ``k = int(H W p_inv)`` pixels with the largest
  ``sum_c exp(g_c)`` (the code's ranking) are permuted at random among themselves (all channels of a pixel move
  together); every other pixel is unchanged;
* ``"gradient"``: the ``k = int(C H W p_inv)`` input elements with the largest ``|g|`` are moved along the
  attribution, ``x' = x + alpha g m`` (``m`` the 0/1 mask of those elements), which also raises the true-class
  logit (Sec. 3.1: "disrupt invariant features while amplifying the true-class logit"); ``alpha`` falls
  linearly over training from ``alpha_max = 300`` to ``alpha_min = 30``, ``alpha = (alpha_max - alpha_min)
  (1 - epoch / epochs) + alpha_min`` (per epoch, as the code);
* ``"gaussian"`` (the paper's ablation): ``x' = alpha N(0, I)``, no attribution.

**Objective** (Sec. 3.2): ID cross-entropy plus a uniform-posterior term on the virtual outliers, and the
classifier on z-scored features (:class:`oodscope.training.heads.StandardisedHead`,
``f(x) = W (sigma z(phi(x))) + b``, ``z`` per sample over the feature dimension, ``sigma = 0.5``):

    ``L = CE(f(x), y) + w KL(U || softmax(f(x')))``,  ``KL(U || p) = sum_c (1/K) (log(1/K) - log p_c)``

(batch mean, the code's ``nn.KLDivLoss(reduction="batchmean")``), ``w = 1``. CIFAR-10 defaults: ``ood_type =
"shuffle"``, ``p_inv = 0.15`` (the script; the released OpenOOD v1.5 result files are named ``p0.2``). The code
trains a ResNet-18 from scratch for 100 epochs (lr 0.1); here the engine's fine-tuning schedule, the z-scored head
put in front of the pretrained classifier. Scored with MSP (the K logits of the standardised features); the
author's CIFAR-10 test script uses SCALE, which on z-scored features (they sum to zero per sample) reduces to the
energy, so both are in the table rather than a SCALE of their own.
"""

from __future__ import annotations

import math
from typing import Any

from ...extraction.outputs import Need
from ..objective import Objective, check_positive

OOD_TYPES = ("shuffle", "gradient", "gaussian")


def saliency(model, inputs, labels):
    """``d f_y(x) / d x`` per sample: the gradient of each input's true-class logit w.r.t. the input, computed in
    eval mode (restored afterwards), without touching the parameters' gradients."""
    import torch

    from ...extraction.extract import evaluation_mode

    with evaluation_mode(model):
        with torch.enable_grad():
            x = inputs.detach().requires_grad_(True)
            score = model(x).gather(1, labels[:, None]).sum()
            (grad,) = torch.autograd.grad(score, x)
    return grad


def shuffle_mask(grad, p_inv: float):
    """``(B, H W)`` indices of each image's ``int(H W p_inv)`` pixels with the largest ``sum_c exp(g_c)``."""
    b, _, h, w = grad.shape
    k = int(h * w * p_inv)
    return grad.exp().sum(dim=1).reshape(b, -1).topk(k, dim=1).indices


def shuffle_outliers(x, grad, p_inv: float, generator):
    """Permute each image's most-attributed pixels (:func:`shuffle_mask`) among themselves, all channels together."""
    import torch

    b, c, h, w = x.shape
    top = shuffle_mask(grad, p_inv)
    order = torch.rand(top.shape, generator=generator).argsort(dim=1).to(x.device)
    flat = x.reshape(b, c, h * w)
    index = top[:, None, :].expand(-1, c, -1)
    moved = flat.gather(2, index).gather(2, order[:, None, :].expand(-1, c, -1))
    return flat.scatter(2, index, moved).reshape(b, c, h, w).detach()


def gradient_mask(grad, p_inv: float):
    """0/1 mask (like ``grad``) of each input's ``int(C H W p_inv)`` elements with the largest ``|g|``."""
    import torch

    b = grad.shape[0]
    flat = grad.abs().reshape(b, -1)
    k = int(flat.shape[1] * p_inv)
    return torch.zeros_like(flat).scatter(1, flat.topk(k, dim=1).indices, 1.0).reshape(grad.shape)


def gradient_outliers(x, grad, p_inv: float, alpha: float):
    """``x + alpha g m`` with ``m`` the :func:`gradient_mask`."""
    return (x + alpha * grad * gradient_mask(grad, p_inv)).detach()


def alpha_at(progress: float, alpha_min: float, alpha_max: float) -> float:
    """``(alpha_max - alpha_min) (1 - progress) + alpha_min``, ``progress`` = finished epochs / epochs."""
    return (alpha_max - alpha_min) * (1.0 - progress) + alpha_min


def virtual_outliers(model, x, labels, ood_type: str, p_inv: float, alpha: float, generator):
    """ASCOOD's virtual outliers of the preprocessed ID batch ``x`` ``(B, C, H, W)`` (see the module docstring)."""
    import torch

    if ood_type == "gaussian":
        return alpha * torch.randn(x.shape, generator=generator).to(x)
    grad = saliency(model, x, labels)
    if ood_type == "shuffle":
        return shuffle_outliers(x, grad, p_inv, generator)
    return gradient_outliers(x, grad, p_inv, alpha)


def uniform_kl(logits):
    """``mean_i KL(U || softmax(f_i)) = mean_i sum_c (1/K)(log(1/K) - log p_ic)``."""
    k = logits.shape[1]
    return (-math.log(k) - logits.log_softmax(dim=1).mean(dim=1)).mean()


class ASCOOD(Objective):
    """``L = CE(f(x), y) + w KL(U || softmax(f(x')))``, ``x'`` = ``x`` with its most-attributed pixels destroyed."""

    name = "ascood"
    needs = frozenset({Need.LABELS})
    score = "msp"

    def __init__(self, ood_type: str = "shuffle", p_inv: float = 0.15, w: float = 1.0, sigma: float | None = 0.5,
                 alpha_min: float = 30.0, alpha_max: float = 300.0):
        self.ood_type = ood_type
        self.p_inv = p_inv
        self.w = w
        self.sigma = sigma
        self.alpha_min = alpha_min
        self.alpha_max = alpha_max

    def check_params(self) -> None:
        if self.ood_type not in OOD_TYPES:
            raise ValueError(f"{self.name}: ood_type must be one of {', '.join(OOD_TYPES)}, got {self.ood_type!r}")
        if not (isinstance(self.p_inv, (int, float)) and not isinstance(self.p_inv, bool) and 0 < self.p_inv <= 1):
            raise ValueError(f"{self.name}: p_inv (the share of pixels taken as invariant) must lie in (0, 1], got "
                             f"{self.p_inv!r}")
        check_positive(self.name, "w", self.w)
        if self.sigma is not None:
            check_positive(self.name, "sigma", self.sigma)
        check_positive(self.name, "alpha_min", self.alpha_min)
        check_positive(self.name, "alpha_max", self.alpha_max)
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"{self.name}: alpha_min must not exceed alpha_max, got {self.alpha_min!r} > "
                             f"{self.alpha_max!r}")

    def adapt(self, model, n_classes: int, train, preprocess) -> Any:
        images = train[0]
        # the images' spatial size after preprocessing is not known here: check on the raw layout (H, W either way)
        h, w = (images.shape[1:3] if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3)
                else images.shape[2:4])
        if self.ood_type == "shuffle" and int(h * w * self.p_inv) < 1:
            raise ValueError(f"{self.name}: p_inv = {self.p_inv} of {h} x {w} images selects no pixel; raise p_inv")
        if self.sigma is None:
            return model
        from ..heads import head_name, replace_module, standardised_head

        name = head_name(model)
        replace_module(model, name, standardised_head(model.get_submodule(name), float(self.sigma)))
        return model

    def extend_inputs(self, model, inputs, labels, generator, progress: float):
        import torch

        alpha = alpha_at(progress, self.alpha_min, self.alpha_max)
        virtual = virtual_outliers(model, inputs, labels, self.ood_type, self.p_inv, alpha, generator)
        return torch.cat([inputs, virtual])

    def loss(self, logits, labels, outlier_logits=None, **context):
        from torch.nn import functional as F

        ce = F.cross_entropy(logits, labels)
        kl = uniform_kl(outlier_logits)
        return ce + self.w * kl, {"ce": float(ce.detach()), "uniform_kl": float(kl.detach())}
