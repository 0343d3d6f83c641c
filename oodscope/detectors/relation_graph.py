"""Neural Relation Graph: outlier and label-error scores from the relational structure of features.

Kim, Yun & Song, "Neural Relation Graph: A Unified Framework for Identifying Label Noise and Outlier Data",
NeurIPS 2023 (arXiv:2301.12321).

Relation between two samples: with L2-normalised features ``f`` and predicted probabilities ``p``,

    k(i, j) = max(<f_i, f_j>, 0) * <p_i, p_j>                      (kernel "cos_p"; "cos" drops <p_i, p_j>)
    r(i, j) = (2 * 1[y_i = y_j] - 1) * k(i, j)                     (signed by label agreement when labels exist)

Edges with ``|r| <= 0.03`` are cut and the rest raised to the power ``t`` (sign kept).

* **Outliers**: an unlabeled test sample has only positive relations to the training graph; its
  node strength ``s(x) = sum_j r(x, x_j)^t`` is small for outliers. The paper's outlier score is ``1 / s(x)``;
  we return ``-s(x)``, which ranks identically (``s >= 0``). ``t = 1`` is the authors' setting for OOD.
* **Label errors**: the labelled self-relation graph of the training set,
  ``s_i = sum_j r(i, j)^t`` with ``t = 4``; samples whose normalised strength ``s_i / max|s|`` is below
  ``-lambda`` (``lambda = 0.05``) form the estimated noisy set ``N``, and the score is refined once to
  ``s_i - 2 sum_{j in N} r(i, j)^t`` (flipping the sign of relations to noisy samples). Low ``s`` = likely
  label error; :func:`label_error_scores` returns ``-s`` (higher = more likely mislabelled).

Memory is bounded: the kernel is evaluated in blocks of ``chunk`` query rows against the whole bank (float32).
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import l2_normalize, probabilities
from .base import Detector

KERNELS = ("cos_p", "cos")


def relation_strength(feat: np.ndarray, prob: np.ndarray | None, bank: np.ndarray, bank_prob: np.ndarray | None,
                      labels: np.ndarray | None = None, bank_labels: np.ndarray | None = None, power: float = 1.0,
                      threshold: float = 0.03, chunk: int = 512) -> np.ndarray:
    """``s_i = sum_j sign(r_ij) |r_ij|^power [|r_ij| > threshold]`` for each row of ``feat`` against ``bank``.

    ``feat``/``bank`` must be L2-normalised; ``prob``/``bank_prob`` are ``None`` for the ``cos`` kernel.
    """
    out = np.empty(len(feat))
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    bank_prob = None if bank_prob is None else np.ascontiguousarray(bank_prob, dtype=np.float32)

    def padded(rows: np.ndarray) -> np.ndarray:
        # float32 GEMM picks its kernel by the number of rows, which changes the rounding: every block goes
        # through the kernel at a fixed size, so a sample's score does not depend on the batch it comes in
        block = np.zeros((chunk, rows.shape[1]), dtype=np.float32)
        block[:len(rows)] = rows
        return block

    for start in range(0, len(feat), chunk):
        n = len(feat[start:start + chunk])
        rel = (padded(np.asarray(feat[start:start + chunk], dtype=np.float32)) @ bank.T)[:n]
        np.maximum(rel, 0.0, out=rel)
        if prob is not None:
            rel *= (padded(np.asarray(prob[start:start + chunk], dtype=np.float32)) @ bank_prob.T)[:n]
        rel[rel <= threshold] = 0.0     # relations are >= 0 here; the label sign is applied after the cut
        if power != 1:
            rel **= power
        if labels is not None:
            same = labels[start:start + chunk, None] == bank_labels[None, :]
            out[start:start + chunk] = (rel * same).sum(axis=1, dtype=np.float64) \
                - (rel * ~same).sum(axis=1, dtype=np.float64)
        else:
            out[start:start + chunk] = rel.sum(axis=1, dtype=np.float64)
    return out


def label_error_scores(data: Outputs, power: float = 4.0, reg: float = 0.05, n_iter: int = 2,
                       kernel: str = "cos_p", threshold: float = 0.03, chunk: int = 512) -> np.ndarray:
    """Label-error score of every labelled sample in ``data`` (higher = more likely mislabelled).

    Uses the features, the labels and (kernel ``cos_p``) the softmax of the logits of ``data``; the relation
    graph is built among the samples of ``data`` themselves (self-relations included, as in the authors' code).
    """
    who = "relation_graph.label_error_scores"
    if kernel not in KERNELS:
        raise ValueError(f"{who}: kernel must be one of {KERNELS}, got {kernel!r}")
    features = data.get(Need.FEATURES, who=who)
    labels = np.asarray(data.get(Need.LABELS, who=who))
    feat = l2_normalize(np.asarray(features, dtype=np.float32))
    prob = probabilities(data.get(Need.LOGITS, who=who)).astype(np.float32) if kernel == "cos_p" else None
    args = dict(power=power, threshold=threshold, chunk=chunk)
    original = relation_strength(feat, prob, feat, prob, labels, labels, **args)
    score = original.copy()
    for _ in range(1, n_iter):
        noisy = score / np.abs(score).max() < -reg
        if noisy.any():
            removed = relation_strength(feat, prob, feat[noisy], None if prob is None else prob[noisy],
                                        labels, labels[noisy], **args)
            score = original - 2.0 * removed
    return -score


class NeuralRelationGraph(Detector):
    """``score(x) = -sum_j r(x, x_j)^t`` over the training graph (higher = more OOD)."""

    name = "relation_graph"
    needs = frozenset({Need.FEATURES, Need.LOGITS})
    grid = {"power": [1, 2, 4]}

    def __init__(self, kernel: str = "cos_p", power: float = 1.0, threshold: float = 0.03, chunk: int = 512):
        self.kernel = kernel
        self.power = power
        self.threshold = threshold
        self.chunk = chunk

    def _check_params(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"relation_graph: kernel must be one of {KERNELS}, got {self.kernel!r}")
        if not self.power > 0:
            raise ValueError(f"relation_graph: power (the kernel temperature t) must be > 0, got {self.power!r}")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"relation_graph: threshold must be in [0, 1), got {self.threshold!r}")

    def _probs(self, data: Outputs) -> np.ndarray | None:
        return probabilities(data.logits).astype(np.float32) if self.kernel == "cos_p" else None

    def _fit(self, train: Outputs) -> None:
        self.bank_ = l2_normalize(np.asarray(train.features, dtype=np.float32))
        self.bank_prob_ = self._probs(train)

    def _score(self, x: Outputs) -> np.ndarray:
        feat = l2_normalize(np.asarray(x.features, dtype=np.float32))
        return -relation_strength(feat, self._probs(x), self.bank_, self.bank_prob_, power=self.power,
                                  threshold=self.threshold, chunk=self.chunk)

    def label_error_scores(self, data: Outputs, power: float = 4.0, reg: float = 0.05, n_iter: int = 2) -> np.ndarray:
        """Label-error scores of ``data`` (its own relation graph; see :func:`label_error_scores`)."""
        return label_error_scores(data, power=power, reg=reg, n_iter=n_iter, kernel=self.kernel,
                                  threshold=self.threshold, chunk=self.chunk)
