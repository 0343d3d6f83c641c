"""SAL: separate candidate outliers from unlabelled wild data with gradients, then learn to tell them from ID.

Du, Fang, Guo & Li, "How Does Unlabeled Data Provably Help Out-of-Distribution Detection?", ICLR 2024 (Sec. 4,
"Separate And Learn"; details and defaults from the authors' ``main.py``).

**Wild data** (Sec. 3): the Huber mixture ``P_wild = (1 - pi) P_in + pi P_out``: unlabelled ID training images
(``n_wild`` of them, all by default) mixed with auxiliary outliers (``tin_aux_train.npz``) so that a share ``pi``
(0.1, the code's ``--ood_rate``) of the wild set is outliers; built by :func:`wild_mixture`, seeded.

**Filtering** (Sec. 4.1): with the pretrained classifier ``h_W`` and its predicted labels ``y_hat``, the gradient of
each wild sample's loss w.r.t. the last layer's weights, ``grad_i = d CE(h_W(x_i), y_hat_i) / dW =
(softmax(f(x_i)) - e_{y_hat_i}) phi(x_i)^T`` (closed form, :func:`last_layer_gradients`), centred by the reference
gradient ``grad_bar`` (the mean over the labelled ID data, true labels: the code's ``cal_avg_clean``), stacked into
``G``; ``v`` = the top right singular vector of ``G``; the filtering score is the squared projection

    ``tau_i = ((grad_i - grad_bar) . v)^2``  (the code: ``|(grad_i - grad_bar) . v|``, the same ranking),

and the candidate outliers are ``S_T = {x_i : tau_i > T}``, ``T`` the ``thres_id`` = 95 % quantile of the same score
on the labelled ID data (the code's ``--thres_id 0.95``; it projects the ID gradients on their own top singular
vector, here on the wild data's ``v``, the direction that separates).

**Learning** (Sec. 4.2, the code's binary stage): a logistic unit ``s`` on the penultimate features
(:func:`oodscope.training.heads.outlier_logit_head`) learns ID (1) vs. candidates (0) while the classifier keeps
its cross-entropy:

    ``L = CE(f(x), y) + beta * BCE(s([x, x']), [1, 0])``,  ``beta = 10`` (``--ft_weight``),

ID and candidate batches of equal size (128 / 128 in the code). Scored with ``ood_probability`` =
``sigmoid(-s)`` from the deployed model's ``fc.ood_probability`` layer. The code fine-tunes its pretrained
WideResNet-40-2 for 100 epochs (lr 0.001, cosine); here the engine's schedule. The filter's outcome (candidates,
threshold, and, since the planted outliers are known, precision and recall) is kept in ``filter_``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...extraction.outputs import Need
from ..objective import Objective, check_positive


def check_pi(who: str, pi: Any) -> None:
    if not (isinstance(pi, (int, float)) and not isinstance(pi, bool) and 0 < pi < 1):
        raise ValueError(f"{who}: pi (the share of outliers in the wild data) must lie in (0, 1), got {pi!r}")


def wild_mixture(id_images: np.ndarray, outliers: np.ndarray, pi: float, n_id: int | None = None,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(wild images, is_outlier)``: ``n_id`` unlabelled ID images (all by default) and
    ``round(pi n_id / (1 - pi))`` auxiliary outliers (drawn without replacement), shuffled; seeded."""
    check_pi("wild_mixture", pi)
    if outliers is None or len(outliers) == 0:
        raise ValueError("wild_mixture: the wild data needs auxiliary outliers (e.g. tin_aux_train.npz); got none")
    if len(id_images) == 0:
        raise ValueError("wild_mixture: no ID images for the wild data")
    rng = np.random.default_rng(seed)
    n_id = len(id_images) if n_id is None else min(int(n_id), len(id_images))
    n_out = int(round(pi * n_id / (1 - pi)))
    if n_out < 1:
        raise ValueError(f"wild_mixture: pi = {pi} of {n_id} ID images leaves no outlier in the wild data; raise pi "
                         "or n_wild")
    if n_out > len(outliers):
        raise ValueError(f"wild_mixture: pi = {pi} with {n_id} ID images needs {n_out} outliers, only "
                         f"{len(outliers)} given; lower n_wild or pi")
    ids = rng.choice(len(id_images), n_id, replace=False)
    outs = rng.choice(len(outliers), n_out, replace=False)
    images = np.concatenate([id_images[ids], outliers[outs]])
    is_outlier = np.r_[np.zeros(n_id, bool), np.ones(n_out, bool)]
    order = rng.permutation(len(images))
    return images[order], is_outlier[order]


