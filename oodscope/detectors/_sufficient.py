"""Per-shard sufficient statistics that merge exactly, and fitting detectors from shards of the training set.

A detector whose fit is a reduction over the training samples (class means and covariances, a second moment,
EM's E-step sums) does not need the whole feature matrix in one process: each shard (one file, one Ray worker,
one chunk of a memmap) is reduced to a few float64 arrays, the arrays are merged, and the fit finishes from the
merged arrays. :func:`fit_from_shards` does this for

* ``mahalanobis`` and ``rmds``: per-class counts, means and the pooled within-class scatter (:class:`ClassMoments`);
* ``vim`` and ``residual``: the second moment about the head's origin ``o = -pinv(W) b`` (:class:`CentredMoment`),
  and for ViM a second pass summing residual norms and max logits (Eq. 8's ``alpha``);
* ``gmm`` (one component per class, ``n_components=None``): per-class counts, means and scatters for the
  class-conditional start (:class:`ClassScatters`), then every EM step as one pass of E-step sums
  (:class:`WeightedMoments`: responsibilities, weighted sums and weighted scatters, plus the log-likelihood).

Merging uses the pairwise update of Chan, Golub & LeVeque, "Algorithms for Computing the Sample Variance",
1979/1983 (Eq. 2.1b), per class: ``M = M_a + M_b + (n_a n_b / n) (mu_b - mu_a)(mu_b - mu_a)^T``, with means
``mu = (n_a mu_a + n_b mu_b) / n``. Each shard's scatter is taken about its own means (not ``sum x x^T``), so
nothing cancels and the merged statistics equal the in-memory ones to rounding (about 1e-15 relative, tested to
1e-12 with the scores). Merging is associative: shards may be reduced in any grouping (a tree on a cluster).

Shards are :class:`~oodscope.extraction.outputs.Outputs` (or feature arrays); ``shards`` must be re-iterable (a
list, or any sequence of lazily loaded shards) because ViM and EM pass over it more than once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..extraction.outputs import Need, Outputs, as_outputs
from ._common import as_float64
from ._gaussian import Scatter, chunks, rows_per_chunk

#: detectors :func:`fit_from_shards` can fit (their classes define ``_fit_shards``)
SHARDED = ("mahalanobis", "rmds", "vim", "residual", "gmm")


# -- statistics ------------------------------------------------------------------------------------------------
def _scatter(features: np.ndarray, centres: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """``sum_i (x_i - c_i)(x_i - c_i)^T`` with one centre row per sample (float64, chunked ``dsyrk``)."""
    return Scatter.of(features, lambda start, stop: centres[start:stop], chunk).matrix()


def _class_sums(features: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class counts and feature sums (one sparse one-hot product per row chunk)."""
    from scipy import sparse

    sums = np.zeros((n_classes, features.shape[1]))
    for start, stop in chunks(len(features), rows_per_chunk(features.shape[1])):
        block = labels[start:stop]
        one_hot = sparse.csr_matrix((np.ones(len(block)), (block, np.arange(len(block)))),
                                    shape=(n_classes, len(block)))
        sums += one_hot @ as_float64(features[start:stop])
    return np.bincount(labels, minlength=n_classes).astype(np.float64), sums


def _means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``sums / counts`` row by row, 0 where a count is 0 (a class absent from a shard)."""
    return np.divide(sums, counts[:, None], out=np.zeros_like(sums), where=counts[:, None] > 0)


def _pad(values: np.ndarray, n: int) -> np.ndarray:
    """``values`` with zero rows appended up to ``n`` rows (a shard that never saw the last classes)."""
    return values if len(values) >= n else np.concatenate([values, np.zeros((n - len(values),) + values.shape[1:])])


def _merge_means(n_a: np.ndarray, mu_a: np.ndarray, n_b: np.ndarray, mu_b: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts, means, the offsets ``mu_b - mu_a`` and the Chan weights ``n_a n_b / n`` of a pairwise merge."""
    n = n_a + n_b
    weight = np.divide(n_a * n_b, n, out=np.zeros_like(n), where=n > 0)
    means = _means(n_a[:, None] * mu_a + n_b[:, None] * mu_b, n)
    return n, means, mu_b - mu_a, weight


