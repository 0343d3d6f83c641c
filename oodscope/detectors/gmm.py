"""Gaussian mixture model on penultimate features.

Frittoli, Carrera, Rossi, Fragneto & Boracchi, "Deep Open-Set Recognition for Silicon Wafer Production
Monitoring", Pattern Recognition 2023 (arXiv:2208.14071), Sec. 4.3: a Gaussian Mixture Model is fitted on the
latent representation (penultimate features) of the trained classifier over the known classes, and a sample
whose log-likelihood under the mixture is low is flagged as a novelty. The OOD score is the negative
log-likelihood ``-log sum_k pi_k N(z | mu_k, Sigma_k)``.

The mixture has one full-covariance component per known class by default (``n_components=None``), started
from the class-conditional estimates (class frequencies, means, covariances; float64, ``reg_covar`` added to
each diagonal so fewer samples than dimensions stay invertible) and refined by EM
(:class:`sklearn.mixture.GaussianMixture`, ``max_iter`` steps; ``max_iter=0`` keeps the class-conditional
fit, which is what pytorch-ood's ``GMM`` computes). With ``n_components`` set, sklearn's k-means
initialisation is used and labels are not needed.

The class-conditional estimates are accumulated over row chunks in float64 (:mod:`._gaussian`) and scoring is
chunked, so with ``max_iter=0`` a large float32 bank (or a memmap) is never copied whole; EM (``max_iter > 0``)
and ``n_components`` hand sklearn a float64 copy of the bank.
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
        from sklearn.mixture import GaussianMixture

        features = train.features
        dim = features.shape[1]
        if self.n_components is None:
            labels = train.get(Need.LABELS, who=f"{self.name} with n_components=None (one component per class)")
            n_classes = n_classes_of(labels, train.logits)
            means = chunked_class_means(features, labels, n_classes, self.name)
            covariances = per_class_covariances(features, labels, means) + self.reg_covar * np.eye(dim)
            weights = np.bincount(labels, minlength=n_classes) / len(labels)
            precisions = np.linalg.inv(covariances)
            mixture = GaussianMixture(n_classes, covariance_type="full", reg_covar=self.reg_covar,
                                      max_iter=max(self.max_iter, 1), weights_init=weights, means_init=means,
                                      precisions_init=precisions, random_state=self.seed)
            if self.max_iter == 0:
                _set_state(mixture, weights, means, covariances)
            else:
                mixture.fit(as_float64(features))
        else:
            if self.n_components > len(features):
                raise ValueError(f"gmm: n_components={self.n_components} is larger than the training set "
                                 f"({len(features)} samples)")
            mixture = GaussianMixture(self.n_components, covariance_type="full", reg_covar=self.reg_covar,
                                      max_iter=max(self.max_iter, 1), random_state=self.seed).fit(as_float64(features))
        self.mixture_ = mixture

    def _score(self, x: Outputs) -> np.ndarray:
        rows = rows_per_chunk(x.features.shape[1])
        return np.concatenate([-self.mixture_.score_samples(as_float64(x.features[start:stop]))
                               for start, stop in chunks(len(x), rows)])


def _set_state(mixture, weights: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> None:
    """Give an unfitted sklearn mixture fixed parameters (no EM step)."""
    mixture.weights_, mixture.means_, mixture.covariances_ = weights, means, covariances
    cholesky = np.linalg.cholesky(covariances)
    inverse = np.linalg.inv(cholesky)
    mixture.precisions_cholesky_ = np.transpose(inverse, (0, 2, 1))
    mixture.precisions_ = np.linalg.inv(covariances)
    mixture.converged_, mixture.n_iter_, mixture.lower_bound_ = True, 0, -np.inf
