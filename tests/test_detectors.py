import subprocess
import sys

import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

import oodscope
from oodscope import Head, Outputs
from oodscope.detectors import NotFittedError, UnknownDetectorError


def test_registry_lists_first_detectors_and_suggests_names():
    assert {"msp", "maxlogit", "energy", "mahalanobis", "knn", "vim"} <= set(oodscope.available())
    with pytest.raises(UnknownDetectorError, match="did you mean mahalanobis"):
        oodscope.create("mahalanobs")
    with pytest.raises(ValueError, match="unknown parameters"):
        oodscope.create("knn").set_params(kk=3)
    assert oodscope.create("knn", k=7).clone().k == 7


def test_importing_and_running_msp_does_not_import_optional_dependencies():
    code = ("import sys, numpy as np, oodscope\n"
            "o = oodscope.Outputs(logits=np.random.default_rng(0).normal(size=(20, 3)))\n"
            "oodscope.create('msp').fit(o).score(o)\n"
            "print(sorted(m for m in ('faiss', 'matplotlib', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_logit_scores_hand_computed():
    logits = np.array([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    x = Outputs(logits=logits)
    msp = oodscope.create("msp").fit(x).score(x)
    assert msp == pytest.approx([-np.exp(2) / (np.exp(2) + 2), -1 / 3])
    assert oodscope.create("maxlogit").fit(x).score(x) == pytest.approx([-2.0, -1.0])
    energy = oodscope.create("energy", temperature=2.0).fit(x).score(x)
    assert energy == pytest.approx(-2.0 * logsumexp(logits / 2.0, axis=1))
    assert energy[1] == pytest.approx(-2.0 * np.log(3 * np.exp(0.5)))


def test_score_before_fit_and_input_errors(make_outputs):
    train = make_outputs()
    with pytest.raises(NotFittedError, match="not fitted"):
        oodscope.create("mahalanobis").score(train)
    detector = oodscope.create("mahalanobis").fit(train)
    bad = make_outputs(name="broken")
    bad.features[[3, 7]] = np.nan
    with pytest.raises(ValueError, match=r"'broken'.*2 of 300 rows"):
        detector.score(bad)
    with pytest.raises(ValueError, match="fitted on"):
        detector.score(Outputs(features=np.zeros((5, 3)), name="narrow"))
    with pytest.raises(ValueError, match="empty"):
        detector.score(Outputs(features=np.zeros((0, 16)), name="none"))
    with pytest.raises(ValueError, match="at least two classes"):
        oodscope.create("mahalanobis").fit(Outputs(features=train.features, labels=np.zeros(300, dtype=int)))
    with pytest.raises(ValueError, match="negative"):
        oodscope.create("mahalanobis").fit(Outputs(features=train.features, labels=-np.ones(300, dtype=int)))
    with pytest.raises(ValueError, match="needs labels"):
        oodscope.create("mahalanobis").fit(train.features)
    inf_logits = make_outputs(name="hot")
    inf_logits.logits[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"logits of dataset 'hot': 1 of 300"):
        oodscope.create("msp").fit(inf_logits)
    with pytest.raises(ValueError, match="k=500 is larger"):
        oodscope.create("knn", k=500).fit(train)


def test_head_shape_mismatch_is_named(make_outputs):
    train = make_outputs()
    train.head = Head(np.zeros((4, 5)), np.zeros(4))
    with pytest.raises(ValueError, match="vim: head W has 5 inputs"):
        oodscope.create("vim").fit(train)


def test_class_without_samples_is_named(make_outputs):
    train = make_outputs()
    keep = train.labels != 2
    with pytest.raises(ValueError, match=r"classes \[2\] have no training samples"):
        oodscope.create("mahalanobis").fit(train.subset(keep))


def test_mahalanobis_matches_sklearn_empirical_covariance(make_outputs):
    train, test = make_outputs(), make_outputs(n=50, shift=0.5)
    detector = oodscope.create("mahalanobis").fit(train)
    centered = np.concatenate([train.features[train.labels == c] - train.features[train.labels == c].mean(0)
                               for c in range(4)])
    cov = EmpiricalCovariance(assume_centered=True).fit(centered)
    reference = np.min([cov.mahalanobis(test.features - train.features[train.labels == c].mean(0))
                        for c in range(4)], axis=0)
    assert detector.score(test) == pytest.approx(reference, rel=1e-9)


def test_knn_matches_sklearn_neighbours(make_outputs):
    train, test = make_outputs(), make_outputs(n=40, shift=1.0)
    normalise = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)  # noqa: E731
    reference = NearestNeighbors(n_neighbors=5).fit(normalise(train.features))
    distances, _ = reference.kneighbors(normalise(test.features))
    assert oodscope.create("knn", k=5).fit(train).score(test) == pytest.approx(distances[:, 4], abs=1e-5)


def test_vim_matches_independent_computation(make_outputs):
    train, test = make_outputs(dim=16), make_outputs(n=60, dim=16, shift=0.7)
    # independent recomputation following the ViM paper's code path (EmpiricalCovariance + eig)
    u = -np.linalg.pinv(train.head.W) @ train.head.b
    cov = EmpiricalCovariance(assume_centered=True).fit(train.features - u)
    values, vectors = np.linalg.eig(cov.covariance_)
    null_space = np.ascontiguousarray(vectors.T[np.argsort(values * -1)[8:]].T).real
    vlogit_train = np.linalg.norm((train.features - u) @ null_space, axis=-1)
    alpha = train.logits.max(axis=-1).mean() / vlogit_train.mean()
    reference = alpha * np.linalg.norm((test.features - u) @ null_space, axis=-1) - logsumexp(test.logits, axis=-1)
    assert oodscope.create("vim", dim=8).fit(train).score(test) == pytest.approx(reference, rel=1e-8)
    with pytest.raises(ValueError, match="principal dimension"):
        oodscope.create("vim", dim=16).fit(train)


def test_vim_alpha_from_a_float32_bank_matches_float64_to_1e_5():
    """The fit's second pass projects a float32 bank in float32 (sums in float64): alpha stays within 1e-5 of the
    float64 value, also with features far from the origin (post-ReLU features around 5 with spread 1)."""
    rng = np.random.default_rng(4)
    features = (5.0 + rng.standard_normal((3000, 64))).astype(np.float32)
    W, b = rng.standard_normal((10, 64)) / 8, rng.standard_normal(10)
    logits = (features.astype(np.float64) @ W.T + b).astype(np.float32)
    head = oodscope.Head(W, b)
    as32 = oodscope.create("vim", dim=32).fit(Outputs(features=features, logits=logits, head=head))
    as64 = oodscope.create("vim", dim=32).fit(Outputs(features=features.astype(np.float64),
                                                      logits=logits.astype(np.float64), head=head))
    assert as32.alpha_ == pytest.approx(as64.alpha_, rel=1e-5)
    assert as32.alpha_ != as64.alpha_  # the float32 path did run


def test_calibrate_keeps_target_share_and_predict_flags_ood(make_outputs):
    train, val = make_outputs(), make_outputs(n=1000)
    detector = oodscope.create("msp").fit(train)
    with pytest.raises(NotFittedError, match="calibrate"):
        detector.predict(val)
    detector.calibrate(val, keep=0.95)
    kept = 1.0 - detector.predict(val).mean()
    assert 0.95 <= kept <= 0.96
    flat = Outputs(logits=np.random.default_rng(1).normal(scale=0.1, size=(200, 4)))  # near-uniform softmax
    assert detector.predict(flat).mean() > 0.9


def test_plain_arrays_are_accepted_as_features(rng):
    train = rng.normal(size=(200, 5))
    test = np.vstack([rng.normal(size=(50, 5)), rng.normal(size=(50, 5)) + 3.0])
    scores = oodscope.create("knn", k=5).fit(train).score(test)
    assert scores[50:].mean() > scores[:50].mean()
