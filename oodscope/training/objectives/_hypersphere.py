"""The set-up CIDER and PALM share: a projection head on the unit sphere with a prototype buffer, and its checks.

:class:`HypersphereObjective` puts :func:`oodscope.training.heads.hypersphere_head` in place of the classifier
(``prototype_count(C)`` rows of prototypes, set by ``_init_prototypes`` before the first step), asks the engine for
the penultimate features (``needs_features``, the head's input) and adds the online linear probe's cross-entropy
(``probe=True``: the classifier trained on detached features) to a loss. A method subclasses it with its own
``prototype_count``, ``_init_prototypes``, ``_check_counts`` and ``loss``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...extraction.outputs import Need
from ..objective import Objective, check_positive

N_INIT_IMAGES = 5000  # training images whose embeddings give the initial prototypes


def check_hypersphere_params(who: str, dim: Any, temperature: Any, momentum: Any) -> None:
    """``dim`` an integer >= 1, ``temperature`` > 0 and the prototype momentum in [0, 1)."""
    if not (isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and dim >= 1):
        raise ValueError(f"{who}: dim (the embedding dimension) must be an integer >= 1, got {dim!r}")
    check_positive(who, "temperature", temperature)
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"{who}: proto_m (the prototypes' moving-average momentum) must lie in [0, 1), got "
                         f"{momentum!r}")


def training_embeddings(model, head, train, preprocess, n: int = N_INIT_IMAGES) -> tuple[Any, np.ndarray]:
    """Embeddings ``z`` (torch, on the model's device) and labels of up to ``n`` training images (a fixed random
    subsample; the model in eval mode, no gradient)."""
    import torch

    from ...extraction.extract import evaluation_mode
    from ..heads import penultimate

    images, labels = train
    pick = np.sort(np.random.default_rng(0).permutation(len(images))[:n])
    prep = preprocess if preprocess is not None else (lambda batch: batch.float())
    device = next(model.parameters()).device
    with evaluation_mode(model):
        with torch.no_grad():
            z = torch.cat([head.embed(penultimate(model, prep(torch.from_numpy(images[rows]).to(device)))[0])
                           for rows in np.array_split(pick, max(1, len(pick) // 500))])
    return z, labels[pick]


class HypersphereObjective(Objective):
    """Base of the prototype objectives on the hypersphere (not registered: it has no ``name``)."""

    needs = frozenset({Need.LABELS})
    needs_features = True
    score = "knn"

    def prototype_count(self, n_classes: int) -> int:
        """Rows of the head's ``prototypes`` buffer (one per class by default)."""
        return n_classes

    def _check_counts(self, counts: np.ndarray) -> None:
        """Training images per class, before the head is built: every class needs one for its prototype."""
        if (counts == 0).any():
            raise ValueError(f"{self.name}: classes {np.flatnonzero(counts == 0)[:5].tolist()} have no training "
                             "image; every class needs one for its prototype")

    def _init_prototypes(self, model, head, train, preprocess) -> None:
        raise NotImplementedError

    def adapt(self, model, n_classes: int, train, preprocess) -> Any:
        from ..heads import head_name, hypersphere_head, replace_module

        if n_classes is None or n_classes < 2:
            raise ValueError(f"{self.name}: needs a classifier with at least 2 classes, got {n_classes}")
        self._check_counts(np.bincount(train[1], minlength=n_classes))
        name = head_name(model)
        head = hypersphere_head(model.get_submodule(name), int(self.dim), self.prototype_count(n_classes))
        head.to(next(model.parameters()).device)
        head.joint = True
        replace_module(model, name, head)
        self.head_name_, self.head_, self.n_classes_ = name, head, n_classes
        self._init_prototypes(model, head, train, preprocess)
        return model

    def feature_module(self, model) -> str:
        return self.head_name_  # the head's input: the penultimate features, with their gradient

    def with_probe(self, total, terms: dict[str, float], logits, labels) -> tuple[Any, dict[str, float]]:
        """``total`` plus the online probe's cross-entropy (``probe_ce`` in ``terms``) when ``probe``."""
        if not self.probe:
            return total, terms
        from torch.nn import functional as F

        probe = F.cross_entropy(logits, labels)
        return total + probe, {**terms, "probe_ce": float(probe.detach())}
