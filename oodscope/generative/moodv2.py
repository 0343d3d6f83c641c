"""MOODv2: features of a masked-image-modelling encoder, scored by a feature-space detector.

Li, Yang, Cui, Shen & Jia, "MOODv2: Masked Image Modeling for Out-of-Distribution Detection" (TPAMI 2024; MOOD,
CVPR 2023): an encoder pretrained by reconstructing masked image patches learns the ID images' intrinsic
structure, and its features separate OOD inputs better than a classifier's; the paper pairs them with the
standard post-hoc detectors on features. Here the encoder is the small MAE of :mod:`oodscope.generative.mae`
trained on the ID images alone (no labels; the paper pretrains BEiT v2 on ImageNet-21k, which no CPU schedule
reaches), its mean output token is the feature, and ``detector`` (any registered detector that needs only
features; default ``knn``, Sun et al. 2022, on L2-normalised features) is fitted on the training features.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..extraction.outputs import Need, Outputs
from .base import GenerativeDetector


class MOODv2(GenerativeDetector):
    """``score(x) = detector(phi_MAE(x))`` with ``detector`` fitted on the training images' MAE features."""

    name = "moodv2"
    model = "mae"

    def __init__(self, detector: str = "knn", detector_params: dict | None = None, patch: int = 4,
                 width: int = 128, depth: int = 4, mask_ratio: float = 0.75, epochs: int = 3,
                 batch_size: int = 64, lr: float = 1e-3, seed: int = 0, device: str = "cpu"):
        self.detector = detector
        self.detector_params = detector_params
        self.patch = patch
        self.width = width
        self.depth = depth
        self.mask_ratio = mask_ratio
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.device = device

    def _feature_detector(self):
        from ..detectors.registry import create, get

        cls = get(self.detector)
        if cls.family not in ("ood", "anomaly") or not cls.needs <= {Need.FEATURES}:
            raise ValueError(f"{self.name}: detector {self.detector!r} needs {sorted(n.value for n in cls.needs)}; "
                             "MOODv2 gives it only features (use e.g. knn, knn_distance, lof, iforest)")
        return create(self.detector, **(self.detector_params or {}))

    def _check_params(self) -> None:
        self._check_training_params("patch", "width", "depth")
        if self.width % 4:
            raise ValueError(f"{self.name}: width must divide by 4 (2-D sine-cosine positions), got {self.width}")
        if not 0.0 < float(self.mask_ratio) < 1.0:
            raise ValueError(f"{self.name}: mask_ratio must lie in (0, 1), got {self.mask_ratio!r}")
        self._feature_detector()

    def _model_settings(self, perturb: float) -> dict[str, Any]:
        return {"model": "mae", "patch": int(self.patch), "width": int(self.width), "depth": int(self.depth),
                "mask_ratio": float(self.mask_ratio), "epochs": int(self.epochs), "batch_size": int(self.batch_size),
                "lr": float(self.lr), "seed": int(self.seed)}

    def _fit(self, images: np.ndarray) -> None:
        if images.shape[2] != images.shape[3] or images.shape[2] % int(self.patch):
            raise ValueError(f"{self.name}: the MAE needs square images whose side divides by patch="
                             f"{self.patch}, got {images.shape[2:]}")
        self.network_, self.training_ = self._density_model(images)
        self.detector_ = self._feature_detector().fit(Outputs(features=self.features(images), name="train"))

    def features(self, images: np.ndarray) -> np.ndarray:
        """MAE features ``(N, width)`` of uint8 ``(N, C, H, W)`` images."""
        from .mae import encode

        return encode(self.network_, images)

    def _score(self, images: np.ndarray) -> np.ndarray:
        return self.detector_.score(Outputs(features=self.features(images), name="test"))
