"""Unleashing Mask (UM) and UMAP: fine-tune a well-trained classifier to forget the atypical samples a mask exposes.

Zhu, Li, Yao, Liu, Xu & Han, "Unleashing Mask: Explore the Intrinsic Out-of-Distribution Detection Capability",
ICML 2023 (Sec. 3: an intermediate training stage detects OOD better than the final one, and what the final stage
adds is the memorisation of atypical ID samples; Sec. 4 and Fig. 3: the method). The details and defaults below are
from the authors' code (github.com/tmlr-group/Unleashing-Mask: ``estimate_loss.py``, ``trainers/default.py``'s
``modifier``, ``utils/custom_loss.py``, ``utils/conv_type.py``, ``configs/estimate_loss/estimate_loss_cifar10.yaml``,
``configs/smallscale/densenet_cifar10{,_UMAP}.yaml``). The equations are written out here as the paper and the code
define them; their numbers in the paper are not cited (not checked against the PDF).

**1. The estimated loss constraint** (Sec. 4, "mining the atypical samples with a mask"): a mask ``m`` removes a
share ``1 - keep`` of the weights of every convolution and linear layer of the trained model ``theta`` (biases and
normalisation layers untouched), at random: the code draws a random score per weight and keeps, per layer, the
``keep`` share with the largest ``|score|`` (``int((1 - keep) n)`` weights dropped), ``keep = 0.965``
(``prune_rate`` in ``estimate_loss_cifar10.yaml``). The atypical samples are the ones the masked model gets wrong:
their small margins do not survive the perturbation, the typical ones keep theirs. The loss level at which they
count as "forgotten" is the masked model's mean cross-entropy on the training set (eval mode):

    ``L_hat = 1/n sum_i CE(f(x_i; m * theta), y_i)``                          (:func:`estimate_loss_level`)

**2. UM** (Sec. 4, fine-tuning with the loss constraint): fine-tune all of ``theta`` with the flooding form of the
batch cross-entropy (Ishida et al., ICML 2020),

    ``L_UM(theta) = |CE_B(f(.; theta)) - L_hat| + L_hat``,   ``CE_B = 1/|B| sum_{i in B} CE(f(x_i; theta), y_i)``

(:func:`flooded`; the code's ``CustomLoss``: ``(loss - args.UM).abs() + args.UM`` on the batch mean). Above
``L_hat`` it is ordinary cross-entropy descent; below it the gradient is reversed, ``d L_UM = -d CE_B``, so the
model climbs back to the level: the mean over the batch is dominated by the samples with the smallest margins, so
the ascent raises the loss of the memorised atypical samples first and the model returns toward the earlier stage
whose OOD discrimination was better. ``L_hat`` is estimated once, before any step, from the given model
(:meth:`UnleashingMask.adapt`), or given as ``level`` (the code's ``--UM``; its README: "estimate ... or manual
tuning"). It lives in the buffer ``level`` of the classifier head (``fc.level``), so the engine's checkpoints keep
it and a resumed run continues with the stored value.

**3. UMAP** (Sec. 4, UM adopting pruning; :class:`UnleashingMaskPruning`, ``umap_mask``): the weights stay frozen
(the code's ``freeze_weights: True``, every weight and bias, normalisation layers included) and a real-valued score
``s`` per weight of every convolution and linear layer is learned; the forward pass uses ``theta * top(|s|)``,
the top ``prune_keep`` share of ``|s|`` per layer kept (``prune_rate: 0.8`` in ``densenet_cifar10_UMAP.yaml``),
with the straight-through gradient to ``s`` (edge-popup, Ramanujan et al., CVPR 2020; the code's ``SubnetConv``,
scores initialised ``kaiming_uniform_(a=sqrt(5))``), on the same loss ``|CE_B(f(.; theta * m(s))) - L_hat| +
L_hat``. Deployed: plain layers with weights ``theta * m(s)``. ``L_hat`` is estimated as for UM, from the dense
model.

Both are scored with the energy (the code's configs set ``energy: True``; the README's "Energy+UM" row). The code
fine-tunes a pretrained DenseNet-101 for 100 epochs at lr 0.1 (cosine, batch 256, weight decay 1e-4, augmented);
here the engine's schedule. One difference: the code estimates ``L_hat`` on the augmented training loader (random
crop and flip), here on the un-augmented training images (up to ``n_reference`` of them, a fixed subsample), like
the engine's other training-set statistics.
"""

from __future__ import annotations

import copy as copying
import functools
import math
from typing import Any

import numpy as np

from ..objective import Objective, check_positive


