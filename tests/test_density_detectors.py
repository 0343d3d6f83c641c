"""Density detectors (WDiscOOD, ConjNorm, IGEOOD, Neural Relation Graph, HEAT): hand-computed small cases and the properties each paper states."""

import math

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import oodscope
from oodscope import Head, Outputs
from oodscope.detectors.conjnorm import bregman_gradient, conjugate_exponent, p_normalize
from oodscope.detectors.igeood import fisher_rao_categorical, fisher_rao_gaussian
from oodscope.detectors.relation_graph import label_error_scores, relation_strength

DENSITY = ["wdiscood", "conjnorm", "igeood", "igeood_features", "relation_graph"]


def square_classes(scale_y=1.0):
    """Two classes with means (-2, 0), (2, 0) and deviations (+-1, +-scale_y): S_w = diag(1, scale_y^2)."""
    dev = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=float) * [1.0, scale_y]
    x = np.vstack([dev + [-2, 0], dev + [2, 0]])
    return x, np.repeat([0, 1], 4)


def test_density_detectors_registered_and_default_runnable():
    assert set(DENSITY) <= set(oodscope.available())
    from oodscope.runner import default_detectors
    assert set(DENSITY) <= set(default_detectors())


# -- WDiscOOD -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_y", [1.0, 2.0])
def test_wdiscood_hand_computed(scale_y):
    x, y = square_classes(scale_y)
    det = oodscope.create("wdiscood").fit(x, y)           # beta = 5, one discriminant (C - 1)
    queries = np.array([[2.0, 3.0], [0.0, 0.0], [-2.0, 0.0]])
    # whitened: z = (x1, x2 / scale_y); discriminant = first axis, residual = second axis, centre = 0
    expected = [0.0 + 5 * 3.0 / scale_y, 2.0 + 0.0, 0.0]
    assert det.score(queries) == pytest.approx(expected, abs=1e-9)
    assert det.discriminants_.shape[1] == 1


def test_wdiscood_whitens_within_scatter_and_subspaces_are_orthogonal(make_outputs):
    rng = np.random.default_rng(1)
    train = make_outputs(n=600, dim=16, n_classes=4)
    train.features = train.features @ rng.normal(size=(16, 16))        # correlated within-class scatter
    det = oodscope.create("wdiscood").fit(train)
    centred = train.features - det_means(train)
    within = centred.T @ centred / len(centred)
    assert det.whitener_.T @ within @ det.whitener_ == pytest.approx(np.eye(16), abs=1e-8)
    g = det.discriminants_
    assert g.shape == (16, 3)
    assert g.T @ g == pytest.approx(np.eye(3), abs=1e-8)                # discriminants orthonormal (S_w^z = I)
    disc, residual = det.decompose(train.features[:50])
    assert np.abs(residual @ g).max() < 1e-8                           # residual space is orthogonal to them
    # the discriminative space carries all the between-class scatter: class means differ only there
    _, res_means = det.decompose(det_means_per_class(train))
    assert np.abs(res_means - res_means[0]).max() < 1e-8
    assert np.all(det.fisher_ratios_[:-1] >= det.fisher_ratios_[1:])


def det_means_per_class(train):
    return np.stack([train.features[train.labels == c].mean(axis=0) for c in range(4)])


def det_means(train):
    return det_means_per_class(train)[train.labels]


def test_wdiscood_singular_within_scatter_and_bad_parameters(rng):
    # 6 samples in 20 dimensions: S_w is singular; the pseudo-inverse whitening keeps its range
    x = rng.normal(size=(6, 20))
    y = np.array([0, 0, 1, 1, 2, 2])
    det = oodscope.create("wdiscood").fit(x, y)
    assert det.whitener_.shape[1] == 3                                  # rank N - C
    assert np.isfinite(det.score(rng.normal(size=(5, 20)))).all()
    with pytest.raises(ValueError, match="exceeds the rank 3"):
        oodscope.create("wdiscood", n_discriminants=5).fit(x, y)
    with pytest.raises(ValueError, match="residual_weight"):
        oodscope.create("wdiscood", residual_weight=-1).fit(x, y)


