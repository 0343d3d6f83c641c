"""Open-set recognition: the open-set classification rate (OSCR).

Dhamija, Günther & Boult, "Reducing Network Agnostophobia", NeurIPS 2018, Sec. 5: a sample is *accepted* as known
when its acceptance score passes a threshold ``t``. The correct classification rate
``CCR(t) = |{known x: correctly classified and accepted}| / |known|`` is plotted against the false positive rate
``FPR(t) = |{unknown x: accepted}| / |unknown|``; OSCR is the area under that curve over all thresholds (exact:
the curve is a staircase of trapezoids between distinct scores; tied samples are accepted together). A perfect
open-set classifier has OSCR = closed-set accuracy; the curve ends at ``(1, accuracy)``.

``ood_scores`` follow the detector convention (higher = more OOD = rejected first), so the acceptance score is
``-ood_score``.
"""

from __future__ import annotations

import numpy as np


def oscr_curve(known_scores: np.ndarray, known_correct: np.ndarray, unknown_scores: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(FPR, CCR)`` from ``(0, 0)`` (nothing accepted) to ``(1, accuracy)`` (everything accepted), one point per
    distinct OOD score, accepting the lowest OOD scores first."""
    known = np.asarray(known_scores, dtype=np.float64).ravel()
    correct = np.asarray(known_correct, dtype=bool).ravel()
    unknown = np.asarray(unknown_scores, dtype=np.float64).ravel()
    if known.size == 0 or unknown.size == 0 or known.shape != correct.shape:
        raise ValueError("OSCR needs known scores with a correctness flag each and at least one unknown score")
    if not (np.isfinite(known).all() and np.isfinite(unknown).all()):
        raise ValueError("OSCR: scores must be finite")
    scores = np.r_[known, unknown]
    is_known = np.r_[np.ones(known.size, bool), np.zeros(unknown.size, bool)]
    hit = np.r_[correct, np.zeros(unknown.size, bool)]
    order = np.argsort(scores, kind="mergesort")
    scores, is_known, hit = scores[order], is_known[order], hit[order]
    ends = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # the last index of each tied group
    ccr = np.cumsum(hit)[ends] / known.size
    fpr = np.cumsum(~is_known)[ends] / unknown.size
    return np.r_[0.0, fpr], np.r_[0.0, ccr]


def oscr(known_scores: np.ndarray, known_correct: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Area under the CCR-vs-FPR curve (in [0, accuracy]; higher is better)."""
    fpr, ccr = oscr_curve(known_scores, known_correct, unknown_scores)
    return float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2))
