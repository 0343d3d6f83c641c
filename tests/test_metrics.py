import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oodscope import metrics


def _labelled(id_scores, ood_scores):
    scores = np.concatenate([id_scores, ood_scores])
    is_ood = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    return scores, is_ood


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_aupr_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    # integer scores on a small range: many ties within and across the two sets
    id_scores = rng.integers(0, 12, 400).astype(float)
    ood_scores = rng.integers(3, 15, 250).astype(float)
    scores, is_ood = _labelled(id_scores, ood_scores)
    assert abs(metrics.auroc(id_scores, ood_scores) - roc_auc_score(is_ood, scores)) < 1e-12
    assert abs(metrics.aupr_out(id_scores, ood_scores) - average_precision_score(is_ood, scores)) < 1e-12
    assert abs(metrics.aupr_in(id_scores, ood_scores) - average_precision_score(1 - is_ood, -scores)) < 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_fpr_at_tpr_matches_roc_curve(seed):
    rng = np.random.default_rng(seed)
    id_scores = np.round(rng.normal(0, 1, 500), 1)
    ood_scores = np.round(rng.normal(1.5, 1, 300), 1)
    scores, is_ood = _labelled(id_scores, ood_scores)
    # every operating point: the default drop_intermediate=True removes points inside straight (also diagonal,
    # tie-made) segments of the curve and can skip the first one reaching the TPR (tests/test_thresholds.py)
    fpr, tpr, _ = roc_curve(1 - is_ood, -scores, drop_intermediate=False)  # ID positive
    assert metrics.fpr95(id_scores, ood_scores) == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)
    fpr, tpr, _ = roc_curve(is_ood, scores, drop_intermediate=False)  # OOD positive (OpenOOD)
    assert metrics.fpr95(id_scores, ood_scores, positive="ood") == pytest.approx(fpr[np.argmax(tpr >= 0.95)])


def test_fpr95_hand_computed_both_conventions():
    # 20 ID samples scored 0..19, 10 OOD samples scored 15..24 (higher = more OOD).
    id_scores = np.arange(20.0)
    ood_scores = np.arange(15.0, 25.0)
    # ID positive: keep 95% of ID = 19 of 20 -> accept scores <= 18; OOD accepted: 15, 16, 17, 18 -> 4/10.
    assert metrics.fpr95(id_scores, ood_scores, positive="id") == pytest.approx(0.4)
    # OOD positive: catch 95% of OOD = 10 of 10 (9.5 rounds up) -> reject scores >= 15; ID rejected: 15..19 -> 5/20.
    assert metrics.fpr95(id_scores, ood_scores, positive="ood") == pytest.approx(0.25)
    # perfect separation gives 0 in both conventions
    assert metrics.fpr95(np.zeros(5), np.ones(5)) == 0.0
    assert metrics.fpr95(np.zeros(5), np.ones(5), positive="ood") == 0.0


def test_detection_error_and_autc_hand_computed():
    id_scores = np.array([0.0, 1.0, 2.0, 3.0])
    ood_scores = np.array([2.5, 4.0])
    # best threshold between 3 and 4: TPR(ID) = 1, FPR = 1/2 -> 0.25; between 2 and 2.5: TPR 3/4, FPR 0 -> 0.125.
    assert metrics.detection_error(id_scores, ood_scores) == pytest.approx(0.125)
    # AUTC on min-max normalised scores (/4): mean ID = 6/16, mean OOD = 6.5/8 -> (0.375 + 1 - 0.8125) / 2
    assert metrics.autc(id_scores, ood_scores) == pytest.approx((0.375 + 1 - 0.8125) / 2)
    assert metrics.autc(np.zeros(3), np.ones(3)) == 0.0
    # AUTC equals the numerically integrated FPR/FNR threshold curves
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 300), rng.normal(1, 1, 200)
    low, high = min(a.min(), b.min()), max(a.max(), b.max())
    t = np.linspace(0, 1, 200001)
    an, bn = np.sort((a - low) / (high - low)), np.sort((b - low) / (high - low))
    fpr = 1 - np.searchsorted(an, t, side="left") / len(an)
    fnr = np.searchsorted(bn, t, side="left") / len(bn)
    assert metrics.autc(a, b) == pytest.approx((np.trapezoid(fpr, t) + np.trapezoid(fnr, t)) / 2, abs=1e-4)


def test_aurc_hand_computed_and_ties():
    # confident-first order: correct, wrong, correct, wrong -> risks 0, 1/2, 1/3, 2/4
    scores = np.array([0.1, 0.2, 0.3, 0.4])
    errors = np.array([0, 1, 0, 1])
    assert metrics.aurc(scores, errors) == pytest.approx(np.mean([0, 1 / 2, 1 / 3, 2 / 4]))
    # oracle: correct first -> risks 0, 0, 1/3, 2/4
    assert metrics.oracle_aurc(errors) == pytest.approx(np.mean([0, 0, 1 / 3, 2 / 4]))
    assert metrics.eaurc(scores, errors) == pytest.approx(0.5 / 4)
    # a tie between the first two samples is accepted together: risk 1/2 over coverage 0.5
    tied = np.array([0.1, 0.1, 0.3, 0.4])
    assert metrics.aurc(tied, errors) == pytest.approx(0.5 * 0.5 + 0.25 * (1 / 3) + 0.25 * 0.5)


@pytest.mark.parametrize("fn", [metrics.auroc, metrics.fpr95, metrics.aupr_in, metrics.aupr_out, metrics.autc])
def test_metrics_reject_bad_input(fn):
    with pytest.raises(ValueError, match="empty"):
        fn(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        fn(np.array([0.0, np.nan]), np.array([1.0]))
