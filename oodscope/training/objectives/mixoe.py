"""MixOE: mixing ID images with outliers, trained towards targets that decay from the label to uniform.

Zhang, Inkawhich, Linderman, Chen & Li, "Mixture Outlier Exposure: Towards Out-of-Distribution Detection in
Fine-grained Environments", WACV 2023, Eq. 3-5: per step one ``lambda ~ Beta(alpha, alpha)``; a mixed batch
``x~ = lambda x + (1 - lambda) x'`` (mixup) or ``x`` with a box of the outliers pasted in, ``lambda`` set to the
box's complement area (CutMix: the outlier patch goes into the ID image, as the authors found better); the target
``y~ = lambda onehot(y) + (1 - lambda) / C``, and

    ``L = CE(f(x), y) + beta * SoftCE(f(x~), y~)``,  ``SoftCE(p, q) = -sum_c q_c log softmax(p)_c``.

Defaults from the authors' released code (``train/train_mixoe.py``): ``alpha = 1``, ``beta = 1`` (their scripts use
``beta = 5`` for the fine-grained sets), outlier batches as large as the ID batch (the first ``B`` outliers of the
engine's outlier batch are mixed). The mix is taken on the raw images, before the model's affine normalisation,
which commutes with a convex combination. Scored with MSP.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...extraction.outputs import Need
from ..objective import Objective, check_positive


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """CutMix's box (Yun et al. 2019): sides ``sqrt(1 - lam)`` of the image's, centre uniform, clipped."""
    cut = np.sqrt(1.0 - lam)
    h, w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    return (int(np.clip(cy - h // 2, 0, height)), int(np.clip(cy + h // 2, 0, height)),
            int(np.clip(cx - w // 2, 0, width)), int(np.clip(cx + w // 2, 0, width)))


class MixOE(Objective):
    """``L = CE(f(x), y) + beta SoftCE(f(mix(x, x')), lambda onehot(y) + (1 - lambda) / C)``."""

    name = "mixoe"
    needs = frozenset({Need.LABELS, Need.OUTLIERS})
    score = "msp"

    def __init__(self, mix: str = "mixup", alpha: float = 1.0, beta: float = 1.0):
        self.mix = mix
        self.alpha = alpha
        self.beta = beta

    def check_params(self) -> None:
        if self.mix not in ("mixup", "cutmix"):
            raise ValueError(f"{self.name}: mix must be 'mixup' or 'cutmix', got {self.mix!r}")
        check_positive(self.name, "alpha", self.alpha)
        check_positive(self.name, "beta", self.beta)

    def batch(self, x, x_out, generator) -> tuple[Any, dict]:
        import torch

        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        lam = float(rng.beta(self.alpha, self.alpha))
        x_out = x_out[:len(x)]
        if len(x_out) < len(x):
            raise ValueError(f"{self.name}: needs at least as many outliers per step as ID images ({len(x)})")
        if self.mix == "mixup":
            mixed = lam * x.float() + (1.0 - lam) * x_out.float()
        else:  # channels-last (B, H, W, C) raw images: paste the outliers' box into the ID images
            top, bottom, left, right = cutmix_box(x.shape[1], x.shape[2], lam, rng)
            mixed = x.clone()
            mixed[:, top:bottom, left:right] = x_out[:, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (x.shape[1] * x.shape[2])
        return torch.cat([x.float(), mixed.float()]), {"lam": lam}

    def loss(self, logits, labels, outlier_logits=None, lam: float = 1.0, **context):
        from torch.nn import functional as F

        ce = F.cross_entropy(logits, labels)
        n_classes = logits.shape[1]
        target = lam * F.one_hot(labels, n_classes).to(logits.dtype) + (1.0 - lam) / n_classes
        soft = -(target * outlier_logits.log_softmax(dim=1)).sum(dim=1).mean()
        return ce + self.beta * soft, {"ce": float(ce.detach()), "mixed": float(soft.detach())}
