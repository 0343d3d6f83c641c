"""Distance and coverage detectors (Mahalanobis family, RMDS, kNN, GMM, NNGuide, NAC, Gram, RankFeat) and their
chunked Gaussian statistics: hand-computed cases, paper properties, bad input."""

import copy

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from torch import nn

import oodscope
from oodscope import Head, Outputs
from oodscope.data.transforms import ImageNormalize
from oodscope.detectors._gaussian import TiedGaussian, full_covariance, per_class_covariances, tied_covariance

LAYERS = ["stem", "body"]


def SmallNet(seed=0):
    """conv stem -> conv body -> global average pool -> linear head (3 classes), seeded (the contract cases' net)."""
    from detector_cases import SmallNet as Net

    torch.manual_seed(seed)
    return Net()


PRE = ImageNormalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


@pytest.fixture(scope="module")
def net_outputs():
    rng = np.random.default_rng(1)
    model = SmallNet()
    x = rng.integers(0, 256, (90, 8, 8, 3), dtype=np.uint8)
    y = np.repeat(np.arange(3), 30)
    x[y == 1] //= 2  # give the classes some structure
    noise = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    extract = dict(preprocess=PRE, layers=LAYERS, use_cache=False, progress=False, batch_size=32)
    train = oodscope.extract(model, (x, y), name="train", **extract)
    ood = oodscope.extract(model, noise, name="noise", **extract)
    return model, train, ood


# -- Gaussian statistics -----------------------------------------------------------------------------------
def test_chunked_statistics_match_direct_formulas(rng):
    x = rng.normal(size=(50, 4))
    y = np.repeat(np.arange(5), 10)
    means = np.stack([x[y == c].mean(0) for c in range(5)])
    direct = sum((x[y == c] - means[c]).T @ (x[y == c] - means[c]) for c in range(5)) / 50
    assert tied_covariance(x, y, means, chunk=7) == pytest.approx(direct)
    mean, cov = full_covariance(x, chunk=3)
    assert cov == pytest.approx(np.cov(x.T, bias=True)) and mean == pytest.approx(x.mean(0))
    per_class = per_class_covariances(x, y, means)
    assert per_class[2] == pytest.approx(np.cov(x[y == 2].T, bias=True))
    np.testing.assert_allclose(per_class_covariances(x, y, means, chunk=3), per_class, rtol=1e-10, atol=1e-14)


def test_rmds_hand_computed(make_outputs):
    train, test = make_outputs(n=200, dim=5), make_outputs(n=20, dim=5, shift=2.0)
    f, y = train.features, train.labels
    means = np.stack([f[y == c].mean(0) for c in range(4)])
    sigma = sum((f[y == c] - means[c]).T @ (f[y == c] - means[c]) for c in range(4)) / len(f)
    sigma0 = np.cov(f.T, bias=True)
    z = test.features
    md = np.stack([np.einsum("nd,de,ne->n", z - m, np.linalg.inv(sigma), z - m) for m in means], axis=1)
    md0 = np.einsum("nd,de,ne->n", z - f.mean(0), np.linalg.inv(sigma0), z - f.mean(0))
    expected = (md - md0[:, None]).min(axis=1)
    assert oodscope.create("rmds").fit(train).score(test) == pytest.approx(expected, rel=1e-6)


# -- Mahalanobis ensemble ------------------------------------------------------------------------------------
def test_ensemble_of_one_layer_is_plain_mahalanobis_and_layers_add(make_outputs):
    train, test = make_outputs(), make_outputs(shift=1.0)
    plain = oodscope.create("mahalanobis").fit(train).score(test)
    assert oodscope.create("mahalanobis_ensemble").fit(train).score(test) == pytest.approx(plain)
    train.layers = {"a": train.features[:, :8].copy()}
    test.layers = {"a": test.features[:, :8].copy()}
    both = oodscope.create("mahalanobis_ensemble", layers=["penultimate", "a"]).fit(train)
    layer_a = oodscope.create("mahalanobis").fit(Outputs(features=train.layers["a"], labels=train.labels))
    assert both.score(test) == pytest.approx(plain + layer_a.score(test.layers["a"]))


