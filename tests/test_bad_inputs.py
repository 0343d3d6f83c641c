"""No silent numbers: the bad-input sweep over every registered detector, and the issue's reproduced cases.

The sweep (:mod:`bad_input_sweep`) covers new detectors without listing them. A case passes when the outcome
is a clear error raised by oodscope, a documented warning, or finite scores that still rank the planted outliers;
a constant, non-ranking or accepted-invalid result ("silent") and any other exception ("crash") fail.
"""

from __future__ import annotations

import numpy as np
import pytest

import bad_input_sweep as sweep
import oodscope
from detector_cases import case, detector_names, gaussian_outputs
from oodscope import Head, Outputs
from oodscope.detectors.base import SaturationWarning


@pytest.fixture(scope="module")
def records():
    return sweep.run()


def test_sweep_has_no_silent_numbers_and_no_crashes(records):
    print("\nbad-input sweep over", len({r["detector"] for r in records}), "detectors:\n" + sweep.summary(records))
    bad = [f"{r['outcome']}: {r['detector']} / {r['case']}" for r in records if r["outcome"] in ("silent", "crash")]
    assert not bad, "\n".join(bad)


def test_sweep_covers_every_detector_and_every_class(records):
    covered = {r["detector"] for r in records}
    assert covered >= set(detector_names()) - {"sig_maha_knn"}  # that one needs an uninstalled package
    cases = {r["case"].split(" (")[0] for r in records}
    assert cases == {name for name, *_ in sweep.CASES}
    assert len(records) > 800


# -- the reproduced cases, one regression test each ---------------------------------------------------
def _nan_head(outputs):
    W = outputs.head.W.copy()
    W[0, 0] = np.nan
    return Outputs(logits=outputs.logits, features=outputs.features, labels=outputs.labels, head=Head(W, outputs.head.b))


@pytest.mark.parametrize("name", ["dice", "fdbd", "vim", "residual"])
def test_nan_in_the_classifier_head_is_named(name):
    train, _ = gaussian_outputs()
    with pytest.raises(ValueError, match="head W given with dataset .* NaN or inf"):
        oodscope.create(name).fit(_nan_head(train))


def test_she_refuses_a_label_beyond_the_head():
    train, _ = gaussian_outputs()
    labels = train.labels.copy()
    labels[0] = 9
    bad = Outputs(logits=train.logits, features=train.features, labels=labels, head=train.head)
    with pytest.raises(ValueError, match="training label 9 .* 4 classes"):
        oodscope.create("she").fit(bad)


@pytest.mark.parametrize("name", ["mahalanobis", "rmds", "wdiscood", "vim", "heat", "mahalanobis_ensemble",
                                  "optimal_shaping", "dice", "vra", "nnguide", "knn"])
def test_identical_training_rows_are_refused(name):
    c = case(name)
    same = c.train.subset(np.zeros(len(c.train), dtype=int))
    with pytest.raises(ValueError, match="training samples .* are identical"):
        c.detector.fit(same)


def test_image_gaussian_ad_refuses_identical_images_instead_of_crashing_in_scipy():
    c = case("gaussian_ad")
    with pytest.raises(ValueError, match="not all identical"):
        c.detector.fit(np.repeat(c.train[:1], 4, axis=0))


@pytest.mark.parametrize("name", ["msp", "entropy", "gen", "kl_matching", "igeood", "scod_plugin", "knn"])
def test_saturated_inputs_warn(name):
    c = case(name)
    c.detector.fit(c.train)
    big = Outputs(logits=c.test.logits * 1e30, features=c.test.features * 1e30, head=c.test.head, name="big")
    with pytest.warns(SaturationWarning, match="exceed the training data's magnitude"):
        c.detector.score(big)


def test_in_range_inputs_do_not_warn():
    import warnings

    c = case("msp")
    c.detector.fit(c.train)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SaturationWarning)
        c.detector.score(Outputs(logits=c.test.logits * 50, name="far but plausible"))


@pytest.mark.parametrize("name", ["patchcore", "gaussian_ad"])
def test_image_detectors_refuse_0_to_255_floats(name):
    c = case(name)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*divide 0..255 values by 255"):
        c.detector.fit(c.train * 255.0)
    c.detector.fit(c.train)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        c.detector.score(c.test * 255.0)


def test_one_d_outputs_get_a_message_naming_the_input():
    train, _ = gaussian_outputs()
    flat = Outputs(logits=train.logits[:, 0], labels=train.labels)
    with pytest.raises(ValueError, match=r"logits of dataset 'data' have shape \(200,\); expected \(samples, classes\)"):
        oodscope.create("msp").fit(flat)


def test_nan_in_raw_inputs_is_refused_before_the_network_re_runs():
    c = case("nac")
    source = c.test.source
    x = np.asarray(source.inputs, dtype=np.float32) / 255.0
    x[0, 0, 0, 0] = np.nan
    from dataclasses import replace

    bad = Outputs(logits=c.test.logits, features=c.test.features, layers=c.test.layers, head=c.test.head,
                  name="nan image", source=replace(source, inputs=x))
    c.detector.fit(c.train)
    with pytest.raises(ValueError, match="raw inputs of dataset 'nan image'"):
        c.detector.score(bad)


def test_drpo_is_deterministic_under_a_seed():
    c1, c2 = case("drpo"), case("drpo")
    assert np.array_equal(c1.detector.fit(c1.train).score(c1.test), c2.detector.fit(c2.train).score(c2.test))


def test_temperature_on_separable_calibration_data_warns_and_keeps_t_1():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 8.0 * np.eye(3)[labels]  # every sample classified correctly
    val = Outputs(logits=logits, labels=labels, name="val")
    with pytest.warns(UserWarning, match="no minimum"):
        detector = oodscope.create("temperature").fit(val, val=val)
    assert detector.temperature_ == 1.0
    test = Outputs(logits=rng.normal(size=(50, 3)) * 3.0, name="test")
    assert len(np.unique(detector.score(test))) == 50  # no collapse to tied scores
    again = Outputs(logits=np.concatenate([logits, logits]), labels=np.r_[labels, labels], name="duplicated")
    with pytest.warns(UserWarning, match="no minimum"):
        assert oodscope.create("temperature").fit(again).temperature_ == 1.0
