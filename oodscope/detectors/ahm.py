"""AHM: attention head masking, then a distance-based score on the masked model's embeddings.

Constantinou, Ioannides, Chadha, Elkins & Simpson, "Out-of-Distribution Detection with Attention Head Masking
for Multimodal Document Classification", arXiv:2408.11237 (2024); Scientific Reports 16, 2449 (2026),
doi:10.1038/s41598-025-32328-9. What could be checked of the paper's procedure (sources and what could *not* be
checked: ``benchmarks/clinc150_results.md``, section "AHM"):

* AHM is a post-training, inference-time change of the trained transformer: no weight is trained again.
* The mask is an ``N x H`` matrix ``M`` (``N`` layers, ``H`` heads per layer) that starts as all ones; a
  percentage ``p`` of the heads **of each layer** is set to zero at random (the paper's method section as
  summarised by the themoonlight.io review of the paper). A zero switches the head off: its attention output is
  multiplied by 0 (the ``head_mask`` of Michel et al., NeurIPS 2019, which Hugging Face models take as an
  ``(N, H)`` tensor).
* The embeddings that the *masked* model produces are scored with distance-based detectors: the paper reports kNN,
  Mahalanobis and an ensemble of them, on the masked model's embeddings, against the unmasked detectors.

Here: ``M`` is :meth:`AttentionHeadMasking.head_mask` (``1`` keep, ``0`` masked); by default every layer gets
exactly ``round(fraction * H)`` zeros (``fraction`` is the paper's ``p``), drawn without replacement with
``numpy.random.default_rng(seed)`` layer after layer (:func:`random_head_mask`). ``layers`` restricts the masking
to some blocks and ``heads`` gives ``M`` explicitly (an ``N x H`` 0/1 array, or ``{block: [masked heads]}``).
The embedding is the classifier head's input (the sentence embedding of
:class:`oodscope.text.model.TextClassifier`: the last layer's ``[CLS]`` state for ``pooling="cls"``), computed
with the mask on for the training data (the detector's bank) and for the scored data; the score is
``distance`` on it: ``"mahalanobis"`` (class-conditional, tied covariance, :mod:`.mahalanobis`) or ``"knn"``
(``k``-th neighbour distance on L2-normalised embeddings, :mod:`.knn`). A head is masked by zeroing its slice
of the attention context before the output projection (:class:`oodscope.text.model.HeadMask`), which equals
multiplying its attention probabilities by 0.

Choosing the mask: the random mask is one draw; :meth:`AttentionHeadMasking.select_mask` draws ``n_masks``
seeded masks per ``p`` and keeps the one with the lowest FPR@95 (or highest AUROC) on ID vs OOD validation data.

Deviations and unknowns (said here because the reviewer should not take them for the paper's):

* ``fraction=0.25``, ``k=50`` and ``distance="mahalanobis"`` are *not* the paper's values: the stored copies of
  the paper give the method section only through a third-party summary, which names ``p`` but not its value,
  nor ``k``, nor how (or whether) a mask is selected among random draws. :meth:`select_mask` (random draws,
  best on validation) is our reading, not a verified procedure; so is the ensemble, which is not implemented.
* The paper masks LayoutLMv3 / text transformers for documents; here any BERT-style ``TextClassifier``.

``fit`` runs the masked model over the training inputs and ``score`` over the scored ones (``Need.MODEL``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..extraction.outputs import Need, Outputs
from .base import Detector


def random_head_mask(n_layers: int, n_heads: int, fraction: float, layers: Sequence[int] | None = None,
                     seed: int = 0) -> np.ndarray:
    """The paper's ``N x H`` mask: all ones, then ``round(fraction * H)`` random zeros in each of ``layers``.

    ``layers=None`` masks every layer (as the paper does); the zeros of a layer are
    ``rng.choice(H, round(fraction * H), replace=False)`` with one ``rng = numpy.random.default_rng(seed)``, layer
    after layer in increasing order (for one layer this is the head choice of the earlier last-block-only AHM).
    """
    count = int(round(float(fraction) * n_heads))
    if not 0.0 < float(fraction) < 1.0 or count < 1:
        raise ValueError(f"ahm: fraction (the paper's p) must lie in (0, 1) and mask at least one of the {n_heads} "
                         f"heads per layer (round(p * H) >= 1), got {fraction!r}")
    chosen = sorted({int(b) % n_layers for b in (range(n_layers) if layers is None else layers)})
    mask = np.ones((n_layers, n_heads), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for layer in chosen:
        mask[layer, rng.choice(n_heads, size=count, replace=False)] = 0
    return mask


def _model_shape(model: Any, who: str) -> tuple[int, int]:
    if not hasattr(model, "blocks"):
        raise ValueError(f"{who}: needs a transformer classifier with BERT-style .blocks and a linear head "
                         f"(oodscope.text.model.TextClassifier), got {type(model).__name__}")
    return len(model.blocks), int(model.blocks[0].attention.self.num_attention_heads)


class AttentionHeadMasking(Detector):
    """``score(x) = d(e_M(x); {e_M(x_i)}_train)``: ``e_M`` the embedding with head mask ``M``, ``d`` a distance."""

    name = "ahm"
    needs = frozenset({Need.MODEL, Need.LABELS})
    grid = {"fraction": [0.1, 0.25, 0.5], "seed": [0, 1, 2], "distance": ["mahalanobis", "knn"]}

    def __init__(self, heads: Any = None, fraction: float = 0.25, layers: Sequence[int] | int | None = None,
                 distance: str = "mahalanobis", k: int = 50, seed: int = 0, block: int | None = None):
        self.heads = heads
        self.fraction = fraction
        self.layers = layers
        self.distance = distance
        self.k = k
        self.seed = seed
        self.block = block  # the former single-block mode: the same as layers=[block]

    def _check_params(self) -> None:
        if self.heads is None and not 0.0 < float(self.fraction) < 1.0:
            raise ValueError(f"ahm: fraction of masked heads (the paper's p) must be in (0, 1), got {self.fraction!r}")
        if self.distance not in ("mahalanobis", "knn"):
            raise ValueError(f"ahm: distance must be 'mahalanobis' or 'knn', got {self.distance!r}")
        if self.layers is not None and self.block is not None:
            raise ValueError("ahm: give layers (blocks to mask) or the older block, not both")
        layers = [self.layers] if isinstance(self.layers, (int, np.integer)) else self.layers
        if layers is not None and (len(layers) == 0 or not all(isinstance(b, (int, np.integer)) for b in layers)):
            raise ValueError(f"ahm: layers must be None (every block), a block index or a list of them, "
                             f"got {self.layers!r}")

    def _masked_layers(self) -> list[int] | None:
        if self.block is not None:
            return [int(self.block)]
        if isinstance(self.layers, (int, np.integer)):
            return [int(self.layers)]
        return None if self.layers is None else [int(b) for b in self.layers]

    def head_mask(self, model: Any) -> np.ndarray:
        """The ``N x H`` 0/1 matrix ``M`` of the paper (``0`` = head switched off) for ``model``."""
        n_layers, n_heads = _model_shape(model, self.name)
        if self.heads is None:
            for b in self._masked_layers() or []:
                if not -n_layers <= b < n_layers:
                    raise ValueError(f"ahm: block {b} does not exist (the model has {n_layers} blocks)")
            return random_head_mask(n_layers, n_heads, self.fraction, self._masked_layers(), self.seed)
        if isinstance(self.heads, Mapping):
            mask = np.ones((n_layers, n_heads), dtype=np.int64)
            for b, hs in self.heads.items():
                if not -n_layers <= int(b) < n_layers:
                    raise ValueError(f"ahm: block {b} does not exist (the model has {n_layers} blocks)")
                bad = [h for h in hs if not 0 <= int(h) < n_heads]
                if bad:
                    raise ValueError(f"ahm: heads {bad} of block {b} do not exist (it has {n_heads})")
                mask[int(b) % n_layers, [int(h) for h in hs]] = 0
            return mask
        mask = np.asarray(self.heads)
        if mask.shape != (n_layers, n_heads) or not np.isin(mask, (0, 1)).all():
            raise ValueError(f"ahm: heads must be {{block: [heads]}} or an ({n_layers}, {n_heads}) array of 0 "
                             f"(masked) and 1 (kept) for this model, got shape {mask.shape}")
        return mask.astype(np.int64)

    def masked_heads(self, model: Any) -> dict[int, list[int]]:
        """``{block: [masked heads]}`` of :meth:`head_mask` (blocks without a masked head left out)."""
        mask = self.head_mask(model)
        return {int(b): [int(h) for h in np.flatnonzero(mask[b] == 0)] for b in range(len(mask))
                if (mask[b] == 0).any()}

    def masked_features(self, data: Outputs, heads: dict[int, list[int]] | None = None) -> np.ndarray:
        """Head inputs (sentence embeddings) of ``data`` computed by the masked model."""
        import torch

        from ..extraction.rerun import rerun
        from ..text.model import HeadMask

        source = data.get(Need.MODEL, who=self.name)
        _model_shape(source.model, self.name)
        if source.head is None:
            raise ValueError(f"ahm: the model source of {data.name!r} names no classifier head; the embedding is "
                             f"the head's input (extract the TextClassifier with its 'head')")
        heads = self.masked_heads(source.model) if heads is None else heads

        def features(tokens, probe):
            with torch.no_grad():
                return probe(tokens)["features"]

        with HeadMask(source.model, heads):
            return rerun(source, features)

    def _fit(self, train: Outputs) -> None:
        from .registry import create

        model = train.get(Need.MODEL, who=self.name).model
        self.head_mask_ = self.head_mask(model)
        self.heads_ = self.masked_heads(model)
        params = {"k": self.k} if self.distance == "knn" else {}
        bank = Outputs(features=self.masked_features(train, self.heads_), labels=train.labels, logits=train.logits,
                       name=f"{train.name} (heads masked)")
        self.detector_ = create(self.distance, **params).fit(bank)

    def _score(self, x: Outputs) -> np.ndarray:
        features = self.masked_features(x, self.heads_)
        return self.detector_.score(Outputs(features=features, name=f"{x.name} (heads masked)"))

    def select_mask(self, train: Outputs, id_val: Outputs, ood_val: Outputs | Mapping[str, Outputs],
                    fractions: Sequence[float] | None = None, n_masks: int = 5,
                    metric: str = "fpr95") -> "AttentionHeadMasking":
        """Draw ``n_masks`` seeded random masks per ``p`` in ``fractions``; keep the best on validation; fit.

        Every candidate (``fraction=p``, ``seed=self.seed + i``) is fitted on ``train`` and scores ``id_val`` and
        the OOD validation set(s); the winner has the lowest mean FPR@95 (``metric="fpr95"``, ties broken by
        AUROC) or the highest mean AUROC (``metric="auroc"``). The winner's ``fraction`` and ``seed`` become this
        detector's parameters, its fitted state this detector's; ``selection_`` lists every candidate (metrics
        in percent). This search is our reading of "choose the mask on validation data", not a procedure
        verified in the paper (see the module docstring). Cost: one masked pass over ``train`` + validation
        data per candidate.
        """
        from ..metrics import auroc, fpr95

        if self.heads is not None:
            raise ValueError("ahm.select_mask draws random masks; it does not apply with an explicit heads=")
        if metric not in ("fpr95", "auroc"):
            raise ValueError(f"ahm.select_mask: metric must be 'fpr95' or 'auroc', got {metric!r}")
        if not (isinstance(n_masks, (int, np.integer)) and n_masks >= 1):
            raise ValueError(f"ahm.select_mask: n_masks must be a positive integer, got {n_masks!r}")
        sets = dict(ood_val) if isinstance(ood_val, Mapping) else {ood_val.name: ood_val}
        if not sets:
            raise ValueError("ahm.select_mask: ood_val is empty; give at least one OOD validation set")
        table, best = [], None
        for fraction in (self.fraction,) if fractions is None else fractions:
            for i in range(n_masks):
                candidate = self.clone(fraction=fraction, seed=int(self.seed) + i).fit(train)
                id_scores = candidate.score(id_val)
                per_set = {name: (100 * auroc(id_scores, s), 100 * fpr95(id_scores, s))
                           for name, s in ((n, candidate.score(o)) for n, o in sets.items())}
                row = {"fraction": float(fraction), "seed": int(self.seed) + i, "heads": candidate.heads_,
                       "auroc": float(np.mean([v[0] for v in per_set.values()])),
                       "fpr95": float(np.mean([v[1] for v in per_set.values()]))}
                table.append(row)
                key = (row["fpr95"], -row["auroc"]) if metric == "fpr95" else (-row["auroc"], row["fpr95"])
                if best is None or key < best[0]:
                    best = (key, row, candidate)
        _, row, winner = best
        self.fraction, self.seed = row["fraction"], row["seed"]
        for name, value in vars(winner).items():
            if name.endswith("_"):
                setattr(self, name, value)
        self.selection_ = table
        return self
