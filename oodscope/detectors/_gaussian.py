"""Gaussian statistics shared by the distance and density detectors (vectorised, float64, chunked).

This module sits below every detector (it imports only :mod:`._common`): :mod:`.mahalanobis`, :mod:`.rmds`,
:mod:`.mahalanobis_ensemble`, :mod:`.wdiscood` and :mod:`._classstats` build on it.

Class-conditional statistics use one matrix product over all classes per row chunk (a sparse ``one_hot.T @ X``),
never a Python loop over samples; covariances are accumulated in float64 from one chunk at a time (a symmetric
rank-k update, ``dsyrk``), and scoring works on chunks of rows. A chunk holds about :data:`ELEMENTS` float64
values (256 MiB), so a 1M x 2048 float32 bank (or a ``np.memmap`` of it) never gets a float64 copy.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ._common import as_float64, class_means

ELEMENTS = 1 << 25    # float64 elements per chunk (256 MiB)
MIN_ROWS = 256        # never fewer rows per chunk than this (tests lower both to exercise the chunking)


def rows_per_chunk(dim: int, elements: int | None = None) -> int:
    """Rows per chunk so that one float64 block of ``dim`` columns stays near ``elements`` entries."""
    elements = ELEMENTS if elements is None else elements
    return max(MIN_ROWS, elements // max(int(dim), 1))


def chunks(n: int, rows: int):
    """``(start, stop)`` of consecutive row blocks of at most ``rows`` rows (a loop over chunks, not samples)."""
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def whitening(covariance: np.ndarray, rcond: float = 1e-10) -> np.ndarray:
    """Matrix ``A`` with ``A @ A.T = pinv(covariance)`` (eigen-decomposition, tiny eigenvalues dropped)."""
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    keep = eigenvalues > rcond * max(eigenvalues.max(), 0.0)
    return eigenvectors[:, keep] / np.sqrt(eigenvalues[keep])


def squared_distances(x: np.ndarray, whitener: np.ndarray, whitened_means: np.ndarray) -> np.ndarray:
    """``||(x - mu_c) A||^2`` for every row of ``x`` and every mean, ``(N, C)`` (one block, float64)."""
    z = as_float64(x) @ whitener
    mean_norms = (whitened_means**2).sum(axis=1)
    return np.maximum((z**2).sum(axis=1, keepdims=True) - 2.0 * z @ whitened_means.T + mean_norms, 0.0)


def min_squared_distance(x: np.ndarray, whitener: np.ndarray, whitened_means: np.ndarray,
                         chunk: int | None = None) -> np.ndarray:
    """``min_c ||(x - mu_c) A||^2`` for every row of ``x``, in chunks so memory stays bounded."""
    chunk = chunk or rows_per_chunk(max(x.shape[1], whitener.shape[1], len(whitened_means)))
    out = np.empty(len(x))
    for start, stop in chunks(len(x), chunk):
        out[start:stop] = squared_distances(x[start:stop], whitener, whitened_means).min(axis=1)
    return out


def chunked_class_means(features: np.ndarray, labels: np.ndarray, n_classes: int, who: str,
                        chunk: int | None = None) -> np.ndarray:
    """Per-class means as one sparse one-hot product per row chunk (memory ``O(chunk x D + C x D)``).

    Labels are validated by :func:`~._common.class_means` on one row per class present, so the errors
    (missing classes named, fewer than two classes, out-of-range labels) are the same as everywhere else.
    """
    from scipy import sparse

    labels = np.asarray(labels)
    present = np.unique(labels)
    class_means(np.zeros((len(present), 1)), present, n_classes, who)
    chunk = chunk or rows_per_chunk(features.shape[1])
    sums = np.zeros((n_classes, features.shape[1]))
    for start, stop in chunks(len(features), chunk):
        block = labels[start:stop]
        one_hot = sparse.csr_matrix((np.ones(len(block)), (block, np.arange(len(block)))),
                                    shape=(n_classes, len(block)))
        sums += one_hot @ as_float64(features[start:stop])
    return sums / np.bincount(labels, minlength=n_classes)[:, None]


class Scatter:
    """``sum_i (x_i - c_i)(x_i - c_i)^T`` in float64, accumulated from blocks of at most ``rows`` rows.

    Each block is centred into one reused float64 buffer (``np.subtract`` casts a float32 block in the same
    pass) and added with BLAS ``dsyrk`` (half the flops of a GEMM) into the upper triangle of a Fortran-ordered
    accumulator; the strictly lower triangle is never written and stays zero, so :meth:`matrix` is
    ``U + U^T`` with the diagonal counted once. The buffers are allocated once per accumulator, not per block
    or per class (:meth:`reset`): fresh large arrays cost their first-touch page faults every time.
    """

    def __init__(self, dim: int, rows: int):
        self.upper = np.zeros((dim, dim), order="F")
        self._centred = np.empty((rows, dim))

    def add(self, block: np.ndarray, centre: np.ndarray) -> None:
        """Add the rows of ``block - centre`` (``centre``: one row, or one row per block row)."""
        from scipy.linalg.blas import dsyrk

        centred = np.subtract(block, centre, out=self._centred[:len(block)])
        # centred.T is Fortran-ordered (D, n): dsyrk(trans=0) gives centred.T @ centred without a copy
        self.upper = dsyrk(1.0, centred.T, beta=1.0, c=self.upper, trans=0, lower=0, overwrite_c=True)

    def matrix(self, scale: float = 1.0, out: np.ndarray | None = None) -> np.ndarray:
        """``scale`` times the symmetric sum, written into ``out`` when given."""
        out = np.add(self.upper, self.upper.T, out=out)
        out *= scale
        out[np.diag_indices_from(out)] *= 0.5
        return out

    def reset(self) -> None:
        self.upper[...] = 0.0

    @classmethod
    def of(cls, features: np.ndarray, centres: Callable[[int, int], np.ndarray],
           chunk: int | None = None) -> "Scatter":
        """The scatter of all rows about ``centres(start, stop)`` (the centre of rows ``start:stop``: one row, or
        one per row), one chunk at a time."""
        chunk = chunk or rows_per_chunk(features.shape[1])
        scatter = cls(features.shape[1], min(chunk, len(features)))
        for start, stop in chunks(len(features), chunk):
            scatter.add(features[start:stop], centres(start, stop))
        return scatter


def tied_covariance(features: np.ndarray, labels: np.ndarray, means: np.ndarray,
                    chunk: int | None = None) -> np.ndarray:
    """``1/N sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T`` (float64), accumulated over row chunks."""
    scatter = Scatter.of(features, lambda start, stop: means[labels[start:stop]], chunk)
    return scatter.matrix(1.0 / len(features))


def second_moment(features: np.ndarray, centre: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """``1/N sum_i (x_i - c)(x_i - c)^T`` about a fixed centre ``c`` (float64, one chunked ``dsyrk`` pass)."""
    return Scatter.of(features, lambda start, stop: centre, chunk).matrix(1.0 / len(features))


def full_covariance(features: np.ndarray, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and ``1/N``-normalised covariance of all rows (float64, two chunked passes)."""
    dim = features.shape[1]
    chunk = chunk or rows_per_chunk(dim)
    mean = np.zeros(dim)
    for start, stop in chunks(len(features), chunk):
        mean += np.asarray(features[start:stop]).sum(axis=0, dtype=np.float64)
    mean /= len(features)
    return mean, second_moment(features, mean, chunk)


