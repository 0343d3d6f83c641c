"""Logit/probability detectors, ODIN, the SCOD plug-in rejector and metric, and tuning."""

import itertools
import re

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import entropy as scipy_entropy
from torch import nn

import oodscope
from oodscope import Outputs
from oodscope.detectors.scod_plugin import lagrangian_score as plugin_lagrangian
from oodscope.detectors.scod_plugin import plugin_score
from oodscope.detectors.temperature import fit_temperature
from oodscope.metrics import aurc, scod_auc_rc, scod_risk_coverage_curve


def logits_outputs(logits, labels=None, name="data"):
    return Outputs(logits=np.asarray(logits, dtype=np.float64),
                   labels=None if labels is None else np.asarray(labels), name=name)


# -- logit detectors -----------------------------------------------------------------------------------------
def test_entropy_hand_computed():
    x = logits_outputs([[0.0, 0.0], [np.log(3.0), 0.0], [5.0, 5.0]])
    scores = oodscope.create("entropy").fit(x).score(x)
    expected = [np.log(2), -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)), np.log(2)]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    # a 1000-logit gap: no NaN from log(0)
    assert oodscope.create("entropy").fit(x).score(logits_outputs([[1000.0, 0.0]]))[0] == pytest.approx(0.0, abs=1e-12)


def test_msp_maxlogit_energy_hand_computed():
    x = logits_outputs([[np.log(3.0), 0.0, 0.0]])  # softmax = (3/5, 1/5, 1/5)
    assert oodscope.create("msp").fit(x).score(x)[0] == pytest.approx(-0.6)
    assert oodscope.create("maxlogit").fit(x).score(x)[0] == pytest.approx(-np.log(3.0))
    assert oodscope.create("energy").fit(x).score(x)[0] == pytest.approx(-np.log(5.0))
    assert oodscope.create("energy", temperature=2.0).fit(x).score(x)[0] == pytest.approx(
        -2.0 * np.log(np.sqrt(3.0) + 2.0))


def test_gen_hand_computed():
    x = logits_outputs([np.log([2.0, 1.0, 1.0])])  # p = (0.5, 0.25, 0.25)
    fit = lambda **kw: oodscope.create("gen", **kw).fit(x)
    assert fit(gamma=1.0, M=2).score(x)[0] == pytest.approx(0.5 * 0.5 + 0.25 * 0.75)
    assert fit(gamma=1.0, M=1).score(x)[0] == pytest.approx(0.25)
    expected = 0.5 ** 0.1 * 0.5 ** 0.1 + 2 * 0.25 ** 0.1 * 0.75 ** 0.1
    assert fit().score(x)[0] == pytest.approx(expected)  # defaults gamma=0.1, M=100 -> all 3 classes
    # flat posteriors score higher (more OOD) than peaked ones
    flat, peaked = logits_outputs([[0.0, 0.0, 0.0]]), logits_outputs([[8.0, 0.0, 0.0]])
    assert fit().score(flat)[0] > fit().score(peaked)[0]


def test_kl_matching_hand_computed():
    fit_logits = np.log(np.array([[0.7, 0.2, 0.1], [0.9, 0.05, 0.05], [0.2, 0.6, 0.2]]))
    detector = oodscope.create("kl_matching").fit(logits_outputs(fit_logits))
    d0, d1 = np.array([0.8, 0.125, 0.075]), np.array([0.2, 0.6, 0.2])  # class 2 is never predicted
    np.testing.assert_array_equal(detector.classes_, [0, 1])
    np.testing.assert_allclose(detector.templates_, [d0, d1])
    test = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    expected = [min(scipy_entropy(p, d0), scipy_entropy(p, d1)) for p in test]
    np.testing.assert_allclose(detector.score(logits_outputs(np.log(test))), expected, rtol=1e-10)
    # a template itself scores 0 (no divergence)
    assert detector.score(logits_outputs(np.log([d1])))[0] == pytest.approx(0.0, abs=1e-12)


