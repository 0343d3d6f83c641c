"""The one "keep a share of ID" rule (oodscope.thresholds) and everything that uses it."""

from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from oodscope import metrics
from oodscope.thresholds import (accepted_share, flag, flagged_count, kept_count, threshold_for_contamination,
                                 threshold_for_keep)

SMALL = (1, 3, 7, 20, 21)


# -- hand-computed cases --------------------------------------------------------------------------------------------
def test_twenty_scores_keep_95_percent_is_the_19th():
    scores = np.arange(1.0, 21.0)
    t = threshold_for_keep(scores, 0.95)
    assert t == 19.0
    assert accepted_share(scores, t) == 0.95 and flag(scores, t).sum() == 1  # exactly 19 of 20 kept
    # the rule Detector.calibrate used to apply keeps all 20 (np.quantile "higher": index ceil(19 * 0.95) = 19)
    assert np.quantile(scores, 0.95, method="higher") == 20.0
    assert threshold_for_keep(scores, 1.0) == 20.0 and accepted_share(scores, 20.0) == 1.0
    assert threshold_for_keep(scores, 0.951) == 20.0  # 19 / 20 < 0.951: the next score
    assert threshold_for_keep(scores, 0.05) == 1.0 and threshold_for_keep(scores, 0.0001) == 1.0
    assert threshold_for_keep(scores[::-1].copy(), 0.95) == 19.0  # order does not matter
    assert threshold_for_keep(np.arange(1, 21, dtype=np.float32), 0.95) == 19.0


def test_ties_at_the_threshold_are_all_accepted():
    scores = np.array([3.0, 2.0, 1.0, 2.0, 2.0])
    assert threshold_for_keep(scores, 0.5) == 2.0
    assert accepted_share(scores, 2.0) == 0.8  # more than keep: the tied 2s cannot be split
    assert threshold_for_keep(scores, 0.2) == 1.0 and threshold_for_keep(scores, 0.21) == 2.0
    assert threshold_for_keep(scores, 0.8) == 2.0 and threshold_for_keep(scores, 0.81) == 3.0
    constant = np.full(7, 4.0)
    assert threshold_for_keep(constant, 0.01) == 4.0 and not flag(constant, 4.0).any()


def test_a_single_score_is_the_threshold_for_every_keep():
    for keep in (1e-9, 0.05, 0.5, 0.95, 1.0):
        assert threshold_for_keep(np.array([0.3]), keep) == 0.3
    assert not flag(np.array([0.3]), 0.3).any() and flag(np.array([0.30001]), 0.3).all()


def test_kept_count_is_the_exact_smallest_count_reaching_keep():
    """Against exact rational arithmetic, including the cases np.quantile(method="inverted_cdf") gets one too
    high because n * keep is one ulp above a whole number (0.28 * 25 = 7.000000000000001)."""
    for n in range(1, 130):
        for percent in range(1, 101):
            keep = percent / 100
            exact = next(k for k in range(1, n + 1) if Fraction(k, n) >= Fraction(percent, 100))
            assert kept_count(n, keep) == exact, (n, keep)
    scores = np.arange(1.0, 26.0)
    assert threshold_for_keep(scores, 0.28) == 7.0 and accepted_share(scores, 7.0) == 0.28
    assert np.quantile(scores, 0.28, method="inverted_cdf") == 8.0  # numpy's rounding slip that we avoid