@dataclass
class ClassMoments:
    """Per-class counts ``n_c``, means ``mu_c`` and the pooled within-class scatter
    ``W = sum_c sum_{y_i = c} (x_i - mu_c)(x_i - mu_c)^T`` of one shard (float64); :meth:`merge` is exact.

    The tied covariance of Lee et al. (2018) is ``W / N`` (:attr:`within`), the class-agnostic covariance of
    RMDS follows from the class statistics (:meth:`background`).
    """

    counts: np.ndarray
    means: np.ndarray
    scatter: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray, labels: np.ndarray, n_classes: int | None = None) -> "ClassMoments":
        labels = np.asarray(labels)
        n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
        counts, sums = _class_sums(features, labels, n_classes)
        means = _means(sums, counts)
        return cls(counts, means, _scatter(features, means[labels]))

    def merge(self, other: "ClassMoments") -> "ClassMoments":
        size = max(len(self.counts), len(other.counts))
        n_a, mu_a = _pad(self.counts, size), _pad(self.means, size)
        n, means, offsets, weight = _merge_means(n_a, mu_a, _pad(other.counts, size), _pad(other.means, size))
        between = (offsets * weight[:, None]).T @ offsets  # sum_c w_c d_c d_c^T in one product
        return ClassMoments(n, means, self.scatter + other.scatter + between)

    @property
    def within(self) -> np.ndarray:
        """The tied, ``1/N``-normalised within-class covariance."""
        return self.scatter / self.counts.sum()


@dataclass
class ClassScatters:
    """Per-class counts, means and scatters ``M_c = sum_{y_i = c} (x_i - mu_c)(x_i - mu_c)^T`` (``(C, D, D)``)."""

    counts: np.ndarray
    means: np.ndarray
    scatters: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray, labels: np.ndarray, n_classes: int | None = None) -> "ClassScatters":
        from ._gaussian import per_class_covariances

        labels = np.asarray(labels)
        n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
        counts, sums = _class_sums(features, labels, n_classes)
        means = _means(sums, counts)
        return cls(counts, means, per_class_covariances(features, labels, means) * counts[:, None, None])

    def merge(self, other: "ClassScatters") -> "ClassScatters":
        size = max(len(self.counts), len(other.counts))
        n_a, mu_a = _pad(self.counts, size), _pad(self.means, size)
        n, means, offsets, weight = _merge_means(n_a, mu_a, _pad(other.counts, size), _pad(other.means, size))
        scatters = _pad(self.scatters, size) + _pad(other.scatters, size)
        scatters += weight[:, None, None] * offsets[:, :, None] * offsets[:, None, :]
        return ClassScatters(n, means, scatters)


@dataclass
class CentredMoment:
    """Count and scatter ``sum_i (x_i - o)(x_i - o)^T`` about a fixed centre ``o`` (merge: a sum)."""

    count: float
    scatter: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray, centre: np.ndarray) -> "CentredMoment":
        return cls(float(len(features)), _scatter(features, np.broadcast_to(centre, features.shape)))

    def merge(self, other: "CentredMoment") -> "CentredMoment":
        return CentredMoment(self.count + other.count, self.scatter + other.scatter)


@dataclass
class WeightedMoments:
    """One EM E-step over a shard: responsibility sums ``n_k``, weighted means ``mu_k``, weighted scatters
    ``sum_i r_ik (x_i - mu_k)(x_i - mu_k)^T`` and the summed log-likelihood ``sum_i log p(x_i)`` (with the count)."""

    counts: np.ndarray
    means: np.ndarray
    scatters: np.ndarray
    log_likelihood: float
    n: float

    @classmethod
    def of(cls, x: np.ndarray, weights: np.ndarray, means: np.ndarray, prec_chol: np.ndarray) -> "WeightedMoments":
        from .gmm import weighted_log_probs

        x = as_float64(x)
        weighted = weighted_log_probs(x, weights, means, prec_chol)
        peak = weighted.max(axis=1)
        log_norm = peak + np.log(np.exp(weighted - peak[:, None]).sum(axis=1))
        resp = np.exp(weighted - log_norm[:, None])
        counts = resp.sum(axis=0)
        local = _means(resp.T @ x, counts)
        scatters = np.empty((len(counts),) + (x.shape[1],) * 2)
        for k in range(len(counts)):  # a loop over components: one (N, D) block at a time, not (K, N, D)
            centred = x - local[k]
            scatters[k] = (centred * resp[:, k:k + 1]).T @ centred
        return cls(counts, local, scatters, float(log_norm.sum()), float(len(x)))

    def merge(self, other: "WeightedMoments") -> "WeightedMoments":
        n, means, offsets, weight = _merge_means(self.counts, self.means, other.counts, other.means)
        scatters = self.scatters + other.scatters + weight[:, None, None] * offsets[:, :, None] * offsets[:, None, :]
        return WeightedMoments(n, means, scatters, self.log_likelihood + other.log_likelihood, self.n + other.n)