def check_share(who: str, name: str, value: Any) -> None:
    """``value`` a number in ``(0, 1]`` (the share of a layer's weights a mask keeps)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1):
        raise ValueError(f"{who}: {name} (the share of each layer's weights the mask keeps) must lie in (0, 1], "
                         f"got {value!r}; e.g. 0.965 to estimate the level, 0.8 to prune")


def masked_layers(model) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (the layers the code's mask covers)."""
    from torch import nn

    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d,
                                                                             nn.Conv3d))]


def n_dropped(numel: int, keep: float) -> int:
    """How many of a layer's ``numel`` weights a mask keeping the share ``keep`` removes: ``int((1 - keep) n)``."""
    return int((1 - keep) * numel)


def random_keep_mask(shape, keep: float, generator=None):
    """A 0/1 float tensor of ``shape`` with ``n_dropped(n, keep)`` zeros at uniformly drawn places (the code's top
    ``keep`` share of random scores)."""
    import torch

    n = math.prod(shape)
    mask = torch.ones(n)
    mask[torch.randperm(n, generator=generator)[:n_dropped(n, keep)]] = 0
    return mask.view(tuple(shape))


def masked_copy(model, keep: float, generator=None):
    """A copy of ``model`` whose every convolution and linear weight keeps a random share ``keep`` (per layer)."""
    import torch

    masked = copying.deepcopy(model)
    with torch.no_grad():
        for _, layer in masked_layers(masked):
            layer.weight.mul_(random_keep_mask(layer.weight.shape, keep, generator).to(layer.weight))
    return masked


def per_sample_losses(model, images: np.ndarray, labels: np.ndarray, preprocess=None,
                      chunk: int = 500) -> np.ndarray:
    """``CE(f(x_i), y_i)`` per image (float64), the model in eval mode, no gradient, no augmentation."""
    import torch
    from torch.nn import functional as F

    from ...extraction.extract import evaluation_mode

    prep = preprocess if preprocess is not None else (lambda batch: batch.float())
    device = next(model.parameters()).device
    losses = []
    with evaluation_mode(model):
        with torch.no_grad():
            for rows in np.array_split(np.arange(len(images)), max(1, math.ceil(len(images) / chunk))):
                logits = model(prep(torch.from_numpy(images[rows]).to(device))).double()
                target = torch.from_numpy(np.asarray(labels[rows])).to(device)
                losses.append(F.cross_entropy(logits, target, reduction="none").cpu())
    return torch.cat(losses).numpy()


def estimate_loss_level(model, images: np.ndarray, labels: np.ndarray, preprocess=None, keep: float = 0.965,
                        n_reference: int | None = None, generator=None) -> float:
    """``L_hat``: the mean cross-entropy of :func:`masked_copy` ``(model, keep)`` over the training images (up to
    ``n_reference``, a fixed subsample), eval mode; ``model`` itself is untouched."""
    check_share("unleashing_mask", "keep", keep)
    if len(images) == 0:
        raise ValueError("unleashing_mask: no training images to estimate the loss level on")
    rows = np.arange(len(images))
    if n_reference is not None and n_reference < len(images):
        rows = np.sort(np.random.default_rng(0).permutation(len(images))[:int(n_reference)])
    return float(per_sample_losses(masked_copy(model, keep, generator), images[rows], labels[rows],
                                   preprocess).mean())


def flooded(loss, level: float):
    """``|loss - level| + level``: the loss itself above ``level``, its mirror image below (gradient reversed)."""
    return (loss - level).abs() + level


@functools.lru_cache(maxsize=None)
def _modules() -> tuple[type, type]:
    """The two torch modules (built on first use, so importing the objective does not import torch)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from ..heads import _Head

    class LossLevelHead(_Head, nn.Module):
        """The classifier head ``classes`` plus the buffer ``level`` (``L_hat``, saved in checkpoints); the
        forward is the head's; :meth:`deploy` returns ``classes``."""

        def __init__(self, linear: nn.Module, level: float):
            super().__init__()
            self.register_buffer("level", torch.tensor(float(level), dtype=torch.float64))
            self.classes = linear

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classes(x)

        def deploy(self) -> nn.Module:
            return self.classes

    class ScoreMaskedLayer(nn.Module):
        """A frozen convolution or linear ``layer`` whose weight is used as ``weight * top(|scores|)``, the top
        ``keep`` share per layer, with the straight-through gradient to ``scores`` (edge-popup)."""

        def __init__(self, layer: nn.Module, keep: float):
            super().__init__()
            self.layer = layer
            self.keep = float(keep)
            self.scores = nn.Parameter(torch.empty_like(layer.weight))
            nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))

        def hard_mask(self) -> torch.Tensor:
            """The 0/1 mask: ones at the top ``keep`` share of ``|scores|`` (``n_dropped`` zeros)."""
            flat = self.scores.detach().abs().flatten()
            mask = torch.ones_like(flat)
            mask[flat.argsort()[:n_dropped(flat.numel(), self.keep)]] = 0
            return mask.view_as(self.scores)

        def mask(self) -> torch.Tensor:
            """The hard mask in the forward pass, the gradient of ``|scores|`` in the backward pass."""
            soft = self.scores.abs()
            return self.hard_mask() + (soft - soft.detach())  # exactly the hard mask forward

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = self.layer.weight * self.mask().to(self.layer.weight.dtype)
            if isinstance(self.layer, nn.Linear):
                return F.linear(x, weight, self.layer.bias)
            return self.layer._conv_forward(x, weight, self.layer.bias)

        def deploy(self) -> nn.Module:
            with torch.no_grad():
                self.layer.weight.mul_(self.hard_mask().to(self.layer.weight))
            return self.layer

    return LossLevelHead, ScoreMaskedLayer


