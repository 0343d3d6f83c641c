"""DOS: diverse outlier sampling with an absent-category loss.

Jiang, Han, Liu, Liu & Han, "Diverse Outlier Sampling Improves Out-of-Distribution Detection", ICLR 2024 (Sec. 3,
Algorithm 1; defaults from the authors' released ``train_diverse.py``). Each step, from a candidate pool of
outliers (the engine's outlier batch):

1. run the current model (eval mode, no gradient) on the pool (``pool`` x ``m`` candidates, 6 x 64 = 384 in the
   paper); take the penultimate features ``phi(x')``,
   L2-normalised, and the absent-class probability ``p_{K+1}(x') = softmax(f(x'))_{K+1}``;
2. cluster the normalised features with k-means into ``m`` clusters (``m`` = the number of outliers per step,
   the ID batch size by default; scikit-learn's ``KMeans`` with ``n_init = 5``);
3. from each cluster keep the most informative outlier: the one with the **smallest** ``p_{K+1}`` (the most
   ID-like, closest to the boundary);

and train the ``K + 1``-way classifier (an absent class for outliers) with the absent-category loss (Eq. 2)

    ``L = CE_{K+1}(f(x), y) + beta * CE_{K+1}(f(x'_selected), K + 1)``,  ``beta = 1``.

The head gets one zero-initialised absent row next to the pretrained class rows
(:func:`oodscope.training.heads.absent_class_head`). The paper scores with ``1 - p_{K+1}`` as the ID confidence;
oodscope's ``absent_class`` detector gives ``p_{K+1}`` (higher = more OOD) from the deployed model's
``fc.absent_probability`` layer. The authors train a DenseNet-101 from scratch for 100 epochs (ID/outlier batch
64/64 from a pool of 384); here it is fine-tuning on the engine's schedule.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...extraction.outputs import Need
from ..objective import Objective, check_positive


def diverse_selection(features: np.ndarray, absent: np.ndarray, n_select: int, seed: int,
                      n_init: int = 5) -> np.ndarray:
    """Indices of ``n_select`` rows: k-means on the L2-normalised ``features``, per cluster the row of smallest
    ``absent`` probability (ties: the first row). Clusters are sklearn ``KMeans(n_select, n_init=n_init)``."""
    from sklearn.cluster import KMeans

    normalised = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    clusters = KMeans(n_clusters=n_select, n_init=n_init, random_state=seed).fit_predict(normalised)
    order = np.lexsort((np.arange(len(absent)), absent, clusters))  # by cluster, then absent probability
    _, first = np.unique(clusters[order], return_index=True)
    return np.sort(order[first])


class DOS(Objective):
    """``L = CE_{K+1}(f(x), y) + beta CE_{K+1}(f(x'), K+1)`` on k-means-diverse, most ID-like outliers."""

    name = "dos"
    needs = frozenset({Need.LABELS, Need.OUTLIERS})
    score = "absent_class"

    def __init__(self, beta: float = 1.0, n_select: int | None = None, pool: int = 6, n_init: int = 5):
        self.beta = beta
        self.n_select = n_select
        self.pool = pool
        self.n_init = n_init

    def check_params(self) -> None:
        check_positive(self.name, "beta", self.beta)
        if self.n_select is not None:
            check_positive(self.name, "n_select", self.n_select)
        check_positive(self.name, "n_init", self.n_init)
        if not (isinstance(self.pool, int) and self.pool >= 2):
            raise ValueError(f"{self.name}: pool (candidates per selected outlier) must be an integer >= 2, got "
                             f"{self.pool!r}")

    def outliers_per_step(self, batch_size: int, outlier_batch_size: int) -> int:
        return int(self.pool * (self.n_select or batch_size))  # the candidate pool (paper: 6 x 64 = 384)

    def adapt(self, model, n_classes: int, train, preprocess) -> Any:
        from ..heads import absent_class_head, head_name, replace_module

        name = head_name(model)
        head = absent_class_head(model.get_submodule(name))
        head.joint = True
        replace_module(model, name, head)
        self.head_name_ = name
        return model

    def select_outliers(self, x, x_out, model, preprocess, generator) -> Any:
        import torch

        from ...extraction.extract import evaluation_mode
        from ..heads import penultimate

        n_select = int(self.n_select or len(x))
        if n_select >= len(x_out):
            raise ValueError(f"{self.name}: selects {n_select} outliers per step from a pool of {len(x_out)}; "
                             "the pool must be larger (pool=6 as in the paper)")
        device = next(model.parameters()).device
        with evaluation_mode(model):
            features, logits = penultimate(model, preprocess(x_out.to(device)))
        absent = logits.float().softmax(dim=1)[:, -1]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        keep = diverse_selection(features.float().cpu().numpy(), absent.cpu().numpy(), n_select, seed, self.n_init)
        return x_out[torch.from_numpy(keep)]

    def score_detector(self):
        from ...detectors import create

        return create(self.score, layers=(f"{getattr(self, 'head_name_', 'fc')}.absent_probability",))

    def loss(self, logits, labels, outlier_logits=None, **context):
        import torch
        from torch.nn import functional as F

        ce = F.cross_entropy(logits, labels)
        absent = torch.full((len(outlier_logits),), logits.shape[1] - 1, dtype=torch.long, device=logits.device)
        outlier = F.cross_entropy(outlier_logits, absent)
        return ce + self.beta * outlier, {"ce": float(ce.detach()), "absent": float(outlier.detach())}