def test_temperature_scaling_fixed_and_fitted(rng):
    x = logits_outputs([[2.0, 0.0]])
    fixed = oodscope.create("temperature", temperature=2.0).fit(x)
    assert fixed.score(x)[0] == pytest.approx(-np.e / (np.e + 1))
    # fitted T: the NLL minimum (brute force on a fine grid agrees), and the calibration set is what is used
    logits = rng.normal(size=(400, 5)) * 3.0
    labels = np.array([rng.choice(5, p=softmax(row / 2.5)) for row in logits])  # true temperature 2.5
    t_star = fit_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(0.5), np.log(10), 4001))
    nll = [np.mean(-np.log(softmax(logits / t, axis=1)[np.arange(400), labels])) for t in grid]
    assert t_star == pytest.approx(grid[int(np.argmin(nll))], rel=2e-3)
    assert 1.5 < t_star < 4.0
    val = logits_outputs(logits, labels, name="val")
    train = logits_outputs(logits[:50] * 10, labels[:50], name="train")
    detector = oodscope.create("temperature").fit(train, val=val)
    assert detector.temperature_ == pytest.approx(t_star)
    np.testing.assert_allclose(detector.score(val), -softmax(logits / t_star, axis=1).max(axis=1))
    assert oodscope.create("temperature").fit(val).temperature_ == pytest.approx(t_star)


def test_bad_parameters_are_named():
    x = logits_outputs([[1.0, 0.0]], labels=[0])
    cases = [("temperature", {"temperature": 0.0}, "temperature must be > 0"),
             ("temperature", {"temperature": -1.0}, "temperature must be > 0"),
             ("gen", {"gamma": 0.0}, "gamma must be a positive"),
             ("gen", {"M": 0}, "M (number of top classes)"),
             ("gen", {"M": 2.5}, "M (number of top classes)"),
             ("odin", {"temperature": 0.0}, "odin: temperature must be > 0"),
             ("odin", {"epsilon": -0.1}, "epsilon (perturbation size) must be >= 0"),
             ("odin", {"input_std": [0.2, -1.0]}, "input_std"),
             ("scod_plugin", {"c_in": 0.5, "c_out": 0.5}, "c_in + c_out must be < 1"),
             ("scod_plugin", {"c_in": 0.0, "c_out": -0.1}, "c_out must be a cost >= 0"),
             ("scod_plugin", {"c_out": 0.1}, "give both c_in and c_out"),
             ("scod_plugin", {"c_fn": 1.5}, "scod_plugin: c_fn (cost of accepting an OOD sample) must lie in [0, 1]"),
             ("scod_plugin", {"pi_in": 0.0}, "scod_plugin: pi_in (share of ID samples at test time)"),
             ("scod_plugin", {"ratio": "log"}, "scod_plugin: ratio must be 'exp'"),
             ("scod_plugin", {"ood": "enrgy"}, "did you mean energy")]
    for name, params, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            oodscope.create(name, **params).fit(x)
    with pytest.raises(ValueError, match="needs class labels.*val="):
        oodscope.create("temperature").fit(logits_outputs([[1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="OOD samples"):
        oodscope.create("temperature").fit(logits_outputs([[1.0, 0.0], [0.0, 1.0]], labels=[-1, 0]))


# -- ODIN -----------------------------------------------------------------------------------------------------
class _Normalize(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([[0.5, 0.4, 0.3, 0.2]]))
        self.register_buffer("std", torch.tensor([[0.2, 0.5, 1.0, 2.0]]))

    def forward(self, x):
        return (x.float() - self.mean) / self.std


def _linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 1.0, -1.0, 2.0], [-1.0, 0.0, 1.0, 1.0]]))
        model[0].bias.copy_(torch.tensor([0.1, -0.2, 0.0]))
    return model


