"""Gaussian AD: a multivariate Gaussian per feature level of an ImageNet network, Mahalanobis distance.

Rippel, Mertens & Merhof, "Modeling the Distribution of Normal Data in Pre-Trained Deep Features for Anomaly
Detection", ICPR 2020. The output of each level (block) of an ImageNet EfficientNet is spatially averaged, a
multivariate Gaussian ``N(mu_l, Sigma_l)`` is fitted per level on the defect-free images with Ledoit-Wolf
shrinkage (Sec. 3.2), and the image score is the Mahalanobis distance ``M_l(x) = sqrt((x_l - mu_l)^T
Sigma_l^{-1} (x_l - mu_l))`` (Eq. 3), averaged over the levels (the paper's sum up to a constant; the reference
code averages). Levels here: EfficientNet-Lite0's ``stage1`` ... ``stage7`` and ``head`` (the paper: the blocks
of EfficientNet-B4).

The "NPCA" variant (Sec. 4.4, ``npca_variance=0.99`` as in the paper's experiments) first projects each level
onto the principal components of *least* variance: PCA of the pooled training features, components sorted by
explained variance, and only those past the point where the cumulative explained-variance ratio exceeds
``npca_variance`` are kept (including the component that crosses it). The Gaussian is then fitted in that
subspace. This is an image-level method: it gives no anomaly map (``localises = False``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import ImageDetector, resolve_backbone

LEVELS = ("stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head")


class GaussianAD(ImageDetector):
    """Mean over levels of the Mahalanobis distance of pooled features (see module docstring)."""

    name = "gaussian_ad"
    localises = False
    grid = {"npca_variance": [None, 0.99]}

    def __init__(self, backbone="efficientnet_lite0", layers: Sequence[str] = LEVELS,
                 npca_variance: float | None = None, device: str = "cpu"):
        self.backbone = backbone
        self.layers = layers
        self.npca_variance = npca_variance
        self.device = device  # where the backbone runs

    def _check_params(self) -> None:
        if len(self.layers) < 1:
            raise ValueError(f"{self.name}: give at least one feature level")
        if self.npca_variance is not None and not 0.0 < self.npca_variance < 1.0:
            raise ValueError(f"{self.name}: npca_variance must be in (0, 1) or None, got {self.npca_variance}")

    def _pooled(self, images: np.ndarray) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = [[] for _ in self.layers]
        for _, features in self.backbone_.batches(images, self.layers):
            for i, name in enumerate(self.layers):
                parts[i].append(features[name].mean(dim=(2, 3)).double().numpy())
        return [np.concatenate(p) for p in parts]

    def _fit(self, images: np.ndarray) -> None:
        from scipy.linalg import cholesky
        from sklearn.covariance import ledoit_wolf

        if len(images) < 2:
            raise ValueError(f"{self.name}: fitting a Gaussian needs at least 2 training images, got {len(images)}")
        self.backbone_ = resolve_backbone(self.backbone, device=self.device)
        levels = self._pooled(images)
        self.means_, self.components_, self.cholesky_ = [], [], []
        for x in levels:
            mean = x.mean(axis=0)
            components = None
            if self.npca_variance is not None:
                centred = x - mean
                _, s, vt = np.linalg.svd(centred, full_matrices=False)
                ratio = np.cumsum(s ** 2) / np.sum(s ** 2)
                last = int(np.argmax(ratio > self.npca_variance))
                components = vt[max(last - 1, 0):]
                x = centred @ components.T
            self.means_.append(mean)
            self.components_.append(components)
            covariance, _ = ledoit_wolf(x)  # shrunk covariance; its Cholesky factor replaces an explicit inverse
            self.cholesky_.append(cholesky(covariance, lower=True))

    def _predict(self, images: np.ndarray) -> tuple[np.ndarray, None]:
        from scipy.linalg import solve_triangular

        distances = []
        for x, mean, components, chol in zip(self._pooled(images), self.means_, self.components_, self.cholesky_):
            diff = x - mean if components is None else (x - mean) @ components.T
            # (x - mu)^T Sigma^-1 (x - mu) = ||L^-1 (x - mu)||^2 with Sigma = L L^T
            distances.append(np.linalg.norm(solve_triangular(chol, diff.T, lower=True), axis=0))
        return np.mean(distances, axis=0), None


class GaussianADNPCA(GaussianAD):
    """Gaussian AD on the low-variance principal components of each level (NPCA, variance threshold 0.99)."""

    name = "gaussian_ad_npca"
    grid = {"npca_variance": [0.9, 0.95, 0.99]}

    def __init__(self, backbone="efficientnet_lite0", layers: Sequence[str] = LEVELS,
                 npca_variance: float | None = 0.99, device: str = "cpu"):
        super().__init__(backbone, layers, npca_variance, device)
