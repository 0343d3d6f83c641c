"""OOD detection metrics with explicit conventions.

Every function takes ``id_scores`` and ``ood_scores`` from a detector (higher = more OOD) and is vectorised
(one sort, no Python loop over samples). Ties are handled the way scikit-learn handles them: a threshold is
placed only between distinct score values, so tied samples move together.

Conventions:

* ``auroc``: probability that a random OOD sample scores higher than a random ID sample (ties count 1/2). It is
  the same whichever class is called positive.
* ``aupr_in``: average precision with ID as the positive class (ranked by ``-score``); ``aupr_out``: OOD as the
  positive class (ranked by ``score``). Average precision as in scikit-learn, ``sum_n (R_n - R_{n-1}) P_n``.
* ``fpr_at_tpr(..., positive="id")`` (default): the share of OOD samples *accepted* as ID at the most
  rejecting threshold that still keeps ``tpr`` of the ID samples, i.e. ``mean(ood_scores <= t)`` with
  ``t = oodscope.thresholds.threshold_for_keep(id_scores, tpr)`` (the smallest ID score with at least ``tpr`` of the
  ID scores at or below it; ties at ``t`` are all accepted). This is scikit-learn's ``roc_curve`` with ID positive
  on ``-score``, read at the first operating point with TPR >= ``tpr``, and the rule ``Detector.calibrate`` /
  ``predict`` apply: ``fpr_at_tpr(id, ood, tpr) == 1 - flag(ood, threshold_for_keep(id, tpr)).mean()``.
  ``positive="ood"`` is OpenOOD's convention: the share of ID samples *rejected* when ``tpr`` of the OOD samples
  are caught, the same rule with the roles of the two sets swapped and the scores negated.
* ``detection_error``: ``min_t 0.5 (1 - TPR(t)) + 0.5 FPR(t)`` (equal priors), as in Lee et al. 2018 and
  Liang et al. 2018 (ODIN, which reports it at 95% TPR; pass ``at_tpr=0.95`` for that).
* ``autc``: area under the threshold curve of Humblot-Renaux, Escalera & Moeslund, "Beyond AUROC & co. for
  evaluating out-of-distribution detection performance" (CVPR-W 2023): scores are min-max normalised to
  [0, 1] over ID and OOD together, ``AUTC = (integral FPR(t) dt + integral FNR(t) dt) / 2`` with FPR the share
  of ID samples at or above ``t`` and FNR the share of OOD samples below ``t``. The step-function integrals are
  exact: ``AUTC = (mean(s_id) + 1 - mean(s_ood)) / 2`` on normalised scores. Lower is better (0 = separated
  at the extremes, 0.5 = no separation).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..thresholds import accepted_share, threshold_for_keep


def _check(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    id_scores = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_scores = np.asarray(ood_scores, dtype=np.float64).ravel()
    for name, values in (("id_scores", id_scores), ("ood_scores", ood_scores)):
        if values.size == 0:
            raise ValueError(f"{name} is empty; metrics need at least one ID and one OOD sample")
        if not np.isfinite(values).all():
            raise ValueError(f"{name}: {int((~np.isfinite(values)).sum())} values are NaN or inf")
    return id_scores, ood_scores


def _curve(pos_scores: np.ndarray, neg_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True/false positive counts at each distinct threshold, thresholds decreasing (like sklearn)."""
    scores = np.concatenate([pos_scores, neg_scores])
    is_pos = np.concatenate([np.ones(pos_scores.size, bool), np.zeros(neg_scores.size, bool)])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    ends = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(is_pos)[ends]
    fps = (ends + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64)


def _mid_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank (``scipy.stats.rankdata``'s default) in one sort."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], values.size] - 1
    ranks = np.empty(values.size)
    ranks[order] = (first + last)[group] / 2.0 + 1.0
    return ranks


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties)."""
    id_scores, ood_scores = _check(id_scores, ood_scores)
    ranks = _mid_ranks(np.concatenate([id_scores, ood_scores]))
    n_id, n_ood = id_scores.size, ood_scores.size
    u_statistic = ranks[n_id:].sum() - n_ood * (n_ood + 1) / 2.0
    return float(u_statistic / (n_id * n_ood))


def _average_precision(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    tps, fps = _curve(pos_scores, neg_scores)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Average precision with ID as the positive class (ID ranked first by lower score)."""
    id_scores, ood_scores = _check(id_scores, ood_scores)
    return _average_precision(-id_scores, -ood_scores)


def aupr_out(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Average precision with OOD as the positive class."""
    id_scores, ood_scores = _check(id_scores, ood_scores)
    return _average_precision(ood_scores, id_scores)


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95,
               positive: Literal["id", "ood"] = "id") -> float:
    """False positive rate at the first threshold reaching true positive rate ``tpr`` (see module doc).

    ``positive="id"``: share of OOD scores ``<= threshold_for_keep(id_scores, tpr)`` (OOD accepted as ID).
    ``positive="ood"``: share of ID scores ``>=`` the largest OOD score that still catches ``tpr`` of the OOD set.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    id_scores, ood_scores = _check(id_scores, ood_scores)
    if positive == "id":
        return accepted_share(ood_scores, threshold_for_keep(id_scores, tpr))
    if positive == "ood":  # OOD is "kept" when -score <= t: the same rule on negated scores, sets swapped
        return accepted_share(-id_scores, threshold_for_keep(-ood_scores, tpr))
    raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}")


def fpr95(id_scores: np.ndarray, ood_scores: np.ndarray, positive: Literal["id", "ood"] = "id") -> float:
    """FPR at 95% TPR (ID-positive by default: share of OOD accepted when 95% of ID is kept)."""
    return fpr_at_tpr(id_scores, ood_scores, 0.95, positive)


def detection_error(id_scores: np.ndarray, ood_scores: np.ndarray, at_tpr: float | None = None) -> float:
    """``0.5 (1 - TPR) + 0.5 FPR`` (ID positive), minimised over thresholds or taken at ``at_tpr``."""
    id_scores, ood_scores = _check(id_scores, ood_scores)
    tps, fps = _curve(-id_scores, -ood_scores)
    tpr_curve = np.r_[0.0, tps / tps[-1]]
    fpr_curve = np.r_[0.0, fps / fps[-1]]
    errors = 0.5 * (1.0 - tpr_curve) + 0.5 * fpr_curve
    if at_tpr is None:
        return float(errors.min())
    if not 0.0 < at_tpr <= 1.0:
        raise ValueError(f"at_tpr must be in (0, 1], got {at_tpr}")
    threshold = threshold_for_keep(id_scores, at_tpr)  # the operating point of fpr_at_tpr
    return float(0.5 * (1.0 - accepted_share(id_scores, threshold)) + 0.5 * accepted_share(ood_scores, threshold))


def autc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the threshold curve (lower is better); see the module docstring."""
    id_scores, ood_scores = _check(id_scores, ood_scores)
    low = min(id_scores.min(), ood_scores.min())
    span = max(id_scores.max(), ood_scores.max()) - low
    if span == 0:
        return 0.5
    mean_id = (id_scores.mean() - low) / span
    mean_ood = (ood_scores.mean() - low) / span
    return float((mean_id + 1.0 - mean_ood) / 2.0)


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """The standard table row, as fractions: auroc, fpr95 (ID positive), aupr_in, aupr_out."""
    return {
        "auroc": auroc(id_scores, ood_scores),
        "fpr95": fpr95(id_scores, ood_scores),
        "aupr_in": aupr_in(id_scores, ood_scores),
        "aupr_out": aupr_out(id_scores, ood_scores),
    }