# -- ConjNorm -------------------------------------------------------------------------------------------------
def test_conjnorm_p2_is_an_isotropic_gaussian_mixture(make_outputs):
    train, test = make_outputs(n=300, dim=8, n_classes=3), make_outputs(n=40, dim=8, n_classes=3, shift=0.5)
    t = 0.2
    det = oodscope.create("conjnorm", p=2.0, temperature=t).fit(train)
    xt, xq = p_normalize(train.features, 2), p_normalize(test.features, 2)
    mus = [p_normalize(train.features[train.labels == c].mean(axis=0, keepdims=True), 2)[0] for c in range(3)]
    logpdf = lambda x, m: multivariate_normal(m, t * np.eye(8)).logpdf(x)
    log_z = [logsumexp(logpdf(xt, m)) - np.log(len(xt)) for m in mus]
    expected = -logsumexp(np.stack([logpdf(xq, m) - lz for m, lz in zip(mus, log_z)], axis=1), axis=1)
    assert det.score(test) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_conjnorm_matches_full_bregman_divergence(make_outputs):
    """The per-class constants dropped in the implementation cancel against the importance-sampled Z_k."""
    train, test = make_outputs(n=200, dim=6, n_classes=3), make_outputs(n=30, dim=6, n_classes=3, shift=1.0)
    p, t = 2.5, 0.1
    q = conjugate_exponent(p)
    det = oodscope.create("conjnorm", p=p, temperature=t).fit(train)
    psi = lambda v: 0.5 * np.linalg.norm(v, ord=q, axis=-1) ** 2
    mus = p_normalize(np.stack([train.features[train.labels == c].mean(0) for c in range(3)]), p)
    grads = bregman_gradient(mus, q)
    def log_kernel(x):                              # -D_psi(x, mu_k) / T with every term kept
        x = p_normalize(x, p)
        d = psi(x)[:, None] - psi(mus)[None] - ((x[:, None, :] - mus[None]) * grads[None]).sum(-1)
        return -d / t
    log_z = logsumexp(log_kernel(train.features), axis=0) - np.log(len(train))
    expected = -logsumexp(log_kernel(test.features) - log_z, axis=1)
    assert det.score(test) == pytest.approx(expected, rel=1e-9)
    # Euler's identity for the 2-homogeneous psi: <mu, grad psi(mu)> = ||mu||_q^2
    assert (mus * grads).sum(1) == pytest.approx(np.linalg.norm(mus, ord=q, axis=1) ** 2, rel=1e-6)


def test_conjnorm_importance_subsample_and_errors(make_outputs):
    train = make_outputs(n=400, dim=8, n_classes=4)
    full = oodscope.create("conjnorm").fit(train).log_partition_
    sub = oodscope.create("conjnorm", n_samples=200).fit(train).log_partition_
    assert np.abs(full - sub).max() < 1.0                      # an estimate of the same partition function
    with pytest.raises(ValueError, match="p must be > 1"):
        oodscope.create("conjnorm", p=1.0).fit(train)
    with pytest.raises(ValueError, match="temperature"):
        oodscope.create("conjnorm", temperature=0).fit(train)


# -- Igeood ---------------------------------------------------------------------------------------------------
def test_fisher_rao_closed_forms():
    assert fisher_rao_categorical(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0], [1.0, 0.0]]))[0] == \
        pytest.approx([math.pi, 0.0])
    m1, m2, s = 0.3, 2.1, 0.7
    assert fisher_rao_gaussian(m1, s, m2, s) == pytest.approx(2 * math.sqrt(2) * math.asinh(1.8 / (2 * math.sqrt(2) * s)))
    assert fisher_rao_gaussian(1.0, 1.0, 1.0, 3.0) == pytest.approx(math.sqrt(2) * math.log(3.0))
    # symmetric and zero on the diagonal
    assert fisher_rao_gaussian(0.0, 1.0, 1.0, 2.0) == pytest.approx(fisher_rao_gaussian(1.0, 2.0, 0.0, 1.0))
    assert fisher_rao_gaussian(0.5, 1.5, 0.5, 1.5) == pytest.approx(0.0)


