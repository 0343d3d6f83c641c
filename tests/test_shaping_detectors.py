"""Activation-shaping and head-geometry detectors: hand-computed cases, paper properties, bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax

import oodscope
from oodscope import Head, Outputs


def energy(logits):
    return -logsumexp(logits, axis=1)


def outputs_from(features, W, b=None, labels=None, name="data"):
    features, W = np.asarray(features, float), np.asarray(W, float)
    b = np.zeros(len(W)) if b is None else np.asarray(b, float)
    return Outputs(features=features, logits=features @ W.T + b, labels=labels, head=Head(W, b), name=name)


# -- shaping: hand-computed --------------------------------------------------------------------------------
def test_react_clips_at_train_percentile_then_energy():
    W = np.array([[1.0, 0.0], [0.0, 1.0]])
    train = outputs_from(np.arange(20.0).reshape(10, 2), W)  # values 0..19
    react = oodscope.create("react", percentile=50).fit(train)
    assert react.clip_ == pytest.approx(9.5)
    x = outputs_from([[20.0, 1.0], [3.0, 4.0]], W)
    assert react.score(x) == pytest.approx(energy(np.array([[9.5, 1.0], [3.0, 4.0]])))


def test_ash_variants_hand_computed():
    a = np.array([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]])  # p=80 keeps k = 10 - 8 = 2 values
    W = np.eye(10)
    x = outputs_from(a, W)
    kept = np.zeros((1, 10))
    kept[0, 8:] = [8.0, 9.0]
    s1, s2 = 45.0, 17.0
    expected = {
        "ash_p": kept,
        "ash_b": np.where(kept > 0, s1 / 2, 0.0),
        "ash_s": kept * np.exp(s1 / s2),
    }
    for name, shaped in expected.items():
        assert oodscope.create(name, percentile=80).fit(x).score(x) == pytest.approx(energy(shaped)), name


def test_scale_scales_unpruned_activations():
    a = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 8.0]])  # p=50 keeps the top 2
    W = np.array([[1.0, -1.0, 0.5, 0.0], [0.0, 1.0, 0.0, 1.0]])
    x = outputs_from(a, W)
    r = np.array([10.0 / 7.0, 1.0])
    expected = energy((a * np.exp(r)[:, None]) @ W.T)
    assert oodscope.create("scale", percentile=50).fit(x).score(x) == pytest.approx(expected)


def test_vra_piecewise_suppression_and_amplification():
    W = np.array([[1.0, 2.0]])
    train = outputs_from(np.column_stack([np.arange(11.0), 10 * np.arange(11.0)]), W)  # unit 2 is 10x unit 1
    vra = oodscope.create("vra", lower_percentile=20, upper_percentile=80, gamma=0.5).fit(train)
    assert vra.alpha_ == pytest.approx([2.0, 20.0]) and vra.beta_ == pytest.approx([8.0, 80.0])
    x = outputs_from([[1.0, 50.0], [9.0, 20.0]], W)
    shaped = np.array([[0.0, 50.5], [8.0, 20.5]])  # below alpha -> 0, inside -> z + gamma, above beta -> beta
    assert vra.score(x) == pytest.approx(energy(shaped @ W.T))


def test_dice_keeps_largest_contributions():
    W = np.array([[1.0, -2.0, 3.0], [4.0, 0.5, -1.0]])
    b = np.array([0.1, -0.2])
    train = outputs_from([[1.0, 2.0, 1.0], [3.0, 0.0, 1.0]], W, b)  # mean feature (2, 1, 1)
    dice = oodscope.create("dice", sparsity=50).fit(train)
    contribution = np.array([[2.0, -2.0, 3.0], [8.0, 0.5, -1.0]])  # median 1.25: keep 2, 3, 8
    assert dice.mask_.tolist() == (contribution > 1.25).tolist()
    x = outputs_from([[1.0, 1.0, 1.0]], W, b)
    masked = np.where(contribution > 1.25, W, 0.0)
    assert dice.score(x) == pytest.approx(energy(np.array([[1.0, 1.0, 1.0]]) @ masked.T + b))


# -- head geometry: hand-computed / independent references ---------------------------------------------------
def test_gradnorm_closed_form_equals_autograd(rng):
    n, d, c = 7, 5, 4
    features, W, b = rng.normal(size=(n, d)), rng.normal(size=(c, d)), rng.normal(size=c)
    x = outputs_from(features, W, b)
    for temperature in (1.0, 2.5):
        scores = oodscope.create("gradnorm", temperature=temperature).fit(x).score(x)
        weight = torch.tensor(W, requires_grad=True)
        for i in range(n):  # reference: per-sample autograd of KL(uniform || softmax(f / T)) w.r.t. W
            logits = torch.tensor(features[i]) @ weight.T + torch.tensor(b)
            kl = -(torch.log_softmax(logits / temperature, 0)).mean() - np.log(c)
            (grad,) = torch.autograd.grad(kl, weight)
            assert scores[i] == pytest.approx(-grad.abs().sum().item(), rel=1e-10)


def test_fdbd_distance_to_boundary_hand_computed():
    W = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    train = outputs_from([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]], W)  # mean (0, 1)
    fdbd = oodscope.create("fdbd").fit(train)
    x = outputs_from([[3.0, 1.0]], W)  # logits (3, 1, -3), predicted class 0
    distances = [2.0 / np.sqrt(2.0), 6.0 / 2.0]
    assert fdbd.score(x) == pytest.approx([-np.mean(distances) / 3.0])


def test_she_patterns_are_means_of_correctly_classified():
    W = np.array([[1.0, 0.0], [0.0, 1.0]])
    features = np.array([[2.0, 0.0], [4.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    train = outputs_from(features, W, labels=np.array([0, 0, 1, 1]))  # the last one is misclassified
    she = oodscope.create("she").fit(train)
    assert she.patterns_ == pytest.approx(np.array([[3.0, 0.5], [0.0, 3.0]]))
    assert she.score(outputs_from([[1.0, 2.0]], W)) == pytest.approx([-6.0])
    with pytest.raises(ValueError, match="she: classes \\[1\\] have no correctly classified"):
        oodscope.create("she").fit(outputs_from(features[[0, 1, 3]], W, labels=np.array([0, 0, 1])))


# -- methods pytorch-ood lacks: hand-computed case + a property the paper states -----------------------------
def test_residual_hand_computed_and_principal_space_invariance():
    W = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    train_features = np.concatenate([np.diag([5.0, 3.0, 0.1]), -np.diag([5.0, 3.0, 0.1])])  # principal: e1, e2
    residual = oodscope.create("residual", dim=2).fit(outputs_from(train_features, W))  # origin 0
    x = np.array([[1.0, 2.0, 3.0], [10.0, -4.0, -0.5]])
    assert residual.score(outputs_from(x, W)) == pytest.approx([3.0, 0.5], rel=1e-12)
    # ViM Eq. 6: moving a feature inside the principal space does not change its residual
    moved = x + np.array([[7.0, -3.0, 0.0]]) @ np.diag([1.0, 1.0, 0.0])
    assert residual.score(outputs_from(moved, W)) == pytest.approx(residual.score(outputs_from(x, W)), rel=1e-12)


def test_residual_is_the_norm_behind_vims_virtual_logit(make_outputs):
    train, test = make_outputs(n=400), make_outputs(n=100, shift=1.0)
    vim = oodscope.create("vim", dim=6).fit(train)
    residual = oodscope.create("residual", dim=6).fit(train)
    virtual_logit = vim.score(test) + logsumexp(test.logits, axis=1)
    assert residual.score(test) == pytest.approx(virtual_logit / vim.alpha_, rel=1e-8)


def test_neco_hand_computed_ratio():
    t = np.linspace(-1.0, 1.0, 41)
    u = np.tile([1.0, -1.0], 21)[:41] * 0.3
    train_features = np.column_stack([t, t, u])  # units 1 and 2 perfectly correlated
    W = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    neco = oodscope.create("neco", dim=1, max_logit=False).fit(outputs_from(train_features, W))
    mean, std = train_features.mean(0), train_features.std(0)
    standardised = np.array([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
    scores = neco.score(outputs_from(mean + standardised * std, W))
    assert scores == pytest.approx([-1.0, 0.0, -1.0 / np.sqrt(2.0)], abs=1e-9)
    with_logit = oodscope.create("neco", dim=1).fit(outputs_from(train_features, W))
    x = outputs_from(mean + standardised * std, W)
    assert with_logit.score(x) == pytest.approx(scores * x.logits.max(axis=1))


def test_neco_separates_collapsed_id_from_off_subspace_features(rng):
    """Sec. 3-4: collapsed ID features lie near the class-mean subspace, so their principal-space share is higher."""
    n_classes, dim = 4, 16
    means = 4.0 * rng.normal(size=(n_classes, dim))
    W, b = means / 4.0, np.zeros(n_classes)

    def collapsed(n):
        return means[rng.integers(0, n_classes, n)] + 0.3 * rng.normal(size=(n, dim))

    train, test = outputs_from(collapsed(600), W, b), outputs_from(collapsed(300), W, b)
    noise = rng.normal(size=(300, dim))
    centred_means = means - means.mean(0)
    off = noise - noise @ np.linalg.pinv(centred_means) @ centred_means  # orthogonal to the class-mean simplex
    ood = outputs_from(train.features.mean(0) + 3.0 * off, W, b)
    neco = oodscope.create("neco", max_logit=False).fit(train)  # default d = C - 1 = 3
    assert neco.score(ood).mean() > neco.score(test).mean() + 0.5
    assert np.all((neco.score(test) >= -1.0) & (neco.score(test) <= 0.0))


def test_optimal_shaping_closed_form_hand_computed():
    W = np.array([[1.0, 0.0], [0.0, 1.0]])
    train = outputs_from([[1.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.5, 1.5]], W)
    opt = oodscope.create("optimal_shaping", n_bins=3, tail=0.0).fit(train)
    # bins [0,1) [1,2) [2,3); mean contribution to the predicted logit: (0, (1 + 1.5) / 4, 2 / 4); 3 is outside
    raw = np.array([0.0, 0.625, 0.5])
    assert opt.theta_ == pytest.approx(raw / np.sqrt(np.mean(raw ** 2)))
    x = outputs_from([[1.5, 0.2], [3.5, 0.0]], W)
    assert opt.score(x) == pytest.approx([-1.5 * opt.theta_[1], 0.0])


def test_optimal_shaping_theta_maximises_expected_id_score(make_outputs, rng):
    """Eq. 14 is the maximiser of the mean ID shaped logit over all theta of the same norm."""
    train = make_outputs(n=500)
    opt = oodscope.create("optimal_shaping", n_bins=20).fit(train)
    best = -opt.score(train).mean()
    fitted = opt.theta_.copy()
    for _ in range(20):
        other = rng.normal(size=fitted.shape)
        opt.theta_ = other / np.linalg.norm(other) * np.linalg.norm(fitted)
        assert -opt.score(train).mean() <= best + 1e-9
    opt.theta_ = fitted


# -- AdaSCALE (needs the model) ----------------------------------------------------------------------------
class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.body(x))


def tiny_outputs(n, seed, shift=0.0, name="data"):
    g = np.random.default_rng(seed)
    inputs = (g.normal(size=(n, 3, 2, 2)) + shift).astype(np.float32)
    return oodscope.extract(TinyNet(), inputs, name=name, use_cache=False, progress=False, device="cpu")


def test_adascale_statistic_and_percentile_hand_computed():
    ada = oodscope.create("adascale", k1=50, k2=25, lam=2.0, min_percentile=60, max_percentile=80)
    z = np.array([[4.0, 3.0, 1.0, 0.0]])
    moved = np.array([[5.0, -1.0, 2.0, 0.5]])
    # top-2 of z: units 0, 1 -> relu(moved) = 5 + 0; top-1: unit 0 -> |4 - 5| = 1; Q' = 5 + 2 * 1
    assert ada._shift_statistic(z, moved) == pytest.approx([7.0])
    ada.id_statistic_ = np.array([1.0, 5.0, 7.0, 9.0])
    # F_ID(7) = 3/4 -> p = 60 + (1 - 3/4) * 20 = 65
    assert ada.percentiles(z, moved) == pytest.approx([65.0])


def test_adascale_reduces_to_scale_with_a_fixed_percentile():
    """With p_min = p_max the adaptive percentile is constant and AdaSCALE is SCALE (the paper's baseline)."""
    train, test = tiny_outputs(200, 0, name="train"), tiny_outputs(50, 1, shift=1.0, name="test")
    ada = oodscope.create("adascale", min_percentile=75, max_percentile=75).fit(train)
    scale = oodscope.create("scale", percentile=75).fit(train)
    assert ada.score(test) == pytest.approx(scale.score(test), rel=1e-5)
    adaptive = oodscope.create("adascale", fit_samples=100).fit(train)
    assert len(adaptive.id_statistic_) == 100 and np.isfinite(adaptive.score(test)).all()


def test_adascale_without_model_names_the_fix():
    cached = tiny_outputs(20, 0)
    cached.source = None
    with pytest.raises(ValueError, match="adascale needs model .* runs the network again"):
        oodscope.create("adascale").fit(cached)


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, param", [("react", "percentile"), ("ash_p", "percentile"), ("ash_b", "percentile"),
                                         ("ash_s", "percentile"), ("scale", "percentile"),
                                         ("vra", "upper_percentile"), ("dice", "sparsity"),
                                         ("adascale", "max_percentile"), ("vra", "lower_percentile"),
                                         ("adascale", "min_percentile"), ("adascale", "k1"), ("adascale", "k2")])
