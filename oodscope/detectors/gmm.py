"""Gaussian mixture model on penultimate features.

Frittoli, Carrera, Rossi, Fragneto & Boracchi, "Deep Open-Set Recognition for Silicon Wafer Production
Monitoring", Pattern Recognition 2023 (arXiv:2208.14071), Sec. 4.3: a Gaussian Mixture Model is fitted on the
latent representation (penultimate features) of the trained classifier over the known classes, and a sample
whose log-likelihood under the mixture is low is flagged as a novelty. The OOD score is the negative
log-likelihood ``-log sum_k pi_k N(z | mu_k, Sigma_k)``.

The mixture has one full-covariance component per known class by default (``n_components=None``), started
from the class-conditional estimates (class frequencies, means, covariances; float64, ``reg_covar`` added to
each diagonal so fewer samples than dimensions stay invertible) and refined by EM, the algorithm of
:class:`sklearn.mixture.GaussianMixture` (``covariance_type="full"``, ``tol=1e-3`` on the mean log-likelihood,
at most ``max_iter`` steps; ``max_iter=0`` keeps the class-conditional fit, which is what pytorch-ood's ``GMM``
computes). That EM is implemented here with batched products over all components at once: sklearn's ``fit``
would also run a k-means initialisation that the given starting point overrides, and loops over components.
With ``n_components`` set, sklearn's k-means initialisation and EM are used and labels are not needed.

The class-conditional estimates are accumulated over row chunks in float64 (:mod:`._gaussian`) and scoring is
chunked, so with ``max_iter=0`` a large float32 bank (or a memmap) is never copied whole; EM (``max_iter > 0``)
and ``n_components`` work on a float64 copy of the bank.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import as_float64, n_classes_of
from ._gaussian import chunked_class_means, chunks, per_class_covariances, rows_per_chunk
from .base import Detector


class GMM(Detector):
    """``score(x) = -log p(z)`` under a Gaussian mixture fitted on the ID training features."""

    name = "gmm"
    needs = frozenset({Need.FEATURES})
    grid = {"reg_covar": [1e-6, 1e-4, 1e-2]}

    def __init__(self, n_components: int | None = None, reg_covar: float = 1e-6, max_iter: int = 100,
                 seed: int = 0):
        self.n_components = n_components
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.seed = seed

    def _check_params(self) -> None:
        if self.n_components is not None and not (isinstance(self.n_components, (int, np.integer))
                                                  and self.n_components >= 1):
            raise ValueError(f"gmm: n_components must be a positive integer or None, got {self.n_components!r}")
        if not self.reg_covar >= 0:
            raise ValueError(f"gmm: reg_covar must be >= 0, got {self.reg_covar!r}")
        if not (isinstance(self.max_iter, (int, np.integer)) and self.max_iter >= 0):
            raise ValueError(f"gmm: max_iter must be a non-negative integer, got {self.max_iter!r}")

    def _fit(self, train: Outputs) -> None:
        features = train.features
        dim = features.shape[1]
        if self.n_components is None:
            labels = train.get(Need.LABELS, who=f"{self.name} with n_components=None (one component per class)")
            n_classes = n_classes_of(labels, train.logits)
            means = chunked_class_means(features, labels, n_classes, self.name)
            covariances = per_class_covariances(features, labels, means)
            covariances[:, np.arange(dim), np.arange(dim)] += self.reg_covar  # the diagonals only, in place
            weights = np.bincount(labels, minlength=n_classes) / len(labels)
            if self.max_iter == 0:
                self.weights_, self.means_, self.covariances_, self.n_iter_ = weights, means, covariances, 0
            else:
                self.weights_, self.means_, self.covariances_, self.n_iter_ = em(
                    as_float64(features), weights, means, covariances, self.reg_covar, self.max_iter)
        else:
            from sklearn.mixture import GaussianMixture

            if self.n_components > len(features):
                raise ValueError(f"gmm: n_components={self.n_components} is larger than the training set "
                                 f"({len(features)} samples)")
            mixture = GaussianMixture(self.n_components, covariance_type="full", reg_covar=self.reg_covar,
                                      max_iter=max(self.max_iter, 1), random_state=self.seed)
            mixture.fit(as_float64(features))
            self.weights_, self.means_, self.covariances_ = mixture.weights_, mixture.means_, mixture.covariances_
            self.n_iter_ = mixture.n_iter_
        self.precisions_cholesky_ = precision_cholesky(self.covariances_, self.name)

    def _fit_shards(self, shards) -> None:
        """The class-conditional start from merged per-shard class scatters, then EM with one pass of merged
        E-step sums per step (:func:`oodscope.detectors.sharded.fit_from_shards`)."""
        from ._sufficient import class_scatters, n_classes_of_shards

        if self.n_components is not None:
            raise ValueError("gmm: fitting from shards needs n_components=None (one component per class); "
                             "sklearn's k-means initialisation of n_components needs the whole bank in memory")
        stats = class_scatters(shards, f"{self.name} with n_components=None (one component per class)",
                               n_classes_of_shards(shards))
        covariances = stats.scatters / stats.counts[:, None, None] + self.reg_covar * np.eye(stats.means.shape[1])
        weights = stats.counts / stats.counts.sum()
        if self.max_iter == 0:
            self.weights_, self.means_, self.covariances_, self.n_iter_ = weights, stats.means, covariances, 0
        else:
            self.weights_, self.means_, self.covariances_, self.n_iter_ = em_from_shards(
                shards, weights, stats.means, covariances, self.reg_covar, self.max_iter)
        self.precisions_cholesky_ = precision_cholesky(self.covariances_, self.name)

    def _score(self, x: Outputs) -> np.ndarray:
        rows = rows_per_chunk(x.features.shape[1] * len(self.weights_))  # (K, rows, D) block per chunk
        return np.concatenate([-log_density(as_float64(x.features[start:stop]), self.weights_, self.means_,
                                            self.precisions_cholesky_)
                               for start, stop in chunks(len(x), rows)])


def precision_cholesky(covariances: np.ndarray, who: str = "gmm") -> np.ndarray:
    """``R_k`` with ``R_k R_k^T = Sigma_k^-1`` (upper triangular ``L_k^-T``, as sklearn keeps it).

    One component at a time (a loop over components, not samples) with LAPACK's ``dpotrf`` and the triangular
    inverse ``dtrtri`` on Fortran-ordered matrices: a symmetric matrix is its own transpose, so ``Sigma_k.T`` is
    the Fortran-ordered view of the same matrix, copied into one workspace that both routines overwrite (a fresh
    ``D x D`` array per component would pay its page faults every time). Memory: the result plus that one
    ``D x D`` matrix (a batched Cholesky and solve would hold three more ``(K, D, D)`` arrays), and about 7x faster
    than numpy's batched ``cholesky`` + ``solve`` for ``D = 2048``.
    """
    from scipy.linalg.lapack import dpotrf, dtrtri

    covariances = np.asarray(covariances, dtype=np.float64)
    out = np.empty_like(covariances)
    work = np.empty(covariances.shape[1:], order="F")  # one workspace, factorised and inverted in place
    for k, covariance in enumerate(covariances):
        work[...] = covariance.T
        lower, info = dpotrf(work, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            raise ValueError(f"{who}: a component covariance is not positive definite; increase reg_covar")
        inverse, info = dtrtri(lower, lower=1, overwrite_c=1)
        if info != 0:
            raise ValueError(f"{who}: a component covariance is singular; increase reg_covar")
        out[k] = inverse.T
    return out


def weighted_log_probs(x: np.ndarray, weights: np.ndarray, means: np.ndarray, prec_chol: np.ndarray) -> np.ndarray:
    """``(N, K)`` of ``log pi_k + log N(x | mu_k, Sigma_k)``, all components in one batched product."""
    dim = x.shape[1]
    log_det = np.log(np.diagonal(prec_chol, axis1=1, axis2=2)).sum(axis=1)  # 1/2 log det Sigma_k^-1
    y = x @ prec_chol  # (K, N, D): every component in one batched product
    y -= np.einsum("kd,kde->ke", means, prec_chol)[:, None, :]
    squared = np.square(y, out=y).sum(axis=2).T
    return -0.5 * (dim * np.log(2 * np.pi) + squared) + log_det + np.log(weights)


def log_density(x: np.ndarray, weights: np.ndarray, means: np.ndarray, prec_chol: np.ndarray) -> np.ndarray:
    """``log sum_k pi_k N(x | mu_k, Sigma_k)`` per row."""
    weighted = weighted_log_probs(x, weights, means, prec_chol)
    peak = weighted.max(axis=1)
    return peak + np.log(np.exp(weighted - peak[:, None]).sum(axis=1))


def em(x: np.ndarray, weights: np.ndarray, means: np.ndarray, covariances: np.ndarray, reg_covar: float,
       max_iter: int, tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """EM for a full-covariance mixture from the given parameters (sklearn's ``GaussianMixture`` steps).

    Each step: E (log responsibilities and the mean log-likelihood under the current parameters), M (weights
    ``n_k / N`` with ``n_k = sum_i r_ik + 10 eps``, weighted means, weighted covariances ``+ reg_covar I``);
    stops when the mean log-likelihood changes by less than ``tol`` or after ``max_iter`` steps.
    """
    lower_bound, n_iter = -np.inf, 0
    eye = np.eye(x.shape[1])
    for n_iter in range(1, max_iter + 1):
        previous = lower_bound
        weighted = weighted_log_probs(x, weights, means, precision_cholesky(covariances))
        peak = weighted.max(axis=1)
        log_norm = peak + np.log(np.exp(weighted - peak[:, None]).sum(axis=1))
        resp = np.exp(weighted - log_norm[:, None])
        counts = resp.sum(axis=0) + 10 * np.finfo(resp.dtype).eps
        means = resp.T @ x / counts[:, None]
        centered = x[None, :, :] - means[:, None, :]  # (K, N, D)
        covariances = np.matmul(np.swapaxes(centered * resp.T[:, :, None], 1, 2), centered) / counts[:, None, None]
        covariances += reg_covar * eye
        weights = counts / counts.sum()
        lower_bound = float(log_norm.mean())
        if abs(lower_bound - previous) < tol:
            break
    return weights, means, covariances, n_iter


def em_from_shards(shards, weights: np.ndarray, means: np.ndarray, covariances: np.ndarray, reg_covar: float,
                   max_iter: int, tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """:func:`em` over a sharded training set: each step merges per-shard E-step sums
    (:class:`._sufficient.WeightedMoments`), then takes the same M-step, so the result equals :func:`em` on the
    concatenated shards to rounding. Memory: one shard plus ``(K, D, D)`` statistics."""
    from ._sufficient import WeightedMoments, merge

    lower_bound, n_iter = -np.inf, 0
    eye = np.eye(means.shape[1])
    for n_iter in range(1, max_iter + 1):
        previous = lower_bound
        prec_chol = precision_cholesky(covariances)
        stats = merge(WeightedMoments.of(shard.features, weights, means, prec_chol) for shard in shards)
        counts = stats.counts + 10 * np.finfo(np.float64).eps
        means = stats.counts[:, None] * stats.means / counts[:, None]  # resp^T x / counts, as em() has it
        offsets = stats.means - means  # the scatters are about the weighted means: move them to `means`
        covariances = stats.scatters + stats.counts[:, None, None] * offsets[:, :, None] * offsets[:, None, :]
        covariances /= counts[:, None, None]
        covariances += reg_covar * eye
        weights = counts / counts.sum()
        lower_bound = stats.log_likelihood / stats.n
        if abs(lower_bound - previous) < tol:
            break
    return weights, means, covariances, n_iter