def test_contamination_threshold_flags_the_top_share():
    scores = np.arange(1.0, 101.0)
    assert threshold_for_contamination(scores, 0.1) == 90.0 and flag(scores, 90.0).sum() == 10
    # PyOD's linear percentile lies between two scores; anomatools truncates the percent to a whole number
    assert threshold_for_contamination(scores, 0.1, rule="linear") == pytest.approx(90.1)
    assert threshold_for_contamination(scores, 0.0272, rule="linear_whole_percent") == pytest.approx(
        np.percentile(scores, 97))
    # n = 10, contamination 0.15: we flag floor(1.5) = 1, PyOD's interpolated threshold flags 2
    ten = np.arange(10.0)
    assert flag(ten, threshold_for_contamination(ten, 0.15)).sum() == 1
    assert flag(ten, threshold_for_contamination(ten, 0.15, rule="linear")).sum() == 2
    assert threshold_for_contamination(ten, 0.15) == threshold_for_keep(ten, 0.85)
    for n in (1, 3, 7, 20, 21, 367):
        for gamma in (0.01, 0.07, 0.1, 0.15, 0.28, 0.5):
            x = np.random.default_rng(n).permutation(n).astype(float)
            flagged = flag(x, threshold_for_contamination(x, gamma)).sum()
            assert flagged == flagged_count(n, gamma) == int(Fraction(n) * Fraction(str(gamma))), (n, gamma)
    assert flagged_count(367, 0.0) == 0


def test_flag_keeps_the_shape_and_accepts_the_threshold_itself():
    scores = np.array([[0.0, 1.0], [2.0, np.inf]])
    np.testing.assert_array_equal(flag(scores, 1.0), [[False, False], [True, True]])
    assert flag(np.array([-np.inf]), 0.0).tolist() == [False] and flag(np.array([]), 0.0).shape == (0,)


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.01, np.nan, "most", True, None])
def test_bad_keep_is_refused(keep):
    with pytest.raises(ValueError, match=r"keep must be a number in \(0, 1\]"):
        threshold_for_keep(np.arange(5.0), keep)


@pytest.mark.parametrize("contamination", [0.0, 0.51, 1.0, -0.2, "a lot", np.nan])
def test_bad_contamination_is_refused(contamination):
    with pytest.raises(ValueError, match=r"contamination must be in \(0, 0.5\]"):
        threshold_for_contamination(np.arange(5.0), contamination)


def test_bad_scores_and_rules_are_refused():
    with pytest.raises(ValueError, match="empty"):
        threshold_for_keep(np.array([]), 0.95)
    with pytest.raises(ValueError, match="1-d"):
        threshold_for_keep(np.zeros((3, 2)), 0.95)
    with pytest.raises(ValueError, match="NaN or inf"):
        threshold_for_keep(np.array([0.0, np.nan]), 0.95)
    with pytest.raises(ValueError, match="NaN or inf"):
        threshold_for_contamination(np.array([0.0, np.inf]), 0.1)
    with pytest.raises(ValueError, match="rule must be"):
        threshold_for_contamination(np.arange(5.0), 0.1, rule="higher")
    with pytest.raises(ValueError, match="NaN"):
        flag(np.array([0.0, np.nan]), 0.5)
    with pytest.raises(ValueError, match="threshold is NaN"):
        flag(np.array([0.0]), np.nan)
    with pytest.raises(ValueError, match="contamination must be a number"):
        flagged_count(10, 0.7)


# -- fpr_at_tpr is the same rule, and it is scikit-learn's ------------------------------------------------------------
def _sklearn_fpr_at_tpr(id_scores, ood_scores, tpr, drop_intermediate):
    """ID positive on negated scores; the first operating point with TPR >= tpr (on all operating points)."""
    scores = np.concatenate([id_scores, ood_scores])
    is_id = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    fpr, tprs, thresholds = roc_curve(is_id, -scores, drop_intermediate=drop_intermediate)
    first = int(np.argmax(tprs >= tpr))
    return fpr[first], -thresholds[first]


def _score_sets(rng, n_id, n_ood, ties):
    if ties:  # integers on a small range: ties inside and across the two sets
        return rng.integers(0, 6, n_id).astype(float), rng.integers(2, 8, n_ood).astype(float)
    return rng.normal(0, 1, n_id), rng.normal(1, 1, n_ood)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n_id", SMALL + (500,))