def test_igeood_logits_two_class_toy():
    train_logits = np.log(np.array([[0.9, 0.1]] * 3 + [[0.1, 0.9]] * 3))
    train = Outputs(logits=train_logits, labels=np.array([0, 0, 0, 1, 1, 1]))
    det = oodscope.create("igeood").fit(train)
    query = Outputs(logits=np.log(np.array([[0.5, 0.5], [0.9, 0.1]])))
    d_mid = 2 * math.acos(math.sqrt(0.45) + math.sqrt(0.05))
    d_far = 2 * math.acos(2 * math.sqrt(0.09))
    assert det.score(query) == pytest.approx([-2 * d_mid, -(0.0 + d_far)], abs=1e-7)
    # temperature softens both the sample and the centroids: T -> inf makes every distance 0
    assert oodscope.create("igeood", temperature=1e9).fit(train).score(query) == pytest.approx([0, 0], abs=1e-4)


def test_igeood_features_two_class_toy():
    x, y = square_classes(scale_y=2.0)                     # pooled diagonal variances (1, 4)
    det = oodscope.create("igeood_features").fit(x, y)
    assert det.stds_ == pytest.approx([1.0, 2.0])
    query = np.array([[1.0, 2.0]])
    d = lambda dm, s: 2 * math.sqrt(2) * math.asinh(abs(dm) / (2 * math.sqrt(2) * s))
    to_class1 = math.hypot(d(1.0 - 2.0, 1.0), d(2.0, 2.0))
    assert det.score(query) == pytest.approx([to_class1])
    assert fisher_rao_gaussian(1.0, 1.0, 2.0, 1.0) == pytest.approx(d(1.0, 1.0))


def test_igeood_features_zero_variance_and_missing_class(rng):
    x = np.c_[rng.normal(size=(20, 3)), np.zeros(20)]      # a dead feature: variance floored, scores finite
    y = np.repeat([0, 1], 10)
    det = oodscope.create("igeood_features").fit(x, y)
    assert np.isfinite(det.score(np.c_[rng.normal(size=(4, 3)), np.ones(4)])).all()
    logits = rng.normal(size=(20, 3))                       # the classifier has 3 classes; class 1 is absent
    with pytest.raises(ValueError, match=r"classes \[1\] have no training samples"):
        oodscope.create("igeood").fit(Outputs(logits=logits, labels=np.r_[np.zeros(10, int), 2 * np.ones(10, int)]))
    for name in ("wdiscood", "conjnorm", "igeood_features"):
        with pytest.raises(ValueError, match=r"\[1\]"):
            oodscope.create(name).fit(Outputs(features=x, logits=logits,
                                              labels=np.r_[np.zeros(10, int), 2 * np.ones(10, int)]))


# -- Neural Relation Graph ------------------------------------------------------------------------------------
def test_relation_graph_hand_computed():
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    bank_logits = np.log(np.array([[0.8, 0.2], [0.5, 0.5], [0.2, 0.8]]))
    train = Outputs(features=bank, logits=bank_logits)
    q = np.array([[3.0, 4.0]])                              # normalised (0.6, 0.8)
    q_logits = np.log(np.array([[0.6, 0.4]]))
    det = oodscope.create("relation_graph").fit(train)
    k = [0.6 * (0.6 * 0.8 + 0.4 * 0.2), 0.8 * 0.5, 0.0]     # max(cos, 0) * <p, p_j>
    assert det.score(Outputs(features=q, logits=q_logits)) == pytest.approx([-sum(k)], rel=1e-6)
    cos = oodscope.create("relation_graph", kernel="cos", power=2).fit(train)
    assert cos.score(Outputs(features=q, logits=q_logits)) == pytest.approx([-(0.36 + 0.64)], rel=1e-6)
    strong = relation_strength(np.array([[0.6, 0.8]]), None, bank, None, threshold=0.7)
    assert strong == pytest.approx([0.8])                   # the edge 0.6 <= threshold is cut


def test_relation_graph_label_errors_find_the_flipped_label(rng):
    centres = np.eye(3, 8) * 5
    y = np.repeat([0, 1, 2], 20)
    feats = centres[y] + rng.normal(size=(60, 8)) * 0.5
    logits = feats @ np.eye(3, 8).T
    noisy = y.copy()
    noisy[[4, 30]] = [1, 2]                                 # two mislabelled samples
    data = Outputs(features=feats, logits=logits, labels=noisy)
    scores = label_error_scores(data)
    assert set(np.argsort(scores)[-2:]) == {4, 30}
    det = oodscope.create("relation_graph").fit(data)
    assert det.label_error_scores(data) == pytest.approx(scores)
    with pytest.raises(ValueError, match="needs labels"):
        label_error_scores(Outputs(features=feats, logits=logits))


