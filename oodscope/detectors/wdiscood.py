"""WDiscOOD: whitened linear discriminant analysis.

Chen, Lin, Xu & Vela, "WDiscOOD: Out-of-Distribution Detection via Whitened Linear Discriminant Analysis",
ICCV 2023 (arXiv:2303.07543).

1. Whitening: ``z = x A`` with ``A A^T = S_w^+``, ``S_w = 1/N sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T``
   the within-class scatter, so the within-class scatter of ``z`` is the identity.
2. Whitened LDA: the discriminants maximise the Fisher ratio ``J(w) = w^T S_b w / w^T S_w w`` in the
   whitened space, i.e. the leading eigenvectors of ``(S_w^z + alpha I)^-1 S_b^z`` with
   ``S_b = 1/C sum_c (mu_c - mu)(mu_c - mu)^T``; ``alpha = 1e-3`` as in the authors' code. The top
   ``n_discriminants`` of them span the *discriminative subspace* (default: all ``C - 1`` with non-zero Fisher
   ratio, the rank of ``S_b``); its orthogonal complement is the *residual subspace*.
3. Score: ``S(x) = -min_c ||G(z - mu_c^z)|| - beta * ||H(z - mu^z)||``: Euclidean distance to the
   closest class centre in the discriminative subspace ("ClsEucl") plus ``beta`` times the distance to the
   ID centre in the residual subspace ("CenterEucl"). ``beta = 5`` is the authors' setting for CNN features
   (ResNet-50; 1 for ViT). We return ``-S(x)`` (higher = more OOD).

Fit is one chunked pass for the class statistics plus ``D x D`` eigen-decompositions; scoring never forms the
``D x D`` residual projector per sample (``||H v||^2 = ||v||^2 - ||Q^T v||^2`` with ``Q`` an orthonormal basis of
the discriminative subspace).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import eigh

from ..extraction.outputs import Need, Outputs
from ._classstats import class_stats, rows_per_chunk, n_classes_for
from ._common import l2_normalize
from ._gaussian import whitening
from .base import Detector


class WDiscOOD(Detector):
    """``score(x) = min_c ||G(z - mu_c)|| + beta ||H(z - mu)||`` in the within-class-whitened feature space."""

    name = "wdiscood"
    needs = frozenset({Need.FEATURES, Need.LABELS})
    grid = {"residual_weight": [0.1, 0.5, 1.0, 2.0, 5.0, 10.0]}

    def __init__(self, n_discriminants: int | None = None, residual_weight: float = 5.0, alpha: float = 1e-3,
                 normalize: bool = False):
        self.n_discriminants = n_discriminants
        self.residual_weight = residual_weight
        self.alpha = alpha
        self.normalize = normalize

    def _check_params(self) -> None:
        if self.n_discriminants is not None and not (isinstance(self.n_discriminants, (int, np.integer))
                                                     and self.n_discriminants >= 1):
            raise ValueError(f"wdiscood: n_discriminants must be a positive integer or None, got "
                             f"{self.n_discriminants!r}")
        if not self.residual_weight >= 0:
            raise ValueError(f"wdiscood: residual_weight must be >= 0, got {self.residual_weight!r}")
        if not self.alpha >= 0:
            raise ValueError(f"wdiscood: alpha (ridge added to the whitened within-class scatter) must be >= 0, "
                             f"got {self.alpha!r}")

    def _prepare(self, features: np.ndarray) -> np.ndarray:
        return l2_normalize(np.asarray(features, dtype=np.float64)) if self.normalize else features

    def _fit(self, train: Outputs) -> None:
        n_classes = n_classes_for(train, self.name)
        features = self._prepare(train.features)
        stats = class_stats(features, train.labels, n_classes, self.name)
        # 1. whitening of the within-class scatter (pseudo-inverse: singular directions are dropped)
        self.whitener_ = whitening(stats.within)
        rank = self.whitener_.shape[1]
        class_means = stats.means @ self.whitener_
        centre = stats.mean @ self.whitener_
        # 2. whitened LDA: generalised symmetric eigenproblem S_b v = lambda (S_w^z + alpha I) v
        within_z = self.whitener_.T @ stats.within @ self.whitener_
        between = (class_means - centre).T @ (class_means - centre) / n_classes
        ratios, vectors = eigh(between, within_z + self.alpha * np.eye(rank))
        order = np.argsort(ratios)[::-1]
        ratios, vectors = ratios[order], vectors[:, order]
        k = min(n_classes - 1, rank) if self.n_discriminants is None else self.n_discriminants
        if k > rank:
            raise ValueError(f"wdiscood: n_discriminants={k} exceeds the rank {rank} of the within-class scatter "
                             f"of the training features; use n_discriminants <= {rank}")
        discriminants = vectors[:, :k]
        self.discriminants_ = discriminants / np.linalg.norm(discriminants, axis=0, keepdims=True)  # (rank, k)
        self.fisher_ratios_ = ratios[:k]
        # orthonormal basis of the discriminative subspace; the residual subspace is its complement
        self.basis_, _ = np.linalg.qr(self.discriminants_)
        self.class_means_disc_ = class_means @ self.discriminants_
        self.centre_ = centre

    def decompose(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Whitened features split into (discriminative coordinates ``G z``, residual vector ``H (z - mu)``)."""
        z = self._prepare(features) @ self.whitener_
        v = z - self.centre_
        return z @ self.discriminants_, v - (v @ self.basis_) @ self.basis_.T

    def _score(self, x: Outputs) -> np.ndarray:
        out = np.empty(len(x))
        mean_norms = (self.class_means_disc_**2).sum(axis=1)
        chunk = rows_per_chunk(max(x.features.shape[1], len(self.class_means_disc_)))
        for start in range(0, len(x), chunk):
            z = np.asarray(self._prepare(x.features[start:start + chunk]), dtype=np.float64) @ self.whitener_
            g = z @ self.discriminants_
            squared = (g**2).sum(axis=1, keepdims=True) - 2.0 * g @ self.class_means_disc_.T + mean_norms
            disc = np.sqrt(np.maximum(squared.min(axis=1), 0.0))
            v = z - self.centre_
            residual = np.maximum((v**2).sum(axis=1) - ((v @ self.basis_) ** 2).sum(axis=1), 0.0)
            out[start:start + chunk] = disc + self.residual_weight * np.sqrt(residual)
        return out