def per_class_covariances(features: np.ndarray, labels: np.ndarray, means: np.ndarray,
                          chunk: int | None = None) -> np.ndarray:
    """``(C, D, D)`` class covariances ``1/N_c sum_{y_i = c} (x_i - mu_c)(x_i - mu_c)^T`` (float64).

    One class at a time: its rows (found once with a stable argsort of the labels) are gathered in blocks of
    ``chunk`` rows and accumulated with one BLAS ``dsyrk`` per block into that class's upper triangle. The loops
    run over classes and blocks, never over samples, and each product is as large as the class allows (a
    per-chunk split by class would give ``C`` small products and ``C`` full-matrix additions per chunk).
    """
    n_classes, dim = means.shape
    labels = np.asarray(labels)
    chunk = chunk or rows_per_chunk(dim)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_classes + 1))
    covariances = np.zeros((n_classes, dim, dim))
    scatter = Scatter(dim, min(chunk, int(np.diff(bounds).max())))
    for c in np.flatnonzero(np.diff(bounds)):
        rows = order[bounds[c]:bounds[c + 1]]
        scatter.reset()
        for start, stop in chunks(len(rows), chunk):
            scatter.add(features[rows[start:stop]], means[c])
        scatter.matrix(1.0 / len(rows), out=covariances[c])
    return covariances