def test_odin_hand_computed_on_a_linear_model():
    model, pre = _linear_model(), _Normalize()
    x = np.random.default_rng(1).uniform(size=(7, 4)).astype(np.float32)
    outputs = oodscope.extract(model, x, name="lin", preprocess=pre, use_cache=False, progress=False, device="cpu")
    W, b = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    mean, std = pre.mean.double().numpy(), pre.std.double().numpy()
    T, eps = 10.0, 0.01
    z = (x - mean) / std
    p = softmax((z @ W.T + b) / T, axis=1)
    top = p.argmax(axis=1)
    grad = (W[top] - p @ W) / T  # d log S_top / dz for a linear model
    z_tilde = z + eps / std * np.sign(grad)  # eps in [0, 1] pixel units -> eps / std in the normalised space
    expected = -softmax((z_tilde @ W.T + b) / T, axis=1).max(axis=1)
    odin = oodscope.create("odin", temperature=T, epsilon=eps).fit(outputs)
    np.testing.assert_allclose(odin.score(outputs), expected, rtol=1e-5, atol=1e-7)
    # input_std=1.0 steps eps in the model-input space instead
    expected_raw = -softmax(((z + eps * np.sign(grad)) @ W.T + b) / T, axis=1).max(axis=1)
    raw = oodscope.create("odin", temperature=T, epsilon=eps, input_std=1.0).fit(outputs)
    np.testing.assert_allclose(raw.score(outputs), expected_raw, rtol=1e-5, atol=1e-7)
    # the perturbation raises every sample's confidence
    assert (odin.score(outputs) < -p.max(axis=1)).all()
    # epsilon = 0 is temperature-scaled MSP from the cached logits: no model needed
    cached = Outputs(logits=outputs.logits, name="cached")
    no_step = oodscope.create("odin", temperature=T, epsilon=0.0).fit(cached)
    np.testing.assert_allclose(no_step.score(cached), -p.max(axis=1), rtol=1e-6)


def test_model_needing_detector_on_cached_outputs_names_the_fix():
    cached = Outputs(logits=np.zeros((3, 2)), name="cifar10-test (from disk)")
    odin = oodscope.create("odin").fit(cached)
    with pytest.raises(ValueError, match=r"odin needs model but dataset 'cifar10-test \(from disk\)' has none.*"
                                         r"oodscope.extract"):
        odin.score(cached)


# -- SCOD -----------------------------------------------------------------------------------------------------
def test_scod_risk_coverage_hand_computed():
    # pool in acceptance order: ID ok (0), ID error (0.25), OOD (0.75), ID ok (0)
    coverage, risk = scod_risk_coverage_curve([0.1, 0.2, 0.3], [0, 1, 0], [0.25], c_fn=0.75)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.125, 1.0 / 3.0, 0.25])
    assert scod_auc_rc([0.1, 0.2, 0.3], [0, 1, 0], [0.25], c_fn=0.75) == pytest.approx(
        (0.0 + 0.125 + 1.0 / 3.0 + 0.25) / 4)
    with pytest.raises(ValueError, match="c_fn"):
        scod_auc_rc([0.1], [0], [0.2], c_fn=1.5)
    with pytest.raises(ValueError, match="at least one ID and one OOD"):
        scod_auc_rc([0.1], [0], [])


def test_scod_auc_rc_properties(rng):
    id_scores, ood_scores = rng.normal(size=200), rng.normal(1.0, size=80)
    errors = rng.random(200) < 0.2
    # c_fn = 1/2 weighs both failure kinds equally: half the AURC of "misclassified or OOD"
    pooled = aurc(np.r_[id_scores, ood_scores], np.r_[errors, np.ones(80)])
    assert scod_auc_rc(id_scores, errors, ood_scores, c_fn=0.5) == pytest.approx(0.5 * pooled)
    # rejecting every failure first beats the reverse order
    good = scod_auc_rc(errors.astype(float), errors, np.ones(80))
    bad = scod_auc_rc(-errors.astype(float), errors, -np.ones(80))
    assert good < scod_auc_rc(id_scores, errors, ood_scores) < bad