def test_fit_combination_weights_the_informative_layer(make_outputs, rng):
    train, id_val, ood_val = make_outputs(), make_outputs(name="id_val"), make_outputs(name="ood_val")
    for data in (train, id_val):
        data.layers = {"noise": rng.normal(size=(len(data), 3))}
    ood_val.layers = {"noise": rng.normal(size=(len(ood_val), 3))}
    ood_val.features = ood_val.features + 3.0  # only the penultimate layer separates
    detector = oodscope.create("mahalanobis_ensemble", layers=["penultimate", "noise"])
    detector.fit(train, val=id_val, ood_val=ood_val)
    assert detector.weights_[0] > 10 * abs(detector.weights_[1])
    assert detector.validation_auroc_ > 0.95
    with pytest.raises(ValueError, match="pass both"):
        oodscope.create("mahalanobis_ensemble", layers=["penultimate", "noise"]).fit(train, ood_val=ood_val)
    refit = detector.fit(train)  # a plain refit drops the combination: equal weights again
    assert np.array_equal(refit.weights_, np.ones(2)) and not hasattr(refit, "validation_auroc_")


def test_input_preprocessing_moves_towards_the_closest_class(net_outputs):
    _, train, ood = net_outputs
    detector = oodscope.create("mahalanobis_ensemble", layers=LAYERS + ["penultimate"]).fit(train)
    before = detector.layer_scores(ood)
    after = detector.layer_scores(ood, epsilon=0.002)
    assert before.shape == after.shape == (40, 3)
    assert (after < before).mean() > 0.8  # Eq. 4 decreases the distance of the perturbed input
    assert not np.allclose(after, before)
    cached = ood.subset(np.arange(40))  # subsets carry no model
    with pytest.raises(ValueError, match="runs the network again"):
        oodscope.create("mahalanobis_ensemble", epsilon=0.001).fit(train).score(cached)
    # epsilon chosen from a grid on validation data
    detector.set_params(epsilons=[0.0, 0.002]).fit(train, val=train, ood_val=ood)
    assert detector.epsilon_ in (0.0, 0.002) and detector.epsilon == 0.0 and np.isfinite(detector.score(ood)).all()


# -- KNN indexes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_knn_bounds_exact_distance(make_outputs, index):
    train, test = make_outputs(n=2000), make_outputs(n=100, shift=0.5)
    exact = oodscope.create("knn", k=5).fit(train).score(test)
    approx = oodscope.create("knn", k=5, index=index).fit(train).score(test)
    assert (approx >= exact - 1e-5).all()  # distances to the neighbours found; can only be larger
    assert np.mean(np.abs(approx - exact) < 1e-5) > 0.8
    exhaustive = oodscope.create("knn", k=5, index="ivf", nprobe=10_000).fit(train).score(test)
    assert exhaustive == pytest.approx(exact, abs=1e-5)
    with pytest.raises(ValueError, match="index must be one of"):
        oodscope.create("knn", index="lsh").fit(train)
    with pytest.raises(ValueError, match="k=3000 is larger than the training bank"):
        oodscope.create("knn", k=3000, index=index).fit(train)


# -- GMM ---------------------------------------------------------------------------------------------------
def test_gmm_class_conditional_hand_computed_and_em_improves_likelihood(make_outputs):
    train, test = make_outputs(n=200, dim=3), make_outputs(n=10, dim=3, shift=1.0)
    f, y = train.features, train.labels
    density = sum(np.mean(y == c) * multivariate_normal(f[y == c].mean(0), np.cov(f[y == c].T, bias=True)
                                                          + 1e-6 * np.eye(3)).pdf(test.features) for c in range(4))
    fixed = oodscope.create("gmm", max_iter=0).fit(train)
    assert fixed.score(test) == pytest.approx(-np.log(density), rel=1e-6)
    em = oodscope.create("gmm").fit(train)
    assert em.score(train).mean() <= fixed.score(train).mean() + 1e-9  # EM raises the training likelihood
    unsupervised = oodscope.create("gmm", n_components=2).fit(train.features)
    assert unsupervised.score(test).shape == (10,)
    with pytest.raises(ValueError, match="n_components=500 is larger"):
        oodscope.create("gmm", n_components=500).fit(train)


def test_gmm_em_matches_sklearn_from_the_class_conditional_start(make_outputs):
    from sklearn.mixture import GaussianMixture

    train, test = make_outputs(n=300, dim=4), make_outputs(n=50, dim=4, shift=1.0)
    fixed = oodscope.create("gmm", max_iter=0).fit(train)
    det = oodscope.create("gmm", reg_covar=1e-4).fit(train)
    reference = GaussianMixture(4, covariance_type="full", reg_covar=1e-4, max_iter=100, random_state=0,
                                weights_init=fixed.weights_, means_init=fixed.means_,
                                precisions_init=np.linalg.inv(fixed.covariances_ - 1e-6 * np.eye(4) + 1e-4 * np.eye(4)))
    reference.fit(train.features)
    assert det.n_iter_ == reference.n_iter_ >= 1
    assert det.score(test) == pytest.approx(-reference.score_samples(test.features), rel=1e-9)