@pytest.mark.parametrize("value", [0, 100, -5, 150])
def test_percentiles_outside_open_interval_are_refused(make_outputs, name, param, value):
    with pytest.raises(ValueError, match=f"{name}: {param} must be a percentile strictly between 0 and 100"):
        oodscope.create(name, **{param: value}).fit(make_outputs())


def test_percentile_order_is_checked(make_outputs):
    with pytest.raises(ValueError, match="lower_percentile .* must be below upper_percentile"):
        oodscope.create("vra", lower_percentile=95, upper_percentile=90).fit(make_outputs())


@pytest.mark.parametrize("name", ["react", "ash_p", "ash_b", "ash_s", "scale", "vra", "dice", "optimal_shaping",
                                  "residual", "fdbd"])
def test_head_shape_mismatch_names_detector(make_outputs, name):
    train = make_outputs()
    train.head = Head(np.zeros((4, 5)), np.zeros(4))
    with pytest.raises(ValueError, match=f"{name}: head W has 5 inputs but features .* have 16 dimensions"):
        oodscope.create(name).fit(train)


def test_percentile_that_is_not_a_number_is_refused(make_outputs):
    for value in ("90", None, True, np.nan):
        with pytest.raises(ValueError, match="react: percentile must be a percentile strictly between 0 and 100"):
            oodscope.create("react", percentile=value).fit(make_outputs())