def test_scod_plugin_hand_computed_and_limits():
    train = logits_outputs([[2.0, 0.0], [0.0, 4.0], [1.0, 1.0]], labels=[0, 1, 0])
    test = logits_outputs([[3.0, 0.0], [0.5, 0.0]])
    msp = softmax(test.logits, axis=1).max(axis=1)
    median = np.median([-2.0, -4.0, -1.0])  # maxlogit scores of the training samples
    rho = np.exp(-test.logits.max(axis=1) - median)
    # default: the budget family t(x) = [(1 - c_fn)(1 - MSP) + c_fn rho] / [pi_in + (1 - pi_in) rho]
    detector = oodscope.create("scod_plugin", ood="maxlogit", c_fn=0.75, pi_in=0.6).fit(train)
    expected = (0.25 * (1 - msp) + 0.75 * rho) / (0.6 + 0.4 * rho)
    np.testing.assert_allclose(detector.score(test), expected)
    # first sample by hand: MSP = e^3 / (e^3 + 1), rho = exp(-3 + 2) = e^-1
    first = (0.25 / (np.exp(3) + 1) + 0.75 / np.e) / (0.6 + 0.4 / np.e)
    assert detector.score(test)[0] == pytest.approx(first, rel=1e-12)
    # the paper's theta(z) = -1/z on the ID score z = max logit: rho = 1 / max logit
    inverse = oodscope.create("scod_plugin", ood="maxlogit", ratio="inverse").fit(train)
    rho_inv = 1 / test.logits.max(axis=1)
    np.testing.assert_allclose(inverse.score(test), (0.25 * (1 - msp) + 0.75 * rho_inv) / (0.5 + 0.5 * rho_inv))
    with pytest.raises(ValueError, match=r"scod_plugin: ratio='inverse' needs a positive ID score.*ratio='exp'"):
        inverse.score(logits_outputs([[-1.0, -2.0]]))
    # fixed costs (Lemma 3.1): (1 - c_in - c_out)(1 - MSP) + c_out rho; c_out = 0 is Chow's rule
    fixed = oodscope.create("scod_plugin", ood="maxlogit", c_in=0.1, c_out=0.3).fit(train)
    np.testing.assert_allclose(fixed.score(test), 0.6 * (1 - msp) + 0.3 * rho)
    chow = oodscope.create("scod_plugin", c_in=0.0, c_out=0.0).fit(train)
    np.testing.assert_allclose(chow.score(test), 1 - msp)


def test_scod_plugin_reduces_to_selective_classification_and_ood_detection(rng):
    """The paper's SCOD rule generalises both problems: c_fn = 0 with only ID data ranks by 1 - MSP (Chow),
    c_fn = 1 ranks by the density ratio alone (OOD detection)."""
    confidence, rho = rng.uniform(0.2, 1.0, 50), np.exp(rng.normal(size=50))
    sc = plugin_lagrangian(confidence, rho, c_fn=0.0, pi_in=1.0)
    np.testing.assert_allclose(sc, 1 - confidence)
    ood = plugin_lagrangian(confidence, rho, c_fn=1.0, pi_in=0.3)
    np.testing.assert_array_equal(np.argsort(ood), np.argsort(rho))


def test_scod_lagrangian_score_is_the_papers_cost_sensitive_rule_at_every_lambda(rng):
    """t(x) > lambda is Lemma 3.1's rule (Eq. 5) with the Lagrangian's weights normalised (sum S > 0) to the
    (1 - c_in - c_out, c_in, c_out) form of Eq. 4; at pi_in = 1/2 the normaliser is 1 and the rule is the black-box
    rejector of Eq. 8, (1 - c_in - c_out) s_sc + c_out theta(s_ood) < 1 - 2 c_in - c_out with theta(z) = -1/z and
    s_ood = 1 / rho, c_in = lambda pi_in, c_out = c_fn - lambda (1 - pi_in)."""
    confidence, rho = rng.uniform(0.1, 1.0, 400), np.exp(rng.normal(0.0, 2.0, 400))
    c_fn = 0.75
    for pi_in in (0.5, 0.2, 0.9):
        t = plugin_lagrangian(confidence, rho, c_fn, pi_in)
        for lam in (0.05, 0.3, 0.6, 0.9, 1.4, 3.0):
            norm = 1 + lam * (2 * pi_in - 1)
            if norm <= 0:  # pi_in < 1/2 and lambda >= 1 / (1 - 2 pi_in): dividing by it would flip the rule
                continue
            c_in, c_out = lam * pi_in / norm, (c_fn - lam * (1 - pi_in)) / norm
            np.testing.assert_array_equal(plugin_score(confidence, rho, c_in, c_out) > c_in, t > lam)
            if pi_in == 0.5:
                c_in, c_out = lam * pi_in, c_fn - lam * (1 - pi_in)
                s_ood = 1 / rho
                eq8 = (1 - c_in - c_out) * confidence + c_out * (-1 / s_ood) < 1 - 2 * c_in - c_out
                np.testing.assert_array_equal(eq8, t > lam)