class UnleashingMask(Objective):
    """UM: ``L = |CE_B - L_hat| + L_hat`` on all weights, ``L_hat`` the randomly masked model's training loss."""

    name = "unleashing_mask"
    score = "energy"

    def __init__(self, keep: float = 0.965, level: float | None = None, n_reference: int | None = None):
        self.keep = keep
        self.level = level
        self.n_reference = n_reference

    def check_params(self) -> None:
        check_share(self.name, "keep", self.keep)
        if self.level is not None and not (isinstance(self.level, (int, float)) and not isinstance(self.level, bool)
                                           and math.isfinite(self.level) and self.level >= 0):
            raise ValueError(f"{self.name}: level (the loss constraint L_hat) must be a finite number >= 0 or None "
                             f"(estimate it from the masked model), got {self.level!r}")
        if self.n_reference is not None:
            check_positive(self.name, "n_reference", self.n_reference)

    def estimate(self, model, train: tuple[Any, Any], preprocess) -> float:
        """``L_hat`` for ``model``: ``level`` if given, else :func:`estimate_loss_level` (the mask drawn from
        torch's global RNG, which the engine seeds with the run's seed)."""
        if self.level is not None:
            return float(self.level)
        images, labels = train
        prep = preprocess
        if hasattr(prep, "to"):
            prep = prep.to(next(model.parameters()).device)
        return estimate_loss_level(model, images, labels, prep, self.keep, self.n_reference)

    def adapt(self, model, n_classes: int, train, preprocess) -> Any:
        from ..heads import head_name, replace_module

        level = self.estimate(model, train, preprocess)
        head_class, _ = _modules()
        name = head_name(model)
        head = head_class(model.get_submodule(name), level).to(next(model.parameters()).device)
        replace_module(model, name, head)
        self.head_name_, self.head_ = name, head
        return model

    def loss(self, logits, labels, outlier_logits=None, **context):
        from torch.nn import functional as F

        level = float(self.head_.level)
        ce = F.cross_entropy(logits, labels)
        total = flooded(ce, level)
        return total, {"ce": float(ce.detach()), "level": level, "ascent": float(ce.detach() < level)}


class UnleashingMaskPruning(UnleashingMask):
    """UMAP: the same loss on a learned pruning mask (top ``prune_keep`` of scores per layer), weights frozen."""

    name = "umap_mask"
    score = "energy"

    def __init__(self, keep: float = 0.965, prune_keep: float = 0.8, level: float | None = None,
                 n_reference: int | None = None):
        super().__init__(keep=keep, level=level, n_reference=n_reference)
        self.prune_keep = prune_keep

    def check_params(self) -> None:
        super().check_params()
        check_share(self.name, "prune_keep", self.prune_keep)

    def adapt(self, model, n_classes: int, train, preprocess) -> Any:
        from ..heads import head_name, replace_module

        level = self.estimate(model, train, preprocess)  # on the dense model, before any mask
        _, masked_class = _modules()
        name = head_name(model)  # the classifier head: the last nn.Linear
        layers = masked_layers(model)
        for parameter in model.parameters():
            parameter.requires_grad_(False)  # the code's freeze_weights: only the scores learn
        device = next(model.parameters()).device
        for name, layer in layers:
            replace_module(model, name, masked_class(layer, self.prune_keep).to(device))
        head_class, _ = _modules()
        head = head_class(model.get_submodule(name), level).to(device)  # around the masked classifier
        replace_module(model, name, head)
        self.head_name_, self.head_ = name, head
        return model

    def deploy(self, model) -> Any:
        from ..heads import replace_module

        _, masked_class = _modules()
        for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, masked_class)]:
            replace_module(model, name, module.deploy())
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return super().deploy(model)