def test_fpr_at_tpr_equals_sklearn_roc_curve(n_id, ties):
    rng = np.random.default_rng(n_id + 1000 * ties)
    for trial in range(20):
        id_scores, ood_scores = _score_sets(rng, n_id, int(rng.choice(SMALL + (300,))), ties)
        for tpr in (0.95, 0.9, 0.5, 1 / 3, 0.28, 1.0, float(rng.uniform(0.01, 1.0))):
            ours = metrics.fpr_at_tpr(id_scores, ood_scores, tpr)
            theirs, threshold = _sklearn_fpr_at_tpr(id_scores, ood_scores, tpr, drop_intermediate=False)
            assert ours == theirs, (trial, tpr)
            assert threshold == threshold_for_keep(id_scores, tpr)  # sklearn's operating point is our threshold
            # (roc_curve's default drop_intermediate=True drops every point inside a straight segment of the curve,
            # diagonal ones from ties across the sets included, and can then skip this operating point)
            # OpenOOD's OOD-positive convention is the same rule with the sets swapped and the scores negated
            theirs, _ = _sklearn_fpr_at_tpr(-ood_scores, -id_scores, tpr, False)
            assert metrics.fpr_at_tpr(id_scores, ood_scores, tpr, positive="ood") == theirs


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n_id", SMALL)
@pytest.mark.parametrize("n_ood", SMALL)
def test_flagging_at_the_keep_threshold_is_fpr_at_tpr(n_id, n_ood, ties):
    """``1 - flag(ood, threshold_for_keep(id, tpr)).mean() == fpr_at_tpr(id, ood, tpr)``; the counts agree
    exactly, the float ``1 - mean`` may differ from ``count / n`` in the last bit (``1 - 0.7 != 0.3``)."""
    rng = np.random.default_rng(100 * n_id + n_ood + 7 * ties)
    for _ in range(10):
        id_scores, ood_scores = _score_sets(rng, n_id, n_ood, ties)
        for tpr in (0.95, 0.5, 0.8, 1.0):
            flagged = flag(ood_scores, threshold_for_keep(id_scores, tpr))
            fpr = metrics.fpr_at_tpr(id_scores, ood_scores, tpr)
            assert 1 - flagged.mean() == pytest.approx(fpr, abs=1e-15)
            assert np.count_nonzero(~flagged) / n_ood == fpr
            # and the ID side keeps at least tpr (exactly ceil(tpr n) / n without ties)
            kept = accepted_share(id_scores, threshold_for_keep(id_scores, tpr))
            assert kept >= tpr - 1e-12
            if not ties:
                assert kept == kept_count(n_id, tpr) / n_id


def test_every_operating_point_counts_not_only_roc_curves_default_ones():
    """Ties across the sets make diagonal segments; roc_curve's default drop_intermediate=True drops the points
    inside them, and the first *kept* point with TPR >= 0.5 is then a later one (TPR 0.7, FPR 0.75)."""
    id_scores, ood_scores = np.array([0.0, 1, 1, 2, 2, 3, 3, 4, 5, 5]), np.array([1.0, 2, 3, 9])
    # t = threshold_for_keep(id, 0.5) = 2 (5 of 10 ID at or below 2); OOD at or below 2: 1 and 2 -> 2 / 4
    assert threshold_for_keep(id_scores, 0.5) == 2.0 and metrics.fpr_at_tpr(id_scores, ood_scores, 0.5) == 0.5
    assert _sklearn_fpr_at_tpr(id_scores, ood_scores, 0.5, drop_intermediate=False)[0] == 0.5
    assert _sklearn_fpr_at_tpr(id_scores, ood_scores, 0.5, drop_intermediate=True)[0] == 0.75