def merge(statistics: Iterable[Any]) -> Any:
    """All ``statistics`` (of one kind) merged into one; ``ValueError`` when there are none."""
    merged = None
    for part in statistics:
        merged = part if merged is None else merged.merge(part)
    if merged is None:
        raise ValueError("no shards to merge: pass at least one non-empty shard")
    return merged


# -- fitting from shards -------------------------------------------------------------------------------------
class Shards:
    """A re-iterable view of the shards of a training set, each checked as a detector's fit input.

    The first pass records each shard's per-sample shapes (they must agree) and magnitudes (the detector's
    ``input_range_``); every pass yields :class:`Outputs`.
    """

    def __init__(self, detector: Any, shards: Sequence[Outputs | np.ndarray]):
        if isinstance(shards, (Outputs, np.ndarray)) or not hasattr(shards, "__iter__") \
                or iter(shards) is shards:
            raise ValueError(f"{detector.name}: shards must be a sequence (list or tuple) of Outputs or arrays, "
                             f"one per shard, that can be read more than once; got {type(shards).__name__}")
        self.detector, self.shards = detector, shards
        self.dims: dict[str, tuple[int, ...]] | None = None
        self.ranges: dict[str, float | None] = {}
        self.count = 0

    def __iter__(self) -> Iterator[Outputs]:
        from .base import _max_abs

        first_pass = self.dims is None
        for number, shard in enumerate(self.shards):
            shard = as_outputs(shard, name=getattr(shard, "name", None) or f"shard {number}")
            if first_pass:
                self._check(shard, number)
                for part, values in self.detector._arrays(shard).items():
                    found = _max_abs(values)
                    self.ranges[part] = found if self.ranges.get(part) is None else max(self.ranges[part], found)
                self.count += len(shard)
            yield shard
        if first_pass and self.dims is None:
            raise ValueError(f"{self.detector.name}: no shards to fit on; pass at least one non-empty shard")

    def _check(self, shard: Outputs, number: int) -> None:
        detector = self.detector
        detector._check_inputs(shard, fitting=False)
        if Need.LABELS in detector.needs:
            shard.get(Need.LABELS, who=detector.name)
            detector._check_labels(shard)
        dims = detector._input_dims(shard)
        if self.dims is not None and dims != self.dims:
            raise ValueError(f"{detector.name}: shard {number} ({shard.name!r}) has per-sample shapes {dims}, "
                             f"but the shards before it have {self.dims}; every shard must come from one model")
        self.dims = dims


def fit_from_shards(detector: Any, shards: Sequence[Outputs | np.ndarray]) -> Any:
    """Fit ``detector`` on the union of ``shards`` from merged per-shard statistics; returns the detector.

    Equal to ``detector.fit(concatenation of the shards)`` up to rounding (the fitted means and covariances to
    about 1e-15 relative), without ever holding more than one shard. Supported: :data:`SHARDED`. Each shard is
    an :class:`Outputs` (or a feature array) with what the detector needs (labels, head, logits); all shards come
    from the same model (same shapes, same head).
    """
    fit_shards = getattr(detector, "_fit_shards", None)
    if fit_shards is None:
        raise ValueError(f"{detector.name}: cannot be fitted from shards (its fit is not a reduction over "
                         f"samples); detectors fitted from shards: {', '.join(SHARDED)}")
    detector._check_params()
    detector._reset_fitted()
    view = Shards(detector, shards)
    fit_shards(view)
    if view.count < 2:
        raise ValueError(f"{detector.name}: fit needs at least 2 training samples, the shards hold {view.count}")
    detector._check_reserved()
    detector.input_dims_ = view.dims
    detector.input_range_ = {part: value for part, value in view.ranges.items() if value is not None}
    return detector


