"""Virtual-logit Matching (ViM).

Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.

1. Move the origin to ``o = -pinv(W) b`` so that logits are linear in the shifted feature (Sec. 4).
2. Principal space ``P``: the top-``D`` eigenvectors of the (origin-centred) training feature covariance;
   the residual is the projection onto the complement, ``x^{P⊥}`` (Eq. 6).
3. Virtual logit ``l_0 = alpha * ||x^{P⊥}||`` with ``alpha = sum_i max_j l_ij / sum_i ||x_i^{P⊥}||`` over the
   training set (Eq. 8).
4. ViM score: the softmax probability of the virtual logit (Eq. 9); it is monotone in
   ``l_0 - log sum_j exp(l_j)``, which is what we return (higher = more OOD).

Default ``D`` follows the paper's code: 1000 for features of 2048+ dims, 512 for 768+, else half the dimension.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from ..extraction.outputs import Need, Outputs
from ._common import as_float64
from ._gaussian import chunks, rows_per_chunk, second_moment
from .base import Detector


def default_principal_dim(n_features: int) -> int:
    if n_features >= 2048:
        return 1000
    if n_features >= 768:
        return 512
    return n_features // 2


class ViM(Detector):
    """``score(x) = alpha * ||x^{P⊥}|| - logsumexp(f(x))``."""

    name = "vim"
    needs = frozenset({Need.FEATURES, Need.LOGITS, Need.HEAD})
    grid = {"dim": [8, 16, 32, 48]}

    def __init__(self, dim: int | None = None):
        self.dim = dim

    def _fit(self, train: Outputs) -> None:
        features = train.features
        dim = self._principal_dim(features.shape[1])
        W, b = as_float64(train.head.W), as_float64(train.head.b)
        self.origin_ = -np.linalg.pinv(W) @ b
        # the origin-centred second moment in float64 from row chunks: a large float32 bank (or a memmap) is
        # never copied whole
        self._set_basis(second_moment(features, self.origin_), dim)
        residual_norm_sum, max_logit_sum = self._alpha_sums(features, train.logits)
        self.alpha_ = float(max_logit_sum / residual_norm_sum)

    def _fit_shards(self, shards) -> None:
        """Fit from the merged per-shard second moment about the origin, then a second pass summing residual
        norms and max logits (:func:`oodscope.detectors.sharded.fit_from_shards`)."""
        from ._sufficient import centred_moment

        self.origin_, moment = centred_moment(shards, self.name)
        self._set_basis(moment.scatter / moment.count, self._principal_dim(len(self.origin_)))
        sums = np.array([self._alpha_sums(shard.features, shard.logits) for shard in shards]).sum(axis=0)
        self.alpha_ = float(sums[1] / sums[0])

    def _principal_dim(self, n_features: int) -> int:
        dim = default_principal_dim(n_features) if self.dim is None else self.dim
        if not 0 < dim < n_features:
            raise ValueError(f"vim: principal dimension must be in (0, {n_features}) for {n_features}-d "
                             f"features, got {dim}")
        return dim

    def _set_basis(self, moment: np.ndarray, dim: int) -> None:
        eigenvalues, eigenvectors = np.linalg.eigh(moment)
        order = np.argsort(eigenvalues)[::-1]
        self.residual_basis_ = np.ascontiguousarray(eigenvectors[:, order[dim:]])

    def _alpha_sums(self, features: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
        """``sum_i ||x_i^{P⊥}||`` and ``sum_i max_j l_ij`` (Eq. 8's numerator and denominator), chunked.

        The projections run at the features' own precision (float32 for a float32 bank) and the sums in float64.
        On a 200,000 x 2048 bank this second pass took 9.5 s in float64 and 3.9 s in float32; alpha, a ratio of
        two sums, moved by 2e-9 and 1e-9 relative on 3,000 x 64 and 20,000 x 512 float32 banks of features around
        5 with spread 1 (``tests/test_detectors.py`` checks 1e-5).
        """
        dtype = np.result_type(features.dtype, np.float32)
        origin, basis = self.origin_.astype(dtype), self.residual_basis_.astype(dtype)
        rows = rows_per_chunk(features.shape[1])
        residual_norm_sum = max_logit_sum = 0.0
        for start, stop in chunks(len(features), rows):
            block = np.subtract(features[start:stop], origin, dtype=dtype)
            residual_norm_sum += np.linalg.norm(block @ basis, axis=1).sum(dtype=np.float64)
            max_logit_sum += np.asarray(logits[start:stop]).max(axis=1).sum(dtype=np.float64)
        return residual_norm_sum, max_logit_sum

    def _residual_norm(self, features: np.ndarray) -> np.ndarray:
        return np.linalg.norm((as_float64(features) - self.origin_) @ self.residual_basis_, axis=1)

    def _score(self, x: Outputs) -> np.ndarray:
        virtual_logit = self.alpha_ * self._residual_norm(x.features)
        return virtual_logit - logsumexp(as_float64(x.logits), axis=1)