def last_layer_gradients(logits: np.ndarray, features: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Per sample, ``d CE(f(x), y) / dW`` of the last linear layer ``f = W phi + b``, flattened ``(N, K d)``:
    ``(softmax(f) - e_y) phi^T``; ``y`` = the predicted labels when ``labels`` is None."""
    logits = np.asarray(logits, dtype=np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    labels = logits.argmax(axis=1) if labels is None else np.asarray(labels)
    probs[np.arange(len(probs)), labels] -= 1.0
    return (probs[:, :, None] * np.asarray(features, dtype=np.float64)[:, None, :]).reshape(len(probs), -1)


def filtering_scores(gradients: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(tau, v)``: ``v`` the top right singular vector of ``G = gradients - reference`` and
    ``tau_i = (G_i . v)^2`` (SAL Sec. 4.1)."""
    centred = np.asarray(gradients, dtype=np.float64) - reference
    if len(centred) < 2 or not np.isfinite(centred).all():
        raise ValueError(f"SAL filter: need at least 2 finite wild gradients, got {len(centred)}")
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    if singular[0] <= 1e-12 * max(1.0, np.abs(centred).max()):
        raise ValueError("SAL filter: the centred wild gradients are all zero; the wild data cannot be separated")
    v = vt[0]
    return (centred @ v) ** 2, v


def filter_candidates(wild_gradients: np.ndarray, id_gradients: np.ndarray,
                      thres_id: float = 0.95) -> tuple[np.ndarray, float, np.ndarray]:
    """``(candidate mask, threshold T, wild scores)``: ``tau`` of every wild sample centred by the mean ID
    gradient, ``T`` the ``thres_id`` quantile of the ID data's ``tau`` along the same ``v``."""
    reference = np.asarray(id_gradients, dtype=np.float64).mean(axis=0)
    scores, v = filtering_scores(wild_gradients, reference)
    threshold = float(np.quantile(((id_gradients - reference) @ v) ** 2, thres_id))
    return scores > threshold, threshold, scores


class SAL(Objective):
    """Filter wild data by the top singular vector of its gradients; ``L = CE + beta BCE(ID vs candidates)``."""

    name = "sal"
    needs = frozenset({Need.LABELS, Need.OUTLIERS})
    score = "ood_probability"

    def __init__(self, pi: float = 0.1, thres_id: float = 0.95, beta: float = 10.0, n_wild: int | None = None,
                 n_reference: int = 10000):
        self.pi = pi
        self.thres_id = thres_id
        self.beta = beta
        self.n_wild = n_wild
        self.n_reference = n_reference

    def check_params(self) -> None:
        check_pi(self.name, self.pi)
        if not (isinstance(self.thres_id, (int, float)) and 0 < self.thres_id < 1):
            raise ValueError(f"{self.name}: thres_id (the ID quantile of the threshold) must lie in (0, 1), got "
                             f"{self.thres_id!r}")
        check_positive(self.name, "beta", self.beta)
        check_positive(self.name, "n_reference", self.n_reference)
        if self.n_wild is not None:
            check_positive(self.name, "n_wild", self.n_wild)

    def outliers_per_step(self, batch_size: int, outlier_batch_size: int) -> int:
        return batch_size  # equal ID and candidate batches, as in the code

    def adapt(self, model, n_classes: int, train, preprocess) -> Any:
        from ..heads import head_name, outlier_logit_head, replace_module

        name = head_name(model)
        head = outlier_logit_head(model.get_submodule(name))
        head.joint = True
        replace_module(model, name, head)
        self.head_name_, self.head_ = name, head
        return model

    def _logits_and_features(self, model, images: np.ndarray, preprocess) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from ...extraction.extract import evaluation_mode
        from ..heads import penultimate

        device = next(model.parameters()).device
        logits, features = [], []
        with evaluation_mode(model):
            for rows in np.array_split(np.arange(len(images)), max(1, len(images) // 500)):
                phi, _ = penultimate(model, preprocess(torch.from_numpy(images[rows]).to(device)))
                with torch.no_grad():
                    logits.append(self.head_.classes(phi).double().cpu().numpy())
                features.append(phi.double().cpu().numpy())
        return np.concatenate(logits), np.concatenate(features)

    def prepare_outliers(self, model, train, outliers, preprocess, seed: int) -> Any:
        images, labels = train
        wild, is_outlier = wild_mixture(images, outliers, self.pi, self.n_wild, seed)
        wild_logits, wild_features = self._logits_and_features(model, wild, preprocess)
        pick = np.sort(np.random.default_rng(seed).permutation(len(images))[:int(self.n_reference)])
        id_logits, id_features = self._logits_and_features(model, images[pick], preprocess)
        candidates, threshold, _ = filter_candidates(last_layer_gradients(wild_logits, wild_features),
                                                     last_layer_gradients(id_logits, id_features, labels[pick]),
                                                     self.thres_id)
        if not candidates.any():
            raise ValueError(f"{self.name}: no wild sample scores above the ID threshold {threshold:.3g}; raise pi "
                             f"(now {self.pi}) or lower thres_id (now {self.thres_id})")
        caught = int((candidates & is_outlier).sum())
        self.filter_ = {"wild": int(len(wild)), "planted": int(is_outlier.sum()), "candidates": int(candidates.sum()),
                        "threshold": threshold, "precision": caught / int(candidates.sum()),
                        "recall": caught / int(is_outlier.sum())}
        return wild[candidates]

    def score_detector(self):
        from ...detectors import create

        return create(self.score, layers=(f"{getattr(self, 'head_name_', 'fc')}.ood_probability",))

    def loss(self, logits, labels, outlier_logits=None, **context):
        import torch
        from torch.nn import functional as F

        ce = F.cross_entropy(logits[:, :-1], labels)
        s = torch.cat([logits[:, -1], outlier_logits[:, -1]])
        target = torch.cat([torch.ones(len(logits)), torch.zeros(len(outlier_logits))]).to(s)
        bce = F.binary_cross_entropy_with_logits(s.float(), target.float())
        return ce + self.beta * bce, {"ce": float(ce.detach()), "binary": float(bce.detach())}
