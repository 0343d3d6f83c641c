"""Metrics: OOD detection (:mod:`.ood`) and selective classification (:mod:`.selective`)."""

from .ood import aupr_in, aupr_out, auroc, autc, detection_error, fpr95, fpr_at_tpr, ood_metrics
from .scod import scod_auc_rc, scod_risk_coverage_curve
from .selective import aurc, eaurc, oracle_aurc, risk_coverage_curve

__all__ = ["auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "fpr95", "detection_error", "autc", "ood_metrics",
           "aurc", "eaurc", "oracle_aurc", "risk_coverage_curve", "scod_auc_rc", "scod_risk_coverage_curve"]