def test_gmm_fewer_samples_than_dimensions_is_regularised(rng):
    x = rng.normal(size=(12, 20))
    y = np.repeat(np.arange(3), 4)  # 4 samples per class in 20 dimensions: singular class covariances
    scores = oodscope.create("gmm", max_iter=0, reg_covar=1e-3).fit(Outputs(features=x, labels=y)).score(x + 1)
    assert np.isfinite(scores).all()


# -- NNGuide -----------------------------------------------------------------------------------------------
def test_nnguide_hand_computed(make_outputs):
    train, test = make_outputs(n=60, dim=4), make_outputs(n=7, dim=4, shift=0.5)
    confidence = logsumexp(train.logits, axis=1)
    bank = train.features / np.linalg.norm(train.features, axis=1, keepdims=True) * confidence[:, None]
    query = test.features / np.linalg.norm(test.features, axis=1, keepdims=True)
    guidance = np.sort(query @ bank.T, axis=1)[:, -3:].mean(axis=1)
    expected = -logsumexp(test.logits, axis=1) * guidance
    assert oodscope.create("nnguide", k=3).fit(train).score(test) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="k=31 is larger than the bank \\(30 samples\\)"):
        oodscope.create("nnguide", k=31, bank_fraction=0.5).fit(train)


# -- NAC ---------------------------------------------------------------------------------------------------
def test_nac_intervals_and_penultimate_state_match_analytic_gradient(net_outputs):
    from oodscope.detectors.nac import interval_edges

    edges = interval_edges(50)
    assert len(edges) == 50 and edges[0] == 0.0 and (np.diff(edges) > 0).all() and edges[-1] == 1.2
    inner = edges[:-1]  # mirrored around 0.5 (the last inner edge is nudged up by 0.01 to include 1.0)
    assert inner[:24] + inner[24:][::-1][:24] == pytest.approx(np.r_[1.01, np.ones(23)])
    assert np.diff(inner[:24])[0] > np.diff(inner[:24])[-1]  # log spacing: widest interval at 0
    model, train, _ = net_outputs
    nac = oodscope.create("nac", alpha=100.0)
    (state,) = nac.states(train)
    W, b = train.head.W, train.head.b
    p = np.exp(train.logits - logsumexp(train.logits, axis=1, keepdims=True))
    grad = (p - 1.0 / 3) @ W  # d/dz of -(1/C) sum_j log p_j = W^T (p - 1/C)
    expected = 1.0 / (1.0 + np.exp(-100.0 * train.features * grad))
    assert state == pytest.approx(expected, abs=1e-4)


def test_nac_full_coverage_of_the_training_set(net_outputs):
    _, train, ood = net_outputs
    nac = oodscope.create("nac", layers=LAYERS + ["penultimate"], o_star=1, m_bins=[50, 50, 20]).fit(train)
    assert nac.score(train) == pytest.approx(-np.ones(len(train)))  # every state's interval was visited
    scores = nac.score(ood)
    assert ((scores >= -1.0) & (scores <= 0.0)).all()
    with pytest.raises(ValueError, match="no layers \\['nope'\\]"):
        oodscope.create("nac", layers=["nope"]).fit(train)
    with pytest.raises(ValueError, match="m_bins has 1 entries but there are 2 layers"):
        oodscope.create("nac", layers=LAYERS, m_bins=[50]).fit(train)