def test_scod_scores_are_monotone_in_confidence_and_density_ratio():
    """Lemma 3.1: with c_out > 0 the abstention score rises with P_out/P_in and falls with max_y P_in(y|x). The
    budget score t(x) always falls with the confidence; it rises with rho iff c_fn pi_in > (1 - c_fn)(1 - pi_in)(1 -
    confidence), which holds for every input at the defaults c_fn = 0.75, pi_in = 0.5."""
    confidence = np.linspace(0.1, 1.0, 37)[:, None]
    rho = np.exp(np.linspace(-8.0, 8.0, 41))[None, :]
    fixed = plugin_score(confidence, rho, c_in=0.1, c_out=0.3)
    assert np.all(np.diff(fixed, axis=1) > 0) and np.all(np.diff(fixed, axis=0) < 0)
    t = plugin_lagrangian(confidence, rho, c_fn=0.75, pi_in=0.5)
    assert np.all(np.diff(t, axis=1) > 0) and np.all(np.diff(t, axis=0) < 0)
    # away from the defaults the direction in rho flips exactly where the derivative's sign says
    c_fn, pi_in = 0.3, 0.2
    t = plugin_lagrangian(confidence, rho, c_fn, pi_in)
    rising = (c_fn * pi_in > (1 - c_fn) * (1 - pi_in) * (1 - confidence)).ravel()
    assert rising.any() and not rising.all()
    np.testing.assert_array_equal(np.all(np.diff(t, axis=1) > 0, axis=1), rising)
    np.testing.assert_array_equal(np.all(np.diff(t, axis=1) < 0, axis=1), ~rising)


def test_scod_budget_family_is_a_threshold_family_of_one_score(rng):
    """Eq. 3 with multiplier lambda: the Lagrangian rule, solved by brute force over every rejector of a discrete
    problem, abstains exactly where t(x) > lambda; and it is optimal among rejectors with no larger test rejection
    rate, so sweeping a threshold on t traces the constrained optimum for every budget b_rej."""
    n, c_fn, pi_in = 9, 0.75, 0.6
    p_in, p_out = rng.dirichlet(np.ones(n)), rng.dirichlet(np.ones(n))
    max_posterior = rng.uniform(0.4, 1.0, n)
    t = plugin_lagrangian(max_posterior, p_out / p_in, c_fn, pi_in)
    rejectors = np.array(list(itertools.product([False, True], repeat=n)))
    objective = ((1 - c_fn) * ((p_in * (1 - max_posterior)) * ~rejectors).sum(1)
                 + c_fn * (p_out * ~rejectors).sum(1))                     # Eq. 3 objective
    rejection_rate = (pi_in * p_in + (1 - pi_in) * p_out) @ rejectors.T    # P_te(r = 1)
    for lam in np.r_[0.01, np.sort(t)[:-1] + np.diff(np.sort(t)) / 2, t.max() + 0.1]:
        lagrangian = objective + lam * rejection_rate
        rule = t > lam
        assert lagrangian[np.all(rejectors == rule, axis=1)][0] == pytest.approx(lagrangian.min())
        rate = (pi_in * p_in + (1 - pi_in) * p_out) @ rule
        feasible = rejection_rate <= rate + 1e-12
        assert objective[np.all(rejectors == rule, axis=1)][0] == pytest.approx(objective[feasible].min())


def test_scod_plugin_detector_traces_the_lambda_sweep(rng):
    """AUC-RC from thresholding the detector equals evaluating the rule at every lambda (the paper's sweep)."""
    logits_id, logits_ood = rng.normal(size=(60, 4)) * 3, rng.normal(size=(40, 4))
    labels = rng.integers(0, 4, 60)
    train = logits_outputs(rng.normal(size=(100, 4)) * 3, labels=rng.integers(0, 4, 100))
    detector = oodscope.create("scod_plugin", pi_in=0.6).fit(train)
    test, ood = logits_outputs(logits_id), logits_outputs(logits_ood)
    errors = logits_id.argmax(1) != labels
    coverage, risk = scod_risk_coverage_curve(detector.score(test), errors, detector.score(ood), c_fn=0.75)
    pool = np.r_[logits_id, logits_ood]
    conf = softmax(pool, axis=1).max(1)
    rho = detector.density_ratio(logits_outputs(pool))
    losses = np.r_[0.25 * errors, np.full(40, 0.75)]
    t = np.sort(detector.score(logits_outputs(pool)))
    assert np.all(np.diff(t) > 0) and len(coverage) == 100  # no ties: one curve point per sample
    for k, lam in enumerate(np.r_[(t[:-1] + t[1:]) / 2, t[-1] + 1]):
        accept = ~(0.25 * (1 - conf) + 0.75 * rho > lam * (0.6 + 0.4 * rho))   # rule at lambda, not via t
        assert accept.mean() == pytest.approx(coverage[k])
        assert losses[accept].sum() / accept.sum() == pytest.approx(risk[k])


