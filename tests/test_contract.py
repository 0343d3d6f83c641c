"""The detector contract, checked on every registered detector of every family (in the spirit of scikit-learn's
``check_estimator``). New detectors are covered without being listed: ``tests/detector_cases.py`` builds a tiny
case for any registered name from its declared ``family`` and ``needs``."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

import oodscope
from detector_cases import N_OUTLIERS, case, detector_names
from oodscope import NotFittedError
from oodscope.detectors import get
from oodscope.detectors.base import RESERVED
from oodscope.detectors.registry import DETECTOR_FAMILIES, FAMILIES
from oodscope.extraction.outputs import Need, Outputs

ALL = detector_names()
OPTIONAL_PACKAGE = "needs the"  # detectors whose optional package is not installed say "needs the X package"


def test_every_family_is_covered_and_the_count_is_printed():
    families = {name: get(name).family for name in ALL}
    counts = {family: sum(f == family for f in families.values()) for family in DETECTOR_FAMILIES}
    print(f"\ncontract suite: {len(ALL)} registered detectors, by family {counts}")
    assert set(families.values()) <= set(FAMILIES)
    assert counts["ood"] >= 40 and counts["anomaly"] >= 10 and counts["image"] >= 6


def _fit(c):
    try:
        return c.detector.fit(c.train)
    except ValueError as error:
        if OPTIONAL_PACKAGE in str(error) and "package" in str(error):
            pytest.skip(str(error))
        raise


def _subset(data, index):
    if isinstance(data, Outputs):
        return data.subset(index)
    return data[index]


@pytest.fixture(scope="module")
def reference_scores():
    """Scores of one fitted detector per name, computed once for the tests below."""
    return {}


def _scores(name, reference_scores):
    if name not in reference_scores:
        c = case(name)
        _fit(c)
        reference_scores[name] = (c, c.detector.score(c.test))
    return reference_scores[name]


@pytest.mark.parametrize("name", ALL)
def test_init_stores_arguments_unchanged_and_sklearn_clone_works(name):
    cls = get(name)
    c = case(name)
    params = c.detector.get_params(deep=False)
    assert set(params) == set(cls._get_param_names())  # __init__'s named arguments (none: a parameter-free method)
    rebuilt = cls(**params)
    for key, value in params.items():  # what was passed is what is stored (identity, as sklearn's clone checks)
        assert getattr(rebuilt, key) is value, f"{name}.__init__ changed {key!r}"
    copy = clone(c.detector)  # raises if __init__ altered an argument
    assert type(copy) is cls and copy.get_params(deep=False).keys() == params.keys()
    assert cls.family in FAMILIES and oodscope.detectors.get(cls.name) is cls


@pytest.mark.parametrize("name", ALL)
def test_score_before_fit_raises_not_fitted(name):
    c = case(name)
    with pytest.raises(NotFittedError):
        c.detector.score(c.test)
    with pytest.raises(NotFittedError):
        c.detector.predict(c.test)


@pytest.mark.parametrize("name", ALL)
def test_fit_returns_self_sets_no_reserved_state_and_scores_are_one_float_per_sample(name, reference_scores):
    c, scores = _scores(name, reference_scores)
    assert scores.dtype == np.float64 and scores.shape == (len(c.test),) and np.isfinite(scores).all()
    assert np.ptp(scores) > 0, f"{name}: constant scores"
    assert not hasattr(c.detector, "threshold_")  # only calibrate() sets it
    assert "input_dims_" in vars(c.detector) and set(vars(c.detector)) & RESERVED <= {"input_dims_", "input_range_"}
    assert np.array_equal(c.detector.decision_function(c.test), scores)  # PyOD's name for the same scores


@pytest.mark.parametrize("name", ALL)
def test_clone_and_same_seed_give_identical_scores(name, reference_scores):
    c, scores = _scores(name, reference_scores)
    again = clone(c.detector)  # unfitted, same parameters (and seed)
    assert not hasattr(again, "input_dims_")
    assert np.array_equal(again.fit(c.train).score(c.test), scores)


@pytest.mark.parametrize("name", ALL)
def test_scoring_a_subset_gives_the_subset_of_the_scores(name, reference_scores):
    c, scores = _scores(name, reference_scores)
    if Need.MODEL in type(c.detector).needs and get(name).family != "image":
        pytest.skip("re-runs the network on Outputs.source; a subset of Outputs carries no model")
    index = np.r_[len(c.test) - 1, 0, 2, 3]  # reordered, mixed in- and outliers, a different batch size
    try:
        subset_scores = c.detector.score(_subset(c.test, index))
    except ValueError as error:
        if "made in this session" in str(error):  # reads full feature maps through the model: no subset of Outputs
            pytest.skip(str(error))
        raise
    np.testing.assert_allclose(subset_scores, scores[index], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_calibrate_leaves_scores_unchanged_and_predict_flags_the_calibrated_share(name, reference_scores):
    c, scores = _scores(name, reference_scores)
    c.detector.calibrate(c.test, keep=0.75)
    assert np.array_equal(c.detector.score(c.test), scores)
    flagged = c.detector.predict(c.test)
    assert flagged.dtype == bool and flagged.mean() <= 0.25 + 1e-12
    del c.detector.threshold_


@pytest.mark.parametrize("name", ALL)
def test_refit_starts_from_a_clean_slate(name, reference_scores):
    c, scores = _scores(name, reference_scores)
    c.detector.calibrate(c.test)
    c.detector.fit(c.train)
    assert not hasattr(c.detector, "threshold_")
    assert np.array_equal(c.detector.score(c.test), scores)


def test_planted_outliers_rank_above_the_inliers_for_most_detectors(reference_scores):
    """A sanity floor on the tiny cases: most detectors put the planted outliers above the median inlier."""
    ranked = []
    for name in ALL:
        try:
            _, scores = _scores(name, reference_scores)
        except pytest.skip.Exception:
            continue
        ranked.append(bool(np.median(scores[-N_OUTLIERS:]) > np.median(scores[:-N_OUTLIERS])))
    assert np.mean(ranked) > 0.8


# -- the reserved names ----------------------------------------------------------------------------------------
def test_a_detector_that_sets_a_reserved_name_fails():
    from oodscope.detectors.base import Detector

    with pytest.raises(TypeError, match="threshold_"):
        type("Bad", (Detector,), {"threshold_": 1.0})

    class SetsThreshold(Detector):
        needs = frozenset({Need.FEATURES})

        def _fit(self, train):
            self.threshold_ = 0.0

        def _score(self, x):
            return x.features[:, 0]

    with pytest.raises(TypeError, match=r"_fit set \['threshold_'\]"):
        SetsThreshold().fit(np.arange(6.0).reshape(3, 2))


def test_react_scores_are_identical_before_and_after_calibrate():
    c = case("react")
    react = c.detector.fit(c.train)
    before = react.score(c.test)
    with pytest.raises(NotFittedError, match="calibrate"):
        react.predict(c.test)
    react.calibrate(c.test, keep=0.95)
    assert np.array_equal(react.score(c.test), before)
    assert react.clip_ == pytest.approx(np.percentile(c.train.features, 90))


# -- scikit-learn and PyOD -------------------------------------------------------------------------------------
def _tabular(rng):
    inliers = rng.normal(size=(200, 4))
    test = np.concatenate([rng.normal(size=(60, 4)), rng.normal(size=(20, 4)) * 0.5 + 4.0])
    y = np.r_[np.zeros(60), np.ones(20)]
    return inliers, test, y


@pytest.mark.parametrize("name", ["knn", "knn_distance"])
def test_grid_search_over_knn_k_with_a_scorer_on_scores(rng, name):
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GridSearchCV

    train, test, y = _tabular(rng)
    X = np.concatenate([train, test])
    target = np.r_[np.zeros(len(train)), y]
    split = [(np.arange(len(train)), np.arange(len(train), len(X)))]  # fit on ID only, score ID + OOD

    def auroc(estimator, X_val, y_val):
        return roc_auc_score(y_val, estimator.score(X_val))

    search = GridSearchCV(oodscope.create(name), {"k": [1, 5, 50]}, scoring=auroc, cv=split, refit=False)
    search.fit(X, target)
    expected = {k: roc_auc_score(y, oodscope.create(name, k=k).fit(train).score(test)) for k in (1, 5, 50)}
    assert search.cv_results_["mean_test_score"] == pytest.approx([expected[k] for k in (1, 5, 50)])
    assert search.best_params_ == {"k": max(expected, key=expected.get)}


def test_sklearn_pipeline_with_a_scaler(rng):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test, _ = _tabular(rng)
    pipe = make_pipeline(StandardScaler(), oodscope.create("mahalanobis_ad")).fit(train)
    scaler = StandardScaler().fit(train)
    direct = oodscope.create("mahalanobis_ad").fit(scaler.transform(train)).score(scaler.transform(test))
    np.testing.assert_allclose(pipe.decision_function(test), direct)


def test_pyod_facade_matches_pyod_knn_and_runs_inside_lscp(rng):
    pytest.importorskip("pyod")
    from pyod.models.knn import KNN
    from pyod.models.lof import LOF
    from pyod.models.lscp import LSCP
    from sklearn.metrics import roc_auc_score

    from oodscope.pyod_facade import PyODFacade
    from oodscope.thresholds import threshold_for_contamination

    train, test, y = _tabular(rng)
    facade = PyODFacade(oodscope.create("knn_distance", k=5), contamination=0.1).fit(train)
    # on new rows oodscope's knn_distance and PyOD's KNN are the same score
    np.testing.assert_allclose(facade.decision_function(test), KNN(n_neighbors=5).fit(train).decision_function(test))
    assert facade.threshold_ == threshold_for_contamination(facade.decision_scores_, 0.1)
    assert facade.labels_.sum() == int((facade.decision_scores_ > facade.threshold_).sum()) <= 20
    assert set(np.unique(facade.predict(test))) <= {0, 1} and facade.predict_proba(test).shape == (80, 2)
    assert clone(facade).get_params()["contamination"] == 0.1

    lscp = LSCP([PyODFacade(oodscope.create("knn_distance", k=10)), PyODFacade("iforest"), LOF()],
                local_region_size=30, random_state=0).fit(train)
    scores = lscp.decision_function(test)
    assert np.isfinite(scores).all() and roc_auc_score(y, scores) > 0.95


def test_evaluate_keeps_two_configurations_of_one_detector_apart(rng):
    train, test, _ = _tabular(rng)
    ood = {"far": test[60:]}
    results = oodscope.evaluate([oodscope.create("knn_distance", k=1), oodscope.create("knn_distance", k=100)],
                                Outputs(features=test[:60], name="id"), {"far": Outputs(features=ood["far"],
                                                                                        name="far")},
                                train=Outputs(features=train, name="train"))
    assert [r["detector"] for r in results.records] == ["knn_distance(k=1)", "knn_distance(k=100)"]
    same = oodscope.create("knn_distance", k=3)
    with pytest.raises(ValueError, match=r"given twice as 'knn_distance\(k=3\)'"):
        oodscope.evaluate([same, oodscope.create("knn_distance", k=3)], Outputs(features=test[:60], name="id"),
                          {"far": Outputs(features=ood["far"], name="far")}, train=Outputs(features=train))


def test_pyod_suod_combines_oodscope_and_pyod_detectors(rng):
    pytest.importorskip("suod")
    from pyod.models.lof import LOF
    from pyod.models.suod import SUOD
    from sklearn.metrics import roc_auc_score

    from oodscope.pyod_facade import PyODFacade

    train, test, y = _tabular(rng)
    suod = SUOD(base_estimators=[PyODFacade(oodscope.create("knn_distance", k=10)), PyODFacade("iforest"), LOF()],
                n_jobs=1, combination="average", approx_flag_global=False, bps_flag=False, verbose=False)
    scores = suod.fit(train).decision_function(test)
    assert np.isfinite(scores).all() and roc_auc_score(y, scores) > 0.95


@pytest.mark.parametrize("name", ALL)
def test_fit_and_score_leave_the_global_random_state_alone(name):
    import torch

    c = case(name)
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    try:
        _fit(c).score(c.test)
    finally:
        assert torch.equal(torch.random.get_rng_state(), torch_state), f"{name} changed torch's global RNG"
        assert np.array_equal(np.random.get_state()[1], numpy_state), f"{name} changed numpy's global RNG"


NETWORK_TRAINERS = [name for name in ALL if get(name).trains_network]


@pytest.mark.parametrize("name", NETWORK_TRAINERS)
def test_every_network_training_detector_takes_a_device_and_refuses_an_unusable_one(name):
    assert "device" in get(name)._get_param_names(), f"{name} trains a network but has no device= parameter"
    c = case(name)
    c.detector.set_params(device="cuda:99")
    with pytest.raises((ValueError, RuntimeError), match="cuda:99"):
        c.detector.fit(c.train)