# -- Gram --------------------------------------------------------------------------------------------------
def test_gram_row_sums_and_deviation_hand_computed(rng):
    from oodscope.detectors.gram import gram_row_sums

    maps = rng.normal(size=(2, 3, 4, 4))
    for p in (1, 3):
        f = maps.reshape(2, 3, 16) ** p
        sums = np.einsum("bcs,bds->bcd", f, f).sum(axis=2)
        expected = np.sign(sums) * np.abs(sums) ** (1 / p)
        np.testing.assert_allclose(gram_row_sums(maps, [1, 2, 3]).numpy()[:, p - 1], expected, rtol=1e-12)
    # every pole, chunk boundaries included (70 samples, chunks of 64 and 8), float32 maps as the cache holds them
    maps32 = rng.normal(size=(70, 5, 3, 3)).astype(np.float32)
    f64 = maps32.astype(np.float64).reshape(70, 5, 9)
    for chunk in (64, 8):
        got = gram_row_sums(maps32, list(range(1, 11)), chunk=chunk).numpy()
        for p in range(1, 11):
            sums = np.einsum("bcs,bds->bcd", f64 ** p, f64 ** p).sum(axis=2)
            np.testing.assert_allclose(got[:, p - 1], np.sign(sums) * np.abs(sums) ** (1 / p), rtol=1e-9)
    # channels-last maps (the layout extract keeps), poles with gaps, the default chunking: the same values
    channels_last = np.ascontiguousarray(maps32.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert not channels_last.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(gram_row_sums(channels_last, [1, 3, 4]).numpy(),
                                  gram_row_sums(maps32, [1, 3, 4], chunk=8).numpy())
    sums = np.einsum("bcs,bds->bcd", f64 ** 3, f64 ** 3).sum(axis=2)
    np.testing.assert_allclose(gram_row_sums(channels_last, [1, 3, 4]).numpy()[:, 1], np.cbrt(sums), rtol=1e-9)
    # one channel, pole 1, 1x1 maps: the Gram value is a^2
    values = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 2.0, 3.0, 4.0, 5.0, 9.0])
    logits = np.zeros((10, 2))
    logits[5:, 1] = 1.0  # predicted classes: five of 0, five of 1
    train = Outputs(logits=logits, layers={"m": values.reshape(10, 1, 1, 1)}, name="train")
    gram = oodscope.create("gram", layers=["m"], poles=[1], validation_fraction=0.2, seed=0).fit(train)
    test = Outputs(logits=np.array([[1.0, 0.0], [0.0, 1.0]]), layers={"m": np.array([6.0, 1.0]).reshape(2, 1, 1, 1)})
    low, high = gram.mins_[0][:, 0, 0], gram.maxs_[0][:, 0, 0]
    assert set(high) <= set(values**2) and set(low) <= set(values**2)
    expected = np.array([max(36 - high[0], 0) / high[0], max(low[1] - 1, 0) / low[1]]) / gram.expected_deviation_[0]
    assert gram.score(test) == pytest.approx(expected, rel=1e-5)
    assert expected.min() > 0


def test_gram_on_a_model_and_bad_layers(net_outputs):
    _, train, ood = net_outputs
    untrained = copy.copy(train)
    untrained.logits = np.eye(3)[train.labels]  # the random net predicts one class; bounds need all three
    with pytest.raises(ValueError, match="predicted as classes \\[0, 1\\]"):
        oodscope.create("gram", layers=LAYERS).fit(train)
    train = untrained
    gram = oodscope.create("gram", layers=LAYERS, poles=[1, 2, 3]).fit(train)
    assert gram.score(ood).mean() > np.median(gram.score(train))
    with pytest.raises(ValueError, match="no layers \\['head'\\]"):
        oodscope.create("gram", layers=["head"]).fit(train)
    with pytest.raises(ValueError, match="pass layers"):
        oodscope.create("gram").fit(train)
    with pytest.raises(ValueError, match="feature maps of layers"):
        gram.score(ood.subset(np.arange(5)))


# -- RankFeat ----------------------------------------------------------------------------------------------
def test_rankfeat_removes_rank_one_and_scores_energy(net_outputs, rng):
    from oodscope.detectors.rankfeat import remove_rank1

    maps = torch.as_tensor(rng.normal(size=(4, 5, 3, 3)))
    removed = remove_rank1(maps)
    s_before = torch.linalg.svdvals(maps.flatten(2))
    s_after = torch.linalg.svdvals(removed.flatten(2))
    assert torch.allclose(s_after[:, :-1], s_before[:, 1:], atol=1e-8)  # the top singular value is gone
    assert torch.allclose(remove_rank1(maps, iterations=200), removed, atol=1e-6)
    model, train, ood = net_outputs
    x = PRE(torch.as_tensor(ood.source.inputs))
    with torch.no_grad():
        body = remove_rank1(model.body(model.stem(x)))
        logits = model.fc(body.mean(dim=(2, 3))).double()
    expected = -torch.logsumexp(logits, dim=1).numpy()
    rankfeat = oodscope.create("rankfeat", layer="body").fit(train)
    assert rankfeat.score(ood) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="no layer 'layer4'"):
        oodscope.create("rankfeat", layer="layer4").fit(train)
    with pytest.raises(ValueError, match="pass layer="):
        oodscope.create("rankfeat").fit(train)
    with pytest.raises(ValueError, match="not a feature map"):
        oodscope.create("rankfeat", layer="fc").fit(train).score(ood)


