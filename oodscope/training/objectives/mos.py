"""MOS: group-based softmax with an "others" class per group, scored by the minimum others score.

Huang & Li, "MOS: Towards Scaling Out-of-distribution Detection for Large Semantic Space", CVPR 2021 (Sec. 3;
details from the authors' ``finetune.py`` / ``test_mos.py``). The ``K`` classes are split into ``G`` groups; group
``k`` gets its classes plus an "others" category, and a sample's label in group ``k`` is its class if the class is in
``k``, else "others". The loss sums the group-wise cross-entropies (Eq. 2)

    ``L = -(1/N) sum_n sum_k log p_k(t_k(x_n) | x_n)``,  ``p_k = softmax`` over group ``k``'s logits,

the prediction is the class of highest within-group probability over all groups, and the OOD score (Eq. 4) is the
**minimum others score** ``MOS(x) = -min_k p_k(others | x)`` as the ID confidence; oodscope's ``min_others``
detector gives ``min_k p_k(others | x)`` (higher = more OOD) from the deployed model's ``fc.others_probability``.

Groups: ``groups=[g_0, ..., g_{K-1}]`` (class ``c`` in group ``g_c``) where the data has a hierarchy (the paper's
ImageNet taxonomy: 8 groups); otherwise (``groups=None``, the default, and the case of CIFAR-10, which ships no
hierarchy) k-means with ``n_groups`` clusters on the L2-normalised class means of the pretrained model's penultimate
features on the training images (the paper's "feature clustering" grouping, its second best after the taxonomy).
The chosen grouping is kept in ``groups_``. The head (:func:`oodscope.training.heads.group_softmax_head`) starts
from the pretrained class rows with zero "others" rows. The authors fine-tune only the head of a BiT-S-R101x1
(20k steps); here the whole network is fine-tuned on the engine's schedule.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...extraction.outputs import Need
from ..objective import Objective, check_positive

N_MEANS_IMAGES = 5000  # training images whose features give the class means for the k-means grouping


def kmeans_groups(features: np.ndarray, labels: np.ndarray, n_classes: int, n_groups: int, seed: int = 0):
    """Group of each class: k-means (``n_init = 10``) on the L2-normalised class means of ``features``."""
    from sklearn.cluster import KMeans

    missing = sorted(set(range(n_classes)) - set(np.unique(labels).tolist()))
    if missing:
        raise ValueError(f"mos: classes {missing[:5]} have no training image; cannot form feature-cluster groups")
    means = np.stack([features[labels == c].mean(axis=0) for c in range(n_classes)]).astype(np.float64)
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    clusters = KMeans(n_clusters=n_groups, n_init=10, random_state=seed).fit_predict(means)
    _, relabelled = np.unique(clusters, return_inverse=True)  # groups numbered 0..G-1 in order of first class
    first = {g: c for c, g in reversed(list(enumerate(relabelled)))}
    rank = {g: i for i, g in enumerate(sorted(first, key=first.get))}
    return np.array([rank[g] for g in relabelled], dtype=np.int64)


class MOS(Objective):
    """``L = -sum_k log p_k(t_k(x))``, group softmax with an "others" class per group."""

    name = "mos"
    needs = frozenset({Need.LABELS})
    score = "min_others"

    def __init__(self, groups: tuple[int, ...] | None = None, n_groups: int = 4):
        self.groups = groups
        self.n_groups = n_groups

    def check_params(self) -> None:
        if self.groups is None:
            check_positive(self.name, "n_groups", self.n_groups)
            if not isinstance(self.n_groups, int) or self.n_groups < 2:
                raise ValueError(f"{self.name}: n_groups must be an integer >= 2, got {self.n_groups!r}")

    def adapt(self, model, n_classes: int, train, preprocess) -> Any:
        from ..heads import group_softmax_head, head_name, replace_module

        if self.groups is not None:
            groups = np.asarray(self.groups, dtype=np.int64)
            if groups.shape != (n_classes,):
                raise ValueError(f"{self.name}: groups needs one group per class ({n_classes}), got {len(groups)}")
        else:
            if self.n_groups >= n_classes:
                raise ValueError(f"{self.name}: n_groups ({self.n_groups}) must be below the {n_classes} classes")
            groups = kmeans_groups(*self._train_features(model, train, preprocess), n_classes, self.n_groups)
        self.groups_ = groups
        name = head_name(model)
        head = group_softmax_head(model.get_submodule(name), groups)
        head.joint = True
        replace_module(model, name, head)
        self.head_name_ = name
        self.width_ = int(head.padded.shape[1])
        self.within_ = (head.flat_index % self.width_).cpu().numpy()  # column of each class inside its group
        return model

    @staticmethod
    def _train_features(model, train, preprocess):
        import torch

        from ...extraction.extract import evaluation_mode
        from ..heads import penultimate

        images, labels = train
        pick = np.random.default_rng(0).permutation(len(images))[:N_MEANS_IMAGES]
        prep = preprocess if preprocess is not None else (lambda batch: batch.float())
        device = next(model.parameters()).device
        with evaluation_mode(model):
            features = [penultimate(model, prep(torch.from_numpy(images[rows]).to(device)))[0].double().cpu().numpy()
                        for rows in np.array_split(pick, max(1, len(pick) // 500))]
        return np.concatenate(features), labels[pick]

    def targets(self, labels):
        """``t_k``: per sample and group, the class's column in its own group and "others" (0) elsewhere."""
        import torch

        groups = torch.as_tensor(self.groups_, device=labels.device)
        within = torch.as_tensor(self.within_, device=labels.device)
        target = torch.zeros(len(labels), int(groups.max()) + 1, dtype=torch.long, device=labels.device)
        target[torch.arange(len(labels), device=labels.device), groups[labels]] = within[labels]
        return target

    def score_detector(self):
        from ...detectors import create

        return create(self.score, layers=(f"{getattr(self, 'head_name_', 'fc')}.others_probability",))

    def loss(self, logits, labels, outlier_logits=None, **context):
        # logits: the head's joint output, per-group log-probabilities (N, G, W)
        nll = -logits.gather(2, self.targets(labels)[:, :, None]).squeeze(2).sum(dim=1).mean()
        return nll, {"group_ce": float(nll.detach())}
