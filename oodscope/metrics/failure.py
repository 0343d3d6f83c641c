"""Failure detection: one rejection score judged against "should reject" = misclassified ID or semantic OOD.

Guérin et al., "Out-Of-Distribution Detection Is Not All You Need" (AAAI 2023): a deployed classifier should reject
a sample when its prediction is wrong, whatever the shift. The ``failure`` protocol
(:mod:`oodscope.protocols.failure`) and :meth:`oodscope.evaluation.Results.failure` report these numbers.
"""

from __future__ import annotations

import numpy as np

from .ood import auroc
from .scod import scod_auc_rc
from .selective import aurc, eaurc


def failure_metrics(id_scores: np.ndarray, id_errors: np.ndarray, ood_scores: np.ndarray,
                    c_fn: float = 0.75) -> dict[str, float]:
    """Failure-detection metrics of one detector, all in percent.

    Args:
        id_scores: rejection score (higher = reject first) of every ID sample, clean and covariate-shifted.
        id_errors: 1 where the classifier is wrong on that ID sample, else 0.
        ood_scores: scores of the semantic OOD samples (all to be rejected).
        c_fn: the SCOD cost of accepting an OOD sample (:func:`oodscope.metrics.scod.scod_auc_rc`).

    Returns:
        ``auroc`` (for the target "should reject"), ``aurc`` and ``eaurc`` (risk = share of the accepted samples
        that should have been rejected; lower is better), ``scod_auc_rc`` and ``reject_share`` (the share of the
        pool that should be rejected).

    Raises:
        ValueError: when every sample, or none, should be rejected.
    """
    id_scores = np.asarray(id_scores, dtype=np.float64).ravel()
    errors = np.asarray(id_errors, dtype=np.float64).ravel()
    ood_scores = np.asarray(ood_scores, dtype=np.float64).ravel()
    scores = np.r_[id_scores, ood_scores]
    reject = np.r_[errors, np.ones(ood_scores.size)]
    if reject.all() or not reject.any():
        raise ValueError("failure detection needs samples to accept and samples to reject")
    return {"auroc": 100.0 * auroc(scores[reject == 0], scores[reject == 1]),
            "aurc": 100.0 * aurc(scores, reject), "eaurc": 100.0 * eaurc(scores, reject),
            "scod_auc_rc": 100.0 * scod_auc_rc(id_scores, errors, ood_scores, c_fn),
            "reject_share": 100.0 * float(reject.mean())}
