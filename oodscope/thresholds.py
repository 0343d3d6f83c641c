"""One rule for turning scores into decisions: "keep a share of the in-distribution / normal samples".

Convention everywhere in oodscope: a higher score means more OOD / more anomalous; a sample is *flagged* when its
score is strictly above the threshold and *accepted* when it is at or below it (:func:`flag`).

:func:`threshold_for_keep` is the smallest ID score ``t`` whose empirical CDF reaches ``keep``::

    t = min { s in id_scores : #{id_scores <= s} / n >= keep }    (= sorted(id_scores)[k - 1], k = ceil(keep n))

This is the ``inverted_cdf`` quantile (Hyndman & Fan's definition 1) and the threshold of the first operating
point with TPR >= ``keep`` on scikit-learn's ``roc_curve`` with ID as the positive class (on ``-score``, every
operating point, ``drop_intermediate=False``), so :func:`oodscope.metrics.fpr_at_tpr` is ``1 - flag(ood,
threshold_for_keep(id, tpr)).mean()``. Examples: 20 scores 1..20 and ``keep = 0.95`` give ``t = 19`` and accept
exactly 19 of 20; on 20 samples ``np.quantile(..., method="higher")`` would give ``t = 20`` and keep everything.
``n = 1`` gives the one score for every ``keep``.

*Ties*: every score equal to ``t`` is accepted, so the accepted ID share ``#{<= t} / n`` is at least ``keep`` and can
exceed it when ``t`` is tied (``[1, 2, 2, 2, 3]`` at ``keep = 0.5`` gives ``t = 2`` and accepts 80 %). No threshold
can split tied samples, and this rule never accepts *less* than ``keep``.

*Floating point*: ``k`` is computed as the smallest integer with ``k >= n keep - n 1e-12`` instead of through
``np.quantile(..., method="inverted_cdf")``, whose ``n * keep`` is sometimes one ulp above an integer (``0.28 * 25 =
7.000000000000001``) and then takes the next score (8 of 25 instead of 7). The tolerance is the one the metrics
always used (``TPR >= tpr - 1e-12``) and is far below ``1 / n`` for any sample size that fits in memory.

:func:`threshold_for_contamination` is the same rule seen from the anomaly side: ``threshold_for_keep(train_scores,
1 - contamination)``. Without ties it flags exactly ``floor(n contamination)`` of the ``n`` training scores, the
count that ExCeeD's and RejEx's binomial model (``n - floor(n gamma)``) assumes. PyOD sets ``threshold_ =
np.percentile(decision_scores_, 100 (1 - contamination))`` with *linear interpolation* (Hyndman & Fan 7) and flags
``score > threshold_`` as well. Its threshold is usually a value between two training scores, and on the training
data it flags about ``ceil((n - 1) contamination)`` scores: never fewer than ours, often one more (``n = 10``,
contamination 0.15: PyOD flags 2, ours 1 = floor(1.5); 1..100 at 0.1: both flag 10, PyOD's threshold is 90.1, ours
90). We use the order statistic so that the flagged share is never above the requested contamination (and equal to
it when ``n contamination`` is whole), so that the anomaly rule is the same as the OOD "keep" rule, and so that the
threshold is a score the detector actually produced. The reference rules are still here for code that must reproduce an
author's implementation: ``rule="linear"`` (PyOD's ``threshold_``) and ``rule="linear_whole_percent"`` (anomatools'
``SquashScaler`` / ``LinearScaler``: ``np.percentile(s, int((1 - contamination) * 100))``, the percent truncated to a
whole number), used by :mod:`oodscope.anomaly.eap` to match the EAP reference code.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

#: absolute tolerance on the accepted share when looking for the smallest count reaching ``keep``
SHARE_TOLERANCE = 1e-12

ContaminationRule = Literal["inverted_cdf", "linear", "linear_whole_percent"]


def _scores(values, name: str) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array of scores, got shape {scores.shape}")
    if scores.size == 0:
        raise ValueError(f"{name} is empty; a threshold needs at least one score")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} of {scores.size} scores are NaN or inf")
    return scores


def _fraction(value, name: str, low: float, high: float, low_open: bool = True) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not ((low < number if low_open else low <= number) and number <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return number


def kept_count(n: int, keep: float) -> int:
    """The smallest ``k`` in ``1..n`` with ``k / n >= keep`` (up to :data:`SHARE_TOLERANCE`)."""
    keep = _fraction(keep, "keep", 0.0, 1.0)
    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n!r}")
    n = int(n)
    return int(min(n, max(1, np.ceil(n * keep - n * SHARE_TOLERANCE))))


def flagged_count(n: int, contamination: float) -> int:
    """How many of ``n`` tie-free scores :func:`threshold_for_contamination` flags: ``n - kept_count(n, 1 -
    contamination)``, i.e. ``floor(n contamination)`` (0 for a contamination of 0, e.g. an estimate of none)."""
    contamination = _fraction(contamination, "contamination", 0.0, 0.5, low_open=False)
    if contamination == 0.0:
        return 0
    return int(n) - kept_count(n, 1.0 - contamination)


def threshold_for_keep(id_scores: np.ndarray, keep: float) -> float:
    """Smallest ID score ``t`` with ``#{id_scores <= t} / n >= keep``; accepting ``score <= t`` keeps at least
    ``keep`` of the ID samples (more only when ``t`` is tied). ``keep`` in (0, 1]; see the module docstring."""
    keep = _fraction(keep, "keep", 0.0, 1.0)
    scores = _scores(id_scores, "id_scores")
    k = kept_count(scores.size, keep)
    return float(np.partition(scores, k - 1)[k - 1])


def threshold_for_contamination(train_scores: np.ndarray, contamination: float,
                                rule: ContaminationRule = "inverted_cdf") -> float:
    """Threshold flagging (``score > t``) the top ``contamination`` share of ``train_scores``.

    ``rule="inverted_cdf"`` (default, the one rule): ``threshold_for_keep(train_scores, 1 - contamination)``, which
    flags ``floor(n contamination)`` training scores when there are no ties. ``"linear"``: PyOD's
    ``np.percentile(scores, 100 (1 - contamination))``; ``"linear_whole_percent"``: anomatools' ``np.percentile(scores,
    int((1 - contamination) * 100))``. ``contamination`` must lie in (0, 0.5] (the share of anomalies).
    """
    try:
        number = float(contamination)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(contamination, bool) or not 0.0 < number <= 0.5:
        raise ValueError(f"contamination must be in (0, 0.5] (the expected share of anomalies), "
                         f"got {contamination!r}")
    scores = _scores(train_scores, "train_scores")
    if rule == "inverted_cdf":
        return threshold_for_keep(scores, 1.0 - number)
    if rule == "linear":
        return float(np.percentile(scores, 100.0 * (1.0 - number)))
    if rule == "linear_whole_percent":
        return float(np.percentile(scores, int((1.0 - number) * 100)))
    raise ValueError(f"rule must be 'inverted_cdf', 'linear' or 'linear_whole_percent', got {rule!r}")


def flag(scores: np.ndarray, threshold: float) -> np.ndarray:
    """``True`` where a score is flagged (strictly above ``threshold``); scores at the threshold are accepted.

    ``scores`` may have any shape (the result has the same); NaN scores are refused (they would silently be
    accepted), ``+inf`` is flagged and ``-inf`` accepted.
    """
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got {threshold!r}") from None
    if np.isnan(t):
        raise ValueError("threshold is NaN")
    values = np.asarray(scores, dtype=np.float64)
    nan = np.isnan(values)
    if nan.any():
        raise ValueError(f"scores: {int(nan.sum())} of {values.size} are NaN; cannot decide whether to flag them")
    return values > t


def accepted_share(scores: np.ndarray, threshold: float) -> float:
    """Share of ``scores`` accepted (at or below ``threshold``), ``#{accepted} / n``: the same number as ``1 -
    flag(scores, threshold).mean()`` up to rounding in the last bit (``1 - 0.7`` is not ``0.3`` in floating point)."""
    values = _scores(np.ravel(scores), "scores")
    return float(np.count_nonzero(~flag(values, threshold)) / values.size)