@pytest.mark.parametrize("name, when", [("odin", "score"), ("adascale", "fit")])
def test_model_needing_detectors_on_cached_outputs_name_detector_and_fix(make_outputs, name, when):
    """Outputs read back from disk carry no model: ODIN fails when it scores (fitting learns nothing), AdaSCALE
    already when it fits (its ID statistic needs the perturbation); both name themselves and oodscope.extract."""
    cached = make_outputs(name="cifar10-test (cache)")
    cached.source = None
    message = (rf"{name} needs model but dataset 'cifar10-test \(cache\)' has none: this detector runs the network "
               r"again; pass the outputs of oodscope.extract\(...\) made in this session")
    detector = oodscope.create(name)
    with pytest.raises(ValueError, match=message):
        detector.fit(cached).score(cached) if when == "score" else detector.fit(cached)
    with pytest.raises(ValueError, match=rf"every setting of {name} failed; first error: .*oodscope.extract"):
        oodscope.tune(name, {"epsilon": [0.001]} if name == "odin" else {"lam": [10.0]}, cached, cached,
                      train=cached)


def test_every_new_detector_has_a_grid_of_its_parameters():
    for name in ["react", "ash_p", "ash_b", "ash_s", "scale", "adascale", "vra", "dice", "optimal_shaping",
                 "residual", "neco", "gradnorm", "fdbd", "she"]:
        cls = oodscope.detectors.get(name)
        assert set(cls.grid) <= set(cls._param_names()), name


