"""Residual: the norm of the feature outside the principal subspace (the residual part of ViM).

Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022, Sec. 4 (the
"Residual" baseline of Tables 1-2). The origin is moved to ``o = -pinv(W) b`` (so logits are linear in
``x - o``), ``P`` spans the top-``D`` eigenvectors of the ID training covariance around ``o``, and the OOD score
is ``||x^{P⊥}|| = ||(I - P P^T)(x - o)||`` (Eq. 6). Default ``D`` as in ViM (1000 for 2048+-d features, 512 for
768+, else half the dimension).
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import as_float64
from ._shaping import check_subspace_dim
from .base import Detector
from .vim import default_principal_dim


def principal_complement(centered: np.ndarray, dim: int) -> np.ndarray:
    """Orthonormal basis (columns) of the complement of the top-``dim`` eigenvectors of ``centered.T @ centered``."""
    _, eigenvectors = np.linalg.eigh(centered.T @ centered)  # ascending eigenvalues
    return np.ascontiguousarray(eigenvectors[:, : centered.shape[1] - dim])


class Residual(Detector):
    """``score(x) = ||(I - P P^T)(x - o)||``."""

    name = "residual"
    needs = frozenset({Need.FEATURES, Need.HEAD})
    grid = {"dim": [8, 16, 32, 48]}

    def __init__(self, dim: int | None = None):
        self.dim = dim

    def _fit(self, train: Outputs) -> None:
        width = train.features.shape[1]
        dim = check_subspace_dim(self.name, default_principal_dim(width) if self.dim is None else self.dim, width)
        self.origin_ = -np.linalg.pinv(as_float64(train.head.W)) @ as_float64(train.head.b)
        self.complement_ = principal_complement(as_float64(train.features) - self.origin_, dim)

    def _fit_shards(self, shards) -> None:
        """Fit from the merged per-shard second moment about the origin
        (:func:`oodscope.detectors.sharded.fit_from_shards`)."""
        from ._sufficient import centred_moment

        self.origin_, moment = centred_moment(shards, self.name)
        width = len(self.origin_)
        dim = check_subspace_dim(self.name, default_principal_dim(width) if self.dim is None else self.dim, width)
        _, eigenvectors = np.linalg.eigh(moment.scatter)  # ascending eigenvalues
        self.complement_ = np.ascontiguousarray(eigenvectors[:, : width - dim])

    def _score(self, x: Outputs) -> np.ndarray:
        return np.linalg.norm((as_float64(x.features) - self.origin_) @ self.complement_, axis=1)