def test_density_detectors_separate_shifted_data(make_outputs):
    train, test = make_outputs(n=400), make_outputs(n=200, name="id")
    ood = make_outputs(n=200, shift=3.0, name="ood")
    from oodscope.metrics.ood import auroc
    for name in set(DENSITY) - {"igeood"}:          # the shift moves every logit equally: softmax cannot see it
        det = oodscope.create(name).fit(train)
        assert auroc(det.score(test), det.score(ood)) > 0.8, name


# -- HEAT -----------------------------------------------------------------------------------------------------
def _heat_data(make_outputs):
    train = make_outputs(n=300, dim=8, n_classes=3)
    train.features = np.abs(train.features)                 # post-ReLU-like features
    return train


def test_heat_trains_and_composes_standardised_energies(make_outputs):
    torch = pytest.importorskip("torch")
    from oodscope.detectors.heat import PRIORS
    from oodscope.runner import default_detectors
    assert oodscope.detectors.get("heat").trains_network and "heat" not in default_detectors()
    train = _heat_data(make_outputs)
    det = oodscope.create("heat", n_iter=5, hidden_dim=16, n_hidden_layers=1, batch_size=64, sgld_steps=3)
    det.fit(train)
    assert set(det.losses_) == {"gmm", "el"} and all(len(v) == 5 for v in det.losses_.values())
    parts = det.component_scores(train)
    expected = sum((parts[k] - det.offsets_[k]) / det.scales_[k] for k in parts)
    assert det.score(train) == pytest.approx(expected)
    # the hybrid energy is the MLP residual plus the prior energy over its temperature
    z = train.features[:20] / np.linalg.norm(train.features[:20], axis=1, keepdims=True)
    gmm = det.energies_["gmm"]
    with torch.no_grad():
        zt = torch.from_numpy(z.astype(np.float32))
        residual, prior = gmm.mlp(zt).view(-1).numpy(), gmm.prior_energy(zt).numpy()
    assert parts["gmm"][:20] == pytest.approx(residual + prior / PRIORS["gmm"]["temperature"], rel=1e-5)
    # the GMM prior energy is -log of the tied-covariance mixture density, up to one additive constant
    x = train.features / np.linalg.norm(train.features, axis=1, keepdims=True)
    means = np.stack([x[train.labels == c].mean(0) for c in range(3)])
    centred = x - means[train.labels]
    cov = centred.T @ centred / len(x)
    weights = np.bincount(train.labels) / len(x)
    log_p = logsumexp([np.log(w) + multivariate_normal(m, cov, allow_singular=True).logpdf(z)
                       for w, m in zip(weights, means)], axis=0)
    assert np.ptp(prior + log_p) < 1e-3 * np.ptp(log_p)
    # seeded: the same fit gives the same scores
    again = oodscope.create("heat", n_iter=5, hidden_dim=16, n_hidden_layers=1, batch_size=64, sgld_steps=3)
    assert again.fit(train).score(train) == pytest.approx(det.score(train))


def test_heat_separates_shifted_data_and_checks_parameters(make_outputs):
    pytest.importorskip("torch")
    from oodscope.metrics.ood import auroc
    train = _heat_data(make_outputs)
    test, ood = make_outputs(n=100, dim=8, n_classes=3), make_outputs(n=100, dim=8, n_classes=3)
    test.features = np.abs(test.features)
    ood.features = np.abs(ood.features[:, ::-1]) + 2.0       # mass on dimensions no class uses
    det = oodscope.create("heat", priors="gmm", n_iter=5, hidden_dim=16, batch_size=64, sgld_steps=3).fit(train)
    assert auroc(det.score(test), det.score(ood)) > 0.8
    with pytest.raises(ValueError, match="priors must be"):
        oodscope.create("heat", priors=("gmm", "flow")).fit(train)
    with pytest.raises(ValueError, match="n_iter"):
        oodscope.create("heat", n_iter=0).fit(train)
    with pytest.raises(ValueError, match="needs head"):
        oodscope.create("heat", n_iter=1).fit(Outputs(features=train.features, labels=train.labels))