def test_new_detectors_rank_shifted_gaussians(make_outputs):
    train, test = make_outputs(n=400), make_outputs(n=200)
    ood = make_outputs(n=200, shift=3.0)
    for name in ["react", "ash_p", "vra", "dice", "optimal_shaping", "residual", "neco", "fdbd", "she"]:
        detector = oodscope.create(name).fit(train)
        assert detector.score(ood).mean() != detector.score(test).mean(), name
        assert np.isfinite(detector.score(ood)).all(), name


DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-bench"


@pytest.mark.slow
def test_cifar_resnet20_shaping_detectors_beat_chance(tmp_path):
    if not DATA.exists():
        pytest.skip("shared CIFAR-10 bench not available")
    from oodscope.data.spec import load_benchmark_dir
    from oodscope.metrics import auroc
    from oodscope.models.zoo import load_model
    from oodscope.runner import extract_benchmark

    bench = load_benchmark_dir(DATA)
    model, pre = load_model("cifar10_resnet20", DATA / "models" / "cifar10_resnet20.pth")
    out = extract_benchmark(bench, model, pre, cache_dir=tmp_path, progress=False)
    for name, floor in {"react": 0.8, "dice": 0.8, "fdbd": 0.8, "she": 0.8, "neco": 0.8, "vra": 0.8}.items():
        detector = oodscope.create(name).fit(out["train"])
        assert auroc(detector.score(out["test"]), detector.score(out["near/cifar100"])) > floor, name


def test_neco_default_dim_is_classes_minus_one_capped(rng):
    features = rng.normal(size=(300, 8))
    few = outputs_from(features, rng.normal(size=(3, 8)))
    many = outputs_from(features, rng.normal(size=(20, 8)))
    assert oodscope.create("neco").fit(few).components_.shape == (8, 2)
    assert oodscope.create("neco").fit(many).components_.shape == (8, 4)
    with pytest.raises(ValueError, match=r"neco: dim must be an integer in \(0, 8\)"):
        oodscope.create("neco", dim=8).fit(few)