def class_moments(shards: Iterable[Outputs], who: str, n_classes: int | None = None) -> ClassMoments:
    """The merged :class:`ClassMoments` of the shards' features and labels, every class present checked."""
    merged = merge(ClassMoments.of(s.features, _labels(s, who)) for s in shards)
    return _check_classes(merged, who, n_classes)


def class_scatters(shards: Iterable[Outputs], who: str, n_classes: int | None = None) -> ClassScatters:
    merged = merge(ClassScatters.of(s.features, _labels(s, who)) for s in shards)
    return _check_classes(merged, who, n_classes)


def _labels(shard: Outputs, who: str) -> np.ndarray:
    """A shard's labels: present, integer class indices, none negative (OOD)."""
    labels = np.asarray(shard.get(Need.LABELS, who=who))
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{who}: training labels of {shard.name!r} must be integer class indices, got dtype "
                         f"{labels.dtype}")
    if (labels < 0).any():
        raise ValueError(f"{who}: training labels of {shard.name!r} contain negative (OOD) labels; fit on "
                         "in-distribution data only")
    return labels


def _check_classes(merged: Any, who: str, n_classes: int | None) -> Any:
    """Pad to ``n_classes`` and refuse what :func:`._common.check_class_labels` refuses in memory."""
    if n_classes is not None and len(merged.counts) > n_classes:
        raise ValueError(f"{who}: training labels must lie in [0, {n_classes}), got up to {len(merged.counts) - 1}")
    size = n_classes or len(merged.counts)
    for field in ("counts", "means", "scatters"):
        if hasattr(merged, field):
            setattr(merged, field, _pad(getattr(merged, field), size))
    if np.count_nonzero(merged.counts) < 2:
        raise ValueError(f"{who}: class-conditional statistics need at least two classes in the training set, "
                         f"got only class {int(np.flatnonzero(merged.counts)[0])}")
    empty = np.flatnonzero(merged.counts == 0)
    if empty.size:
        raise ValueError(f"{who}: classes {empty.tolist()} have no training samples in any shard; every class of "
                         "the classifier needs examples (or pass labels re-indexed to the classes present)")
    scatter = merged.scatter if hasattr(merged, "scatter") else merged.scatters.sum(axis=0)
    if not np.trace(scatter) > 0:
        raise ValueError(f"{who}: all training samples are identical within their classes; the detector has no "
                         "spread to learn from")
    return merged


def n_classes_of_shards(shards: Shards) -> int | None:
    """The classifier's number of classes from the first shard's logits (``None`` without logits)."""
    first = next(iter(shards.shards), None)
    logits = getattr(first, "logits", None)
    return None if logits is None else int(np.shape(logits)[1])


def centred_moment(shards: Iterable[Outputs], who: str) -> tuple[np.ndarray, CentredMoment]:
    """ViM's origin ``o = -pinv(W) b`` and the merged :class:`CentredMoment` of the features about it, in one
    pass that also checks every shard carries the same head (``ValueError`` naming the first that does not)."""
    head = origin = merged = None
    for number, shard in enumerate(shards):
        W, b = as_float64(shard.head.W), as_float64(shard.head.b)
        if head is None:
            head, origin = (W, b), -np.linalg.pinv(W) @ b
        elif head[0].shape != W.shape or not (np.array_equal(head[0], W) and np.array_equal(head[1], b)):
            raise ValueError(f"{who}: shard {number} ({shard.name!r}) has another classifier head than the first "
                             "shard; every shard must come from the same model")
        moment = CentredMoment.of(shard.features, origin)
        merged = moment if merged is None else merged.merge(moment)
    if merged is None:
        raise ValueError(f"{who}: no shards to fit on; pass at least one non-empty shard")
    return origin, merged