def test_fpr95_on_twenty_id_scores_keeps_nineteen():
    id_scores, ood_scores = np.arange(1.0, 21.0), np.array([18.5, 19.0, 19.5, 25.0])
    # t = 19: OOD 18.5 and 19.0 are accepted (19.0 ties the threshold and is accepted with it)
    assert metrics.fpr95(id_scores, ood_scores) == 0.5
    assert metrics.detection_error(id_scores, ood_scores, at_tpr=0.95) == pytest.approx(0.5 * 0.05 + 0.5 * 0.5)


# -- the callers use the module ----------------------------------------------------------------------------------------
def test_full_spectrum_flagged_share_is_the_one_rule(rng):
    from oodscope.fullspectrum import flagged_share

    for n in SMALL + (200,):
        clean, shifted = rng.normal(0, 1, n), rng.normal(0.5, 1, 13)
        expected = 100.0 * flag(shifted, threshold_for_keep(clean, 0.95)).sum() / 13
        assert flagged_share(clean, shifted) == expected
        assert flagged_share(clean, shifted) == pytest.approx(100 * (1 - metrics.fpr_at_tpr(clean, shifted)))
    assert flagged_share(np.arange(1.0, 21.0), np.arange(1.0, 21.0)) == 5.0


def test_exceed_and_gammagmm_threshold_with_the_one_rule():
    from oodscope.anomaly.contamination import ContaminationPosterior, threshold_at
    from oodscope.anomaly.rejection import ExCeeD

    ten = np.arange(10.0)
    detector = ExCeeD(contamination=0.15).fit(ten)
    assert detector.threshold_ == threshold_for_contamination(ten, 0.15) == 8.0
    np.testing.assert_array_equal(detector.predict(ten), flag(ten, 8.0))  # floor(10 * 0.15) = 1 training anomaly
    pyod = ExCeeD(contamination=0.15, threshold_rule="linear").fit(ten)
    assert pyod.threshold_ == pytest.approx(np.percentile(ten, 85)) and pyod.predict(ten).sum() == 2
    assert threshold_at(ten, 0.15) == 8.0
    posterior = ContaminationPosterior()
    posterior.samples_ = np.full(10, 0.15)  # a posterior mean of 15 %
    np.testing.assert_array_equal(posterior.predict(ten), ten > 8.0)


def test_eap_squash_keeps_the_reference_whole_percent_rule():
    from oodscope.anomaly.eap import squash

    train = np.arange(0.0, 100.0)
    # gamma = 2.72 %: anomatools takes the 97th percentile (int(97.28)), linear: 96.03
    t = np.percentile(train, 97)
    assert threshold_for_contamination(train, 0.0272, rule="linear_whole_percent") == t
    assert squash(np.array([t]), train, 0.0272) == pytest.approx([0.5])


def test_calibrate_then_predict_flags_exactly_what_fpr_at_tpr_reports():
    """Detector.calibrate/predict and the leaderboard's FPR@95 share one rule, on tiny and odd counts too."""
    import oodscope
    from oodscope.metrics import fpr_at_tpr

    # 20 ID scores 1..20 (the distance of x to its nearest training row, 0): keep 0.95 -> threshold 19, 19 of 20 kept
    det = oodscope.create("knn_distance", k=1).fit(np.array([[0.0], [-1.0]]))
    det.calibrate(np.arange(1.0, 21.0)[:, None], keep=0.95)
    assert det.threshold_ == 19.0 and det.predict(np.arange(1.0, 21.0)[:, None]).sum() == 1
    rng = np.random.default_rng(5)
    for n in (1, 3, 7, 20, 21, 101):
        train = rng.normal(size=(50, 2))
        val, ood = rng.normal(size=(n, 2)), rng.normal(size=(37, 2)) + 1.0
        det = oodscope.create("mahalanobis_ad").fit(train).calibrate(val, keep=0.95)
        accepted_ood = 1.0 - det.predict(ood).mean()
        assert accepted_ood == pytest.approx(fpr_at_tpr(det.score(val), det.score(ood), 0.95), abs=1e-15)
        assert (~det.predict(val)).mean() >= 0.95