# -- bad input shared by the class-conditional detectors ---------------------------------------------------
CLASS_CONDITIONAL = ["mahalanobis", "rmds", "mahalanobis_ensemble", "gmm", "wdiscood", "conjnorm", "igeood",
                     "igeood_features", "heat"]


@pytest.mark.parametrize("name", CLASS_CONDITIONAL)
def test_class_without_samples_is_named(make_outputs, name):
    train = make_outputs()
    keep = train.labels != 2
    params = {"n_iter": 1} if name == "heat" else {}
    with pytest.raises(ValueError, match=f"{name}.*: classes \\[2\\] have no training samples"):
        oodscope.create(name, **params).fit(train.subset(np.flatnonzero(keep)))


@pytest.mark.parametrize("name", ["conjnorm", "igeood_features", "heat"])
def test_fewer_samples_than_dimensions_gives_finite_scores(rng, name):
    # the Gaussian family is checked below; these use per-dimension or importance-sampled statistics
    x, W = rng.normal(size=(10, 30)), rng.normal(size=(2, 30))
    y = np.repeat(np.arange(2), 5)
    train = Outputs(features=x, labels=y, logits=x @ W.T, head=Head(W, np.zeros(2)))
    z = rng.normal(size=(5, 30)) * 3
    test = Outputs(features=z, logits=z @ W.T, head=Head(W, np.zeros(2)))
    params = {"n_iter": 2} if name == "heat" else {}
    assert np.isfinite(oodscope.create(name, **params).fit(train).score(test)).all()


@pytest.mark.parametrize("name", ["mahalanobis", "rmds", "mahalanobis_ensemble"])
def test_fewer_samples_than_dimensions_uses_the_pseudo_inverse(rng, name):
    x = rng.normal(size=(10, 30))
    y = np.repeat(np.arange(2), 5)
    scores = oodscope.create(name).fit(Outputs(features=x, labels=y)).score(rng.normal(size=(5, 30)) * 3)
    assert np.isfinite(scores).all()
    if name != "rmds":  # a class mean is at distance zero (RMDS subtracts the background distance there)
        at_mean = oodscope.create(name).fit(Outputs(features=x, labels=y)).score(x[y == 0].mean(0, keepdims=True))
        assert at_mean[0] == pytest.approx(0.0, abs=1e-8)


def test_missing_layers_are_named(make_outputs):
    train = make_outputs()
    with pytest.raises(ValueError, match="needs layer 'layer9'.*extract it with"):
        oodscope.create("mahalanobis_ensemble", layers=["layer9"]).fit(train)
    with pytest.raises(ValueError, match="non-empty list"):
        oodscope.create("mahalanobis_ensemble", layers="layer9").fit(train)
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        oodscope.create("mahalanobis_ensemble", epsilon=-1.0).fit(train)


# -- memory-bounded (chunked) statistics and search ----------------------------------------------------------
def tiny_chunks(monkeypatch):
    """Make every chunked loop of the Gaussian / kNN helpers run on 3-row chunks."""
    from oodscope.detectors import _gaussian

    monkeypatch.setattr(_gaussian, "ELEMENTS", 1)
    monkeypatch.setattr(_gaussian, "MIN_ROWS", 3)
    assert _gaussian.rows_per_chunk(2048) == 3


@pytest.mark.parametrize("name, params", [("mahalanobis", {}), ("rmds", {}), ("mahalanobis_ensemble", {}),
                                          ("wdiscood", {}), ("conjnorm", {}), ("igeood_features", {}),
                                          ("gmm", {"max_iter": 0}), ("gmm", {})])
def test_chunked_gaussian_fit_and_score_equal_unchunked(make_outputs, monkeypatch, name, params):
    train, test = make_outputs(n=203, dim=7), make_outputs(n=31, dim=7, shift=1.0)
    train.features = train.features + 50.0    # a large common offset: centring errors would show
    test.features = test.features + 50.0
    whole = oodscope.create(name, **params).fit(train).score(test)
    tiny_chunks(monkeypatch)
    chunked = oodscope.create(name, **params).fit(train).score(test)
    np.testing.assert_allclose(chunked, whole, rtol=1e-10, atol=1e-10)


