"""AHM: attention head masking, then a distance-based score on the masked model's embeddings.

Constantinou, Ioannides, Chadha, Elkins & Simpson, "Out-of-Distribution Detection with Attention Head Masking
for Multimodal Document Classification", arXiv:2408.11237 (2024); Scientific Reports 16, 2449 (2026). At
inference, a subset of the attention heads of the trained transformer is switched off; the embeddings that the
*masked* model produces for the ID training set and for test inputs are then scored with a distance-based
detector (the paper evaluates kNN and Mahalanobis on them), the masking being what separates ID from OOD
embeddings better than the unmasked model does.

Here: ``heads`` lists the masked heads as ``{block: [head, ...]}``; by default a seeded random ``fraction`` of
the heads of the ``block`` (default: the last) is masked. The masked embedding is the classifier head's input
(the sentence embedding of :class:`oodscope.text.model.TextClassifier`); ``distance`` is ``"mahalanobis"``
(class-conditional, tied covariance, :mod:`.mahalanobis`) or ``"knn"`` (``k``-th neighbour on normalised
embeddings, :mod:`.knn`). A head is masked by zeroing its context vector before the attention output projection
(:class:`oodscope.text.model.HeadMask`). The paper chooses the masked heads on validation data; the defaults
here (a quarter of the last block's heads) are not tuned to any benchmark - use ``grid`` and the ``oos_val``
split to choose them.

``fit`` runs the masked model over the training inputs and ``score`` over the scored ones (``Need.MODEL``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..extraction.outputs import Need, Outputs
from .base import Detector


class AttentionHeadMasking(Detector):
    """``score(x) = d(e_mask(x); {e_mask(x_i)}_train)`` with ``d`` the Mahalanobis or kNN distance."""

    name = "ahm"
    needs = frozenset({Need.MODEL, Need.LABELS})
    grid = {"fraction": [0.0833, 0.25, 0.5], "block": [-1, -2], "distance": ["mahalanobis", "knn"]}

    def __init__(self, heads: dict[int, list[int]] | None = None, fraction: float = 0.25, block: int = -1,
                 distance: str = "mahalanobis", k: int = 50, seed: int = 0):
        self.heads = heads
        self.fraction = fraction
        self.block = block
        self.distance = distance
        self.k = k
        self.seed = seed

    def _check_params(self) -> None:
        if self.heads is None and not 0.0 < float(self.fraction) < 1.0:
            raise ValueError(f"ahm: fraction of masked heads must be in (0, 1), got {self.fraction!r}")
        if self.distance not in ("mahalanobis", "knn"):
            raise ValueError(f"ahm: distance must be 'mahalanobis' or 'knn', got {self.distance!r}")

    def masked_heads(self, model: Any) -> dict[int, list[int]]:
        """The heads to mask (explicit ``heads``, or a seeded random ``fraction`` of block ``block``)."""
        if self.heads is not None:
            return {int(b): sorted(int(h) for h in hs) for b, hs in self.heads.items()}
        n_heads = model.blocks[self.block].attention.self.num_attention_heads
        count = max(1, int(round(self.fraction * n_heads)))
        chosen = np.random.default_rng(self.seed).choice(n_heads, size=count, replace=False)
        return {int(self.block) % len(model.blocks): sorted(int(h) for h in chosen)}

    def masked_features(self, data: Outputs) -> np.ndarray:
        """Head inputs (sentence embeddings) of ``data`` computed by the masked model."""
        import torch

        from ..extraction.rerun import rerun
        from ..text.model import HeadMask

        source = data.get(Need.MODEL, who=self.name)
        if not hasattr(source.model, "blocks") or source.head is None:
            raise ValueError(f"ahm: needs a transformer classifier with BERT-style .blocks and a linear head "
                             f"(oodscope.text.model.TextClassifier), got {type(source.model).__name__}")
        heads = self.masked_heads(source.model)

        def features(tokens, probe):
            with torch.no_grad():
                return probe(tokens)["features"]

        with HeadMask(source.model, heads):
            return rerun(source, features)

    def _fit(self, train: Outputs) -> None:
        from .registry import create

        self.heads_ = self.masked_heads(train.get(Need.MODEL, who=self.name).model)
        params = {"k": self.k} if self.distance == "knn" else {}
        bank = Outputs(features=self.masked_features(train), labels=train.labels, logits=train.logits,
                       name=f"{train.name} (heads masked)")
        self.detector_ = create(self.distance, **params).fit(bank)

    def _score(self, x: Outputs) -> np.ndarray:
        return self.detector_.score(Outputs(features=self.masked_features(x), name=f"{x.name} (heads masked)"))
