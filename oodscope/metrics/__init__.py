"""Metrics: OOD detection (:mod:`.ood`), selective classification (:mod:`.selective`) and open-set recognition
(:mod:`.open_set`)."""

from .ood import aupr_in, aupr_out, auroc, autc, detection_error, fpr95, fpr_at_tpr, ood_metrics
from .open_set import oscr, oscr_curve
from .scod import scod_auc_rc, scod_risk_coverage_curve
from .selective import aurc, eaurc, oracle_aurc, risk_coverage_curve

__all__ = ["auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "fpr95", "detection_error", "autc", "ood_metrics",
           "aurc", "eaurc", "oracle_aurc", "risk_coverage_curve", "scod_auc_rc", "scod_risk_coverage_curve",
           "oscr", "oscr_curve"]
