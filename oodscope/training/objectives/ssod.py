"""SSOD: natural OOD supervision sampled from the ID images' own background, no outlier data.

Sen Pei, Jiaxi Sun et al., "Image Background Serves as Good Proxy for Out-of-distribution Data", ICLR 2024 (arXiv
2307.00519; v1 "End-to-End Out-of-distribution Detection with Self-supervised Sampling"), Sec. 3: Self-supervised
Sampling for OOD Detection. Each spatial position ``(h, w)`` of the last convolutional feature map ``F`` ``(C, H,
W)``, before global pooling, is a local feature ``f_hw`` (the local property of convolution: it sees one patch of
the image) that the classifier head ``(W, b)`` (the CLS head, which scores the pooled ``mean_hw f_hw``) can score
on its own. Positions where the head is sure of the image's class are foreground (ID); positions where it is sure
of the contrary are background, the proxy for OOD data.

**The factorisation** (Eq. 7): ``P(w_i | x) = P(w_i | x in S_ID, x) P(x in S_ID | x)``: the CLS head gives the ID
factor (softmax over the ``K`` classes), a binary OOD head ``s`` the OOD factor ``P(x in S_ID | x) =
sigmoid(s(phi(x)))``.

**Sampling** (Eq. 9), per position, with ``y`` the image's label and ``c_hw = softmax(W f_hw + b)_y`` the CLS
head's confidence in it (no gradient, :func:`position_confidence`, :func:`sample_positions`):

    ``t_hw = 1`` (ID) if ``c_hw >= gamma``;   ``t_hw = 0`` (OOD) if ``c_hw <= 1 - gamma``;   unused otherwise,

``gamma = 0.95`` (the paper's confidence threshold; it must exceed 0.5 so that no position is both).

**Objective** (Eq. 11): the CLS head's cross-entropy on the pooled features plus ``alpha`` times the OOD head's
binary cross-entropy on the sampled positions (:func:`position_loss`; the gradient flows through ``f_hw`` into the
backbone, end to end):

    ``L = CE(W phi(x) + b, y) + alpha [ mean_{t_hw = 1} BCE(s(f_hw), 1) + mean_{t_hw = 0} BCE(s(f_hw), 0) ]``,

``alpha = 1``. **Our reading where the sources are silent** (the authors' code was not available to us; the facts
above are from the paper's abstract and its OpenReview discussion): the ID and OOD positions are averaged apart
and summed, as a public reimplementation does ("loss-wise balance"; the background outnumbers the confident
foreground), and a step without a position of a kind gives that mean 0; ``alpha = 1`` is that reimplementation's
``--bce_weight``; the OOD head is one logistic unit ``s(f) = v . f + c`` (the paper's sigmoid; the
reimplementation's default "Sig" head), put next to the classifier with torch's default initialisation
(:func:`oodscope.training.heads.outlier_logit_head`).

**The map** is the output of the module that :func:`find_feature_map` finds (or ``feature_map`` names): the last
module, in execution order, whose output is an ``(N, C, H, W)`` map with ``H W > 1`` whose global average is the
classifier's input (``layer3`` of the CIFAR ResNets, ``layer4`` of torchvision's); the engine hands it to
``loss`` (:meth:`SSOD.feature_map_module`). A network whose head does not read the global average of a map (a
flattening or max-pooling head) is refused: its per-position scores would mean nothing.

**Scored** with the OOD factor of Eq. 7, the OOD head on the pooled features (the paper's inference): the deployed
model returns the ``K`` class logits of the tuned classifier and records ``ood_probability = sigmoid(-s(phi(x))) =
1 - P(x in S_ID | x)`` in its ``fc.ood_probability`` layer, read by oodscope's ``ood_probability`` detector (higher
= more OOD); Eq. 7's ``max_i P(w_i | x)`` is MSP times ``P(x in S_ID | x)``. The paper trains both heads and the
backbone jointly (the reimplementation: 100 epochs, lr 0.1); here a pretrained classifier is fine-tuned on the
engine's schedule.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from ...extraction.outputs import Need
from ..objective import Objective, check_positive

N_PROBE_IMAGES = 8  # training images run once in ``adapt`` to find (or check) the feature map


def positions(feature_map):
    """``(B, H W, C)``: the local features ``f_hw`` of an ``(B, C, H, W)`` map, row-major over ``(h, w)``."""
    return feature_map.flatten(2).transpose(1, 2)


def position_confidence(classes, feature_map, labels):
    """``c_hw = softmax(W f_hw + b)_y`` ``(B, H W)``: the classifier's confidence in each image's label at every
    position of its map (no gradient)."""
    import torch

    with torch.no_grad():
        probabilities = classes(positions(feature_map)).float().softmax(dim=2)
        return probabilities.gather(2, labels[:, None, None].expand(-1, probabilities.shape[1], 1)).squeeze(2)


def sample_positions(confidence, gamma: float):
    """SSOD's sampler (Eq. 9): ``(id_mask, ood_mask)``, ``confidence >= gamma`` and ``confidence <= 1 - gamma``."""
    return confidence >= gamma, confidence <= 1.0 - gamma


def position_loss(scores, id_mask, ood_mask):
    """``mean_{ID} BCE(s, 1) + mean_{OOD} BCE(s, 0)`` over the positions' OOD-head logits ``scores`` (a mean over
    no position is 0)."""
    from torch.nn import functional as F

    total = scores.new_zeros((), dtype=scores.float().dtype)
    for mask, target in ((id_mask, 1.0), (ood_mask, 0.0)):
        if mask.any():
            chosen = scores[mask].float()
            total = total + F.binary_cross_entropy_with_logits(chosen, chosen.new_full(chosen.shape, target))
    return total