# -- tuning ---------------------------------------------------------------------------------------------------
def test_tune_picks_best_mean_auroc_and_keeps_table(make_outputs):
    train, val = make_outputs(name="train"), make_outputs(n=200, name="val")
    ood = {"a": make_outputs(n=150, shift=1.5, name="a"), "b": make_outputs(n=150, shift=3.0, name="b")}
    grid = {"gamma": [0.05, 1.0, -1.0], "M": [1, 4]}
    result = oodscope.tune("gen", grid, val, ood, train=train)
    assert len(result.table) == 6
    failed = [row for row in result.table if row["error"]]
    assert len(failed) == 2 and all("gamma must be a positive" in row["error"] for row in failed)
    ok = [row for row in result.table if not row["error"]]
    best = max(ok, key=lambda row: row["auroc"])
    assert result.best_params == best["params"]
    assert result.best_detector.get_params() == {**best["params"]}
    for row in ok:
        assert row["auroc"] == pytest.approx(np.mean([m["auroc"] for m in row["per_set"].values()]))
    assert "gamma=0.05, M=1" in str(result)
    # the detector's own grid is used by default; unknown parameters are named
    assert len(oodscope.tune("energy", None, val, ood, train=train).table) == len(oodscope.create("energy").grid[
        "temperature"])
    with pytest.raises(ValueError, match="has no parameters"):
        oodscope.tune("gen", {"k": [1]}, val, ood)


def test_tune_odin_temperature_runs_on_cached_outputs(make_outputs):
    val, ood = make_outputs(name="val"), make_outputs(shift=2.0, name="ood")
    result = oodscope.tune("odin", {"temperature": [1.0, 1000.0]}, val, ood, epsilon=0.0)
    assert len(result.table) == 2 and not any(row["error"] for row in result.table)
    msp = oodscope.create("msp").fit(val)
    expected = 100 * oodscope.metrics.auroc(msp.score(val), msp.score(ood))
    assert result.table[0]["auroc"] == pytest.approx(expected)


# -- real data (slow) -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cifar10_resnet20_logit_detectors_reproduce_verified_numbers(tmp_path):
    """AUROC on CIFAR-10 test vs CIFAR-100 as checked side by side with pytorch-ood
    (benchmarks/logit_detectors_vs_pytorch_ood.py)."""
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-bench"
    if not (bench_dir / "models" / "cifar10_resnet20.pth").exists():
        pytest.skip("../shared/data/cifar10-bench is not available")
    from oodscope.data.spec import load_benchmark_dir
    from oodscope.models.zoo import load_model

    bench = load_benchmark_dir(bench_dir)
    model, pre = load_model("cifar10_resnet20", bench_dir / "models" / "cifar10_resnet20.pth")
    splits = bench.datasets()
    get = lambda key: oodscope.extract(model, (splits[key].inputs, splits[key].labels), name=key.replace("/", "-"),
                                       preprocess=pre, cache_dir=tmp_path, progress=False)
    train, val, test, c100 = get("train"), get("val"), get("test"), get("near/cifar100")
    expected = {"msp": 85.43, "maxlogit": 86.63, "energy": 86.66, "entropy": 85.86, "temperature": 86.00,
                "gen": 86.80, "kl_matching": 80.01}
    for name, value in expected.items():
        detector = oodscope.create(name, **({"calibration": val} if name == "temperature" else {})).fit(train)
        assert 100 * oodscope.metrics.auroc(detector.score(test), detector.score(c100)) == pytest.approx(value, abs=0.01)