def test_chunked_mahalanobis_matches_the_unchunked_formula_and_a_memmap(make_outputs, monkeypatch, tmp_path):
    train, test = make_outputs(n=203, dim=7), make_outputs(n=31, dim=7, shift=1.0)
    f, y, z = train.features, train.labels, test.features
    means = np.stack([f[y == c].mean(0) for c in range(4)])
    precision = np.linalg.inv((f - means[y]).T @ (f - means[y]) / len(f))
    expected = np.stack([np.einsum("nd,de,ne->n", z - m, precision, z - m) for m in means], axis=1).min(axis=1)
    tiny_chunks(monkeypatch)
    bank = np.lib.format.open_memmap(tmp_path / "bank.npy", mode="w+", dtype=np.float32, shape=f.shape)
    bank[:] = f
    on_disk = Outputs(features=np.load(tmp_path / "bank.npy", mmap_mode="r"), labels=y)
    detector = oodscope.create("mahalanobis").fit(Outputs(features=f, labels=y))
    np.testing.assert_allclose(detector.score(z), expected, rtol=1e-10)
    mapped = oodscope.create("mahalanobis").fit(on_disk).score(z)        # float32 bank, float64 statistics
    np.testing.assert_allclose(mapped, oodscope.create("mahalanobis").fit(f.astype(np.float32), y).score(z),
                               rtol=1e-10)
    # RMDS's background covariance from the class statistics equals the direct covariance of all rows
    gaussian = oodscope.create("rmds").fit(train).class_gaussian_
    mean0, sigma0 = gaussian.background()
    np.testing.assert_allclose(sigma0, np.cov(f.T, bias=True), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mean0, f.mean(0), rtol=1e-12)


@pytest.mark.parametrize("index", ["exact", "ivf", "hnsw"])
def test_chunked_knn_equals_unchunked(make_outputs, monkeypatch, index):
    train, test = make_outputs(n=400), make_outputs(n=37, shift=0.5)
    whole = oodscope.create("knn", k=5, index=index, nlist=4).fit(train)
    tiny_chunks(monkeypatch)
    chunked = oodscope.create("knn", k=5, index=index, nlist=4).fit(train)
    if index == "hnsw":   # the graph depends on the insertion batches: only the approximation bound holds
        exact = oodscope.create("knn", k=5).fit(train).score(test)
        assert (chunked.score(test) >= exact - 1e-5).all() and np.mean(chunked.score(test) - exact < 1e-5) > 0.8
        return
    # same index contents (rows added 3 at a time) searched 3 queries at a time: the same distances
    np.testing.assert_allclose(chunked.score(test), whole.score(test), rtol=1e-10, atol=1e-10)
    if index == "exact":   # and the true k-th neighbour distance of the normalised features
        a = train.features / np.linalg.norm(train.features, axis=1, keepdims=True)
        b = test.features / np.linalg.norm(test.features, axis=1, keepdims=True)
        brute = np.sort(np.linalg.norm(b[:, None] - a[None], axis=2), axis=1)[:, 4]
        np.testing.assert_allclose(chunked.score(test), brute, atol=1e-5)


def test_knn_ivf_with_too_few_neighbours_in_the_probed_cells_raises(make_outputs):
    train = make_outputs(n=60)
    detector = oodscope.create("knn", k=50, index="ivf", nlist=30, nprobe=1).fit(train)
    with pytest.raises(ValueError, match="fewer than k=50 neighbours.*increase nprobe"):
        detector.score(make_outputs(n=5))
    with pytest.raises(ValueError, match="nlist"):
        oodscope.create("knn", index="ivf", nlist=0).fit(train)


def test_check_finite_in_chunks_counts_bad_rows():
    from oodscope.extraction.outputs import check_finite

    values = np.zeros((5000, 4000), dtype=np.float32)    # 20M values: more than one 16M-value chunk
    values[[3, 4999], 7] = np.nan
    values[4500, 0] = np.inf
    with pytest.raises(ValueError, match="3 of 5000 rows contain NaN or inf"):
        check_finite(values, "features")
    check_finite(values[:3], "features")
    maps = np.zeros((6, 2, 3, 3), dtype=np.float32).transpose(0, 2, 3, 1)  # a strided (channels-last) view
    maps[[1, 4], 2, 0, 1] = np.nan
    with pytest.raises(ValueError, match="2 of 6 rows contain NaN or inf"):
        check_finite(maps, "layer")