def probe_batch(model, train, preprocess) -> Any:
    """The model input of the first :data:`N_PROBE_IMAGES` training images, on the model's device: what
    :func:`find_feature_map` runs the model on."""
    import torch

    prep = preprocess if preprocess is not None else (lambda batch: batch.float())
    device = next(model.parameters()).device
    return prep(torch.from_numpy(np.asarray(train[0][:N_PROBE_IMAGES])).to(device))


def find_feature_map(model, inputs, head: str, name: str | None = None, who: str = "ssod") -> str:
    """The dotted name of the module whose output is the map the classifier ``head`` reads through global average
    pooling (the last such module in execution order), or ``name`` checked; ``ValueError`` naming the fix, prefixed
    with ``who`` (the objective asking)."""
    import torch

    from ...extraction.extract import evaluation_mode

    modules = dict(model.named_modules())
    if name is not None and name not in modules:
        raise ValueError(f"{who}: the model has no module {name!r} for feature_map; name its last convolutional map "
                         f"(e.g. 'layer3' of a CIFAR ResNet)")
    outputs: list[tuple[str, Any]] = []  # (module, output) in execution order
    seen: dict[str, Any] = {}

    def record(key: str):
        def hook(_module, _args, out) -> None:
            outputs.append((key, out))
        return hook

    handles = [modules[head].register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))]
    for key, module in modules.items():
        if key and key != head and not key.startswith(f"{head}."):
            handles.append(module.register_forward_hook(record(key)))
    try:
        with evaluation_mode(model), torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    phi = seen["x"]

    calls = collections.Counter(key for key, _ in outputs)

    def pooled_map(key: str, out) -> bool:  # a module run more than once (a shared ReLU) has no one output
        return (calls[key] == 1 and torch.is_tensor(out) and out.dim() == 4 and out.shape[1] == phi.shape[1]
                and out.shape[2] * out.shape[3] > 1
                and torch.allclose(out.mean(dim=(2, 3)), phi.reshape(out.shape[:2]), rtol=1e-4, atol=1e-5))

    found = [key for key, out in outputs if pooled_map(key, out)]
    if name is not None:
        if name not in found:
            raise ValueError(f"{who}: the output of {name!r} is not a map (N, C, H, W) whose global average is the "
                             f"input of the classifier {head!r}; name the last convolutional map before global "
                             "pooling" + (f" (found: {found[-1]!r})" if found else ""))
        return name
    if not found:
        raise ValueError(f"{who}: no module of {type(model).__name__} outputs a map (N, C, H, W) with H W > 1 whose "
                         f"global average is the input of the classifier {head!r}; {who} needs a convolutional network "
                         "with global average pooling before its head (or name the map with feature_map=)")
    return found[-1]


class SSOD(Objective):
    """``L = CE + alpha [BCE(s(f_hw), 1) on confident foreground + BCE(s(f_hw), 0) on confident background]``."""

    name = "ssod"
    needs = frozenset({Need.LABELS})
    score = "ood_probability"

    def __init__(self, gamma: float = 0.95, alpha: float = 1.0, feature_map: str | None = None):
        self.gamma = gamma
        self.alpha = alpha
        self.feature_map = feature_map

    def check_params(self) -> None:
        if not (isinstance(self.gamma, (int, float)) and not isinstance(self.gamma, bool) and 0.5 < self.gamma < 1):
            raise ValueError(f"{self.name}: gamma (the confidence threshold of the sampler) must lie in (0.5, 1), so "
                             f"that no position is both ID and OOD, got {self.gamma!r}")
        check_positive(self.name, "alpha", self.alpha)
        if self.feature_map is not None and not (isinstance(self.feature_map, str) and self.feature_map):
            raise ValueError(f"{self.name}: feature_map must be a module name (e.g. 'layer3') or None, got "
                             f"{self.feature_map!r}")

    def adapt(self, model, n_classes: int, train, preprocess) -> Any:
        from ..heads import head_name, outlier_logit_head, replace_module

        if n_classes is None or n_classes < 2:
            raise ValueError(f"{self.name}: needs a classifier with at least 2 classes, got {n_classes}")
        name = head_name(model)
        self.map_name_ = find_feature_map(model, probe_batch(model, train, preprocess), name, self.feature_map)
        head = outlier_logit_head(model.get_submodule(name)).to(next(model.parameters()).device)
        head.joint = True
        replace_module(model, name, head)
        self.head_name_, self.head_ = name, head
        return model

    def feature_map_module(self, model) -> str:
        return self.map_name_

    def score_detector(self):
        from ...detectors import create

        return create(self.score, layers=(f"{getattr(self, 'head_name_', 'fc')}.ood_probability",))

    def loss(self, logits, labels, outlier_logits=None, feature_map=None, **context):
        from torch.nn import functional as F

        ce = F.cross_entropy(logits[:, :-1], labels)
        local = positions(feature_map)
        id_mask, ood_mask = sample_positions(position_confidence(self.head_.classes, feature_map, labels),
                                             self.gamma)
        ood = position_loss(self.head_.outlier(local).squeeze(2), id_mask, ood_mask)
        n = id_mask.numel()
        return ce + self.alpha * ood, {"ce": float(ce.detach()), "ood": float(ood.detach()),
                                       "id_share": float(id_mask.sum()) / n, "ood_share": float(ood_mask.sum()) / n}