def shrink(covariance: np.ndarray, shrinkage: float) -> np.ndarray:
    """Ledoit-Wolf-style convex shrinkage towards the scaled identity: ``(1 - s) S + s tr(S)/D I``."""
    if shrinkage == 0.0:
        return covariance
    dim = covariance.shape[-1]
    target = np.trace(covariance, axis1=-2, axis2=-1)[..., None, None] / dim * np.eye(dim)
    return (1.0 - shrinkage) * covariance + shrinkage * target


class TiedGaussian:
    """Class means + one shared covariance on one representation; ``distance(x)`` = min over classes of the
    squared Mahalanobis distance (Lee et al. 2018, Eq. 2), chunked.

    Also keeps the class counts, so the covariance of all samples regardless of class follows without another
    pass over the data: ``Sigma_0 = Sigma + sum_c (N_c / N) (mu_c - mu_0)(mu_c - mu_0)^T`` (total scatter =
    within-class + between-class scatter), see :meth:`background`.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, n_classes: int, who: str,
                 shrinkage: float = 0.0, chunk: int | None = None):
        labels = np.asarray(labels)
        means = chunked_class_means(features, labels, n_classes, who, chunk=chunk)
        self._set(means, np.bincount(labels, minlength=n_classes).astype(np.float64),
                  tied_covariance(features, labels, means, chunk=chunk), shrinkage)

    @classmethod
    def from_statistics(cls, means: np.ndarray, counts: np.ndarray, within: np.ndarray,
                        shrinkage: float = 0.0) -> "TiedGaussian":
        """The same model from class means, counts and the tied covariance (e.g. merged per-shard statistics,
        :mod:`._sufficient`), without a pass over the features."""
        gaussian = cls.__new__(cls)
        gaussian._set(means, counts, within, shrinkage)
        return gaussian

    def _set(self, means: np.ndarray, counts: np.ndarray, within: np.ndarray, shrinkage: float) -> None:
        self.means, self.counts, self.within = means, counts, within
        self.covariance = shrink(self.within, shrinkage)
        self.whitener = whitening(self.covariance)
        self.whitened_means = self.means @ self.whitener

    def background(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and ``1/N`` covariance of all training samples (class-agnostic), from the class statistics."""
        weights = self.counts / self.counts.sum()
        mean = weights @ self.means
        offsets = self.means - mean
        return mean, self.within + (offsets * weights[:, None]).T @ offsets

    def distances(self, x: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """Squared distances to every class mean, ``(N, C)`` (float64)."""
        chunk = chunk or rows_per_chunk(max(x.shape[1], self.whitener.shape[1], len(self.means)))
        out = np.empty((len(x), len(self.means)))
        for start, stop in chunks(len(x), chunk):
            out[start:stop] = squared_distances(x[start:stop], self.whitener, self.whitened_means)
        return out

    def min_distance(self, x: np.ndarray) -> np.ndarray:
        return min_squared_distance(x, self.whitener, self.whitened_means)
