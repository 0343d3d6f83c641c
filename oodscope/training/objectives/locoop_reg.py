"""LoCoOp's objective: cross-entropy plus the local OOD regularisation on background regions.

Miyai, Yu, Irie & Aizawa, "LoCoOp: Few-Shot Out-of-Distribution Detection via Prompt Learning", NeurIPS 2023,
Sec. 3.2, Eq. 4-6. Every local region ``i`` of an ID image (a patch of a ViT, a position of a convolutional map)
has class logits ``l_i`` ``(K,)`` and a prediction ``p_i = softmax(l_i)``. A region whose label ``y`` is not among
the ``top_k`` classes of its own prediction is a *background* region, an OOD proxy (Eq. 4):

    ``J = { i : y not in top_k(p_i) }``,

whose entropy is maximised (Eq. 5), ``L_ood = -mean_{i in J} H(p_i)`` (0 when no region is selected), next to the
cross-entropy of the global logits (Eq. 6):

    ``L = CE(global logits, y) + lambda L_ood``,   ``lambda = 0.25``, ``top_k = 200`` (ImageNet-1k's 1,000 classes).

``top_k=None`` (the default here) takes ``max(1, round(K / 5))``, the paper's 200 of 1,000 for any ``K``
(our extension: the authors tune ``top_k`` per ID set); it must be below ``K``.

**Where the local logits come from** (through the engine's ``feature_map_module`` hook):

* a model with a submodule ``local_logits`` hands it its ``(B, P, K)`` region logits (LoCoOp's own setting, the
  CoOp prompt learner of :class:`oodscope.vlm.locoop.PromptLearner`: logit scale times the cosine of each patch
  feature with each learned class prompt); the engine passes that module's output to ``loss`` as ``feature_map``;
* any other classifier is read as SSOD reads it (:func:`.ssod.find_feature_map`): the last ``(B, C, H, W)`` map
  whose global average the classifier head reads, each position scored by the head, ``l_hw = W f_hw + b`` (our
  reading of LoCoOp for a convolutional network; the paper prompts CLIP only). The gradient flows through the
  map into the backbone.

Scored with MSP on the fine-tuned classifier (LoCoOp's GL-MCM is MCM plus the local maximum on a CLIP model:
:class:`oodscope.vlm.locoop.LoCoOp`). No outliers are used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...extraction.outputs import Need
from ..objective import Objective, check_positive

LOCAL_LOGITS = "local_logits"  # the submodule a region-scoring model exposes


def locoop_loss(global_logits, local_logits, labels, top_k: int, lam: float):
    """``(L, L_CE, L_ood)`` of LoCoOp (Eq. 4-6): ``global_logits (B, K)``, ``local_logits (B, P, K)``, labels ``(B,)``;
    the entropy is exact (``log_softmax``; the authors' code adds 1e-5 inside the log)."""
    import torch

    ce = torch.nn.functional.cross_entropy(global_logits, labels)
    top = local_logits.topk(top_k, dim=-1).indices  # (B, P, top_k)
    is_ood = ~(top == labels[:, None, None]).any(dim=-1)  # the label is not in the region's top-k
    log_p = torch.log_softmax(local_logits[is_ood], dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    ood = -entropy.mean() if len(entropy) else local_logits.sum() * 0.0
    return ce + lam * ood, ce, ood


def default_top_k(n_classes: int) -> int:
    """The paper's ``top_k = 200`` of ImageNet-1k's 1,000 classes, scaled to ``n_classes``: ``max(1, round(K/5))``."""
    return max(1, int(round(n_classes / 5)))


class LoCoOpRegularisation(Objective):
    """``L = CE + lambda * (-mean entropy of the regions whose label is not in their top_k)`` (Eq. 6)."""

    name = "locoop_reg"
    needs = frozenset({Need.LABELS})
    score = "msp"

    def __init__(self, lam: float = 0.25, top_k: int | None = None, feature_map: str | None = None):
        self.lam = lam
        self.top_k = top_k
        self.feature_map = feature_map

    def check_params(self) -> None:
        if not (isinstance(self.lam, (int, float)) and not isinstance(self.lam, bool) and self.lam >= 0):
            raise ValueError(f"{self.name}: lam must be a number >= 0, got {self.lam!r}")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)):
                raise ValueError(f"{self.name}: top_k must be a positive integer or None, got {self.top_k!r}")
            check_positive(self.name, "top_k", int(self.top_k))
        if self.feature_map is not None and not (isinstance(self.feature_map, str) and self.feature_map):
            raise ValueError(f"{self.name}: feature_map must be a module name (e.g. 'layer3') or None, got "
                             f"{self.feature_map!r}")

    def adapt(self, model, n_classes: int | None, train, preprocess) -> Any:
        modules = dict(model.named_modules())
        if LOCAL_LOGITS in modules and self.feature_map is None:
            self.map_name_, self.head_ = LOCAL_LOGITS, None
            n_classes = getattr(model, "n_classes", n_classes)
        else:
            self.map_name_, self.head_ = self._find_map(model, train, preprocess)
        if n_classes is None or n_classes < 2:
            raise ValueError(f"{self.name}: needs a classifier with at least 2 classes, got {n_classes}")
        self.top_k_ = int(self.top_k) if self.top_k is not None else default_top_k(n_classes)
        if self.top_k_ >= n_classes:
            raise ValueError(f"{self.name}: top_k={self.top_k_} must be smaller than the number of ID classes "
                             f"({n_classes}); the paper's 200 is for ImageNet-1k")
        return model

    def _find_map(self, model, train, preprocess):
        """The convolutional map the head reads through global pooling, and the head (SSOD's search)."""
        from ..heads import head_name
        from .ssod import find_feature_map, probe_batch

        head = head_name(model)
        try:
            name = find_feature_map(model, probe_batch(model, train, preprocess), head, self.feature_map, self.name)
        except ValueError as error:
            raise ValueError(f"{error}; or give the model a submodule {LOCAL_LOGITS!r} returning (B, P, K) region "
                             "logits") from None
        return name, model.get_submodule(head)

    def feature_map_module(self, model) -> str:
        return self.map_name_

    def local_logits(self, feature_map):
        """``(B, P, K)`` region logits: the ``local_logits`` output itself, or the head on each map position."""
        if self.head_ is None:
            return feature_map
        from .ssod import positions

        return self.head_(positions(feature_map))

    def loss(self, logits, labels, outlier_logits=None, feature_map=None, **context):
        total, ce, ood = locoop_loss(logits, self.local_logits(feature_map), labels, self.top_k_, float(self.lam))
        return total, {"ce": float(ce.detach()), "ood": float(ood.detach())}
