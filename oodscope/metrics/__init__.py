"""Metrics: OOD detection (:mod:`.ood`), selective classification (:mod:`.selective`), open-set recognition
(:mod:`.open_set`), failure detection (:mod:`.failure`), rank correlations (:mod:`.correlation`) and per-example
density metrics (:mod:`.density`): the evaluation protocols' metrics live here, the protocols import them."""

from .correlation import rank_correlations, spearman
from .density import mean_pairwise_js, strongest_private_level, symmetric_kl, true_label_confidence
from .failure import failure_metrics
from .ood import aupr_in, aupr_out, auroc, autc, detection_error, fpr95, fpr_at_tpr, ood_metrics
from .open_set import oscr, oscr_curve
from .scod import scod_auc_rc, scod_risk_coverage_curve
from .selective import aurc, eaurc, oracle_aurc, risk_coverage_curve

__all__ = ["auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "fpr95", "detection_error", "autc", "ood_metrics",
           "aurc", "eaurc", "oracle_aurc", "risk_coverage_curve", "scod_auc_rc", "scod_risk_coverage_curve",
           "oscr", "oscr_curve", "failure_metrics", "rank_correlations", "spearman", "true_label_confidence",
           "mean_pairwise_js", "symmetric_kl", "strongest_private_level"]
