"""Generative OOD detectors: the discretised logistic likelihood by hand, PixelCNN causality, the four scores,
the likelihood failure on simple images and its corrections (tiny models, few steps), bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import expit

import oodscope
from oodscope.generative.input_complexity import png_bits_per_dim
from oodscope.generative.pixelcnn import PixelCNN, discretised_logistic_log_prob, nll_bits_per_dim

TINY = dict(hidden=16, blocks=2, epochs=10, batch_size=16, lr=3e-3)


def test_discretised_logistic_is_a_distribution_over_the_256_values():
    values = torch.arange(256, dtype=torch.float64) * (2 / 255) - 1
    for mean, log_scale in ((0.0, 0.0), (0.3, -3.0), (-0.9, -5.0), (0.99, -1.0)):
        logp = discretised_logistic_log_prob(values, torch.tensor(mean, dtype=torch.float64),
                                             torch.tensor(log_scale, dtype=torch.float64))
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-6)


def test_bits_per_dim_of_a_constant_model_by_hand():
    model = PixelCNN(3, hidden=8, blocks=1)
    with torch.no_grad():
        model.out[-1].weight.zero_()
        model.out[-1].bias.zero_()  # every pixel: mean 0, log-scale 0 (scale 1)
    image = np.random.default_rng(0).integers(0, 256, (1, 3, 4, 4), dtype=np.uint8)
    x = image.astype(np.float64) * 2 / 255 - 1
    upper = np.where(x > 0.999, 1.0, expit(x + 1 / 255))
    lower = np.where(x < -0.999, 0.0, expit(x - 1 / 255))
    expected = -np.log2(upper - lower).sum() / x.size
    got = float(nll_bits_per_dim(model, torch.from_numpy(image))[0].detach())
    assert got == pytest.approx(expected, rel=1e-5)


def test_pixelcnn_sees_only_previous_pixels():
    torch.manual_seed(0)
    model = PixelCNN(3, hidden=8, blocks=2)
    x = torch.rand(1, 3, 6, 6, requires_grad=True)
    out = model(x)
    for row, col in ((0, 0), (2, 3), (5, 5)):
        (grad,) = torch.autograd.grad(out[0, :, row, col].sum(), x, retain_graph=True)
        seen = grad[0].abs().sum(0)
        flat = seen.flatten()
        position = row * 6 + col
        assert float(flat[position:].sum()) == 0.0  # the pixel itself and everything after it: no influence
        if position > 0:
            assert float(flat[:position].sum()) > 0.0


def _smooth_and_simple(seed=0):
    """ID: 16x16 images with a flat upper half and a textured lower half; OOD: flat everywhere (simpler than any
    ID image, as MNIST's black background is simpler than CIFAR-10)."""
    rng = np.random.default_rng(seed)

    def flat(n):
        base = rng.integers(40, 200, (n, 1, 1, 3)).astype(float)
        return np.repeat(np.repeat(base, 16, 1), 16, 2) + rng.normal(0, 2, (n, 16, 16, 3))

    def textured(n):
        images = flat(n)
        images[:, 8:] += rng.normal(0, 40, (n, 8, 16, 3))
        return np.clip(images, 0, 255).astype(np.uint8)

    return textured(160), textured(40), np.clip(flat(40), 0, 255).astype(np.uint8)


def _auroc(s_in, s_out):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out])


def test_likelihood_prefers_simple_images_and_the_corrections_fix_it():
    """Nalisnick et al.'s failure in miniature: constant images get a *higher* likelihood than the ID test images;
    typicality and input complexity rank them as OOD."""
    train, test, simple = _smooth_and_simple()
    nll = oodscope.create("pixelcnn_nll", **TINY).fit(train)
    assert _auroc(nll.score(test), nll.score(simple)) < 0.1  # the flat images look *more* in-distribution
    typical = oodscope.create("typicality", **TINY).fit(train)
    assert typical.entropy_ == pytest.approx(float(np.mean(nll.score(train))), rel=1e-9)  # one shared model
    assert _auroc(typical.score(test), typical.score(simple)) > 0.9
    complexity = oodscope.create("input_complexity", **TINY).fit(train)
    np.testing.assert_allclose(complexity.score(simple), nll.score(simple) - png_bits_per_dim(
        simple.transpose(0, 3, 1, 2)), rtol=1e-12)
    assert _auroc(complexity.score(test), complexity.score(simple)) > 0.9


def test_likelihood_ratio_subtracts_the_background_model():
    train, test, simple = _smooth_and_simple(1)
    ratio = oodscope.create("likelihood_ratio", perturb=0.3, **TINY).fit(train)
    main = oodscope.create("pixelcnn_nll", **TINY).fit(train)
    background = ratio._bits_per_dim(test.transpose(0, 3, 1, 2), ratio.background_)
    np.testing.assert_allclose(ratio.score(test), main.score(test) - background, rtol=1e-12)
    assert not np.allclose(background, main.score(test))  # the background model saw perturbed images
    assert ratio.background_training_["train_bits_per_dim"][-1] > main.training_["train_bits_per_dim"][-1]


def test_png_code_length_by_hand():
    constant = np.full((1, 3, 32, 32), 7, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    small, large = png_bits_per_dim(constant)[0], png_bits_per_dim(noise)[0]
    assert small < 0.5 < 7.5 < large < 8.5  # white noise does not compress (8 bits + PNG overhead)


def test_bad_images_are_refused_with_a_message():
    train, test, _ = _smooth_and_simple()
    detector = oodscope.create("pixelcnn_nll", **{**TINY, "epochs": 1}).fit(train)
    with pytest.raises(ValueError, match="trained on"):
        detector.score(test[:, :8])
    with pytest.raises(ValueError, match="8-bit"):
        detector.score(test.astype(np.float32) / 256.0 + 1e-3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        detector.score(test.astype(np.float32))
    with pytest.raises(ValueError, match="NaN"):
        detector.score(np.full(test.shape, np.nan, np.float32))
    with pytest.raises(ValueError, match="channels"):
        detector.score(np.zeros((2, 16, 16, 5), np.uint8))
    np.testing.assert_allclose(detector.score(test.astype(np.float32) / 255.0), detector.score(test))
    with pytest.raises(ValueError, match="not all identical"):
        oodscope.create("pixelcnn_nll", **TINY).fit(np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="perturb"):
        oodscope.create("likelihood_ratio", perturb=1.5).fit(train)


def test_a_diverging_fit_stops_with_a_clear_error():
    train, _, _ = _smooth_and_simple()
    with pytest.raises(FloatingPointError, match="lower lr"):
        oodscope.create("pixelcnn_nll", hidden=8, blocks=1, epochs=1, lr=1e12).fit(train)


# -- RealNVP ------------------------------------------------------------------------------------------------------
def _flow_latents(flow, s):
    """Every latent of ``flow`` for ``s``, concatenated: the bijection whose Jacobian the test takes."""
    from torch.nn import functional as F

    h, outs = s, []
    for stage in flow.stages:
        for layer in stage[:3]:
            h, _ = layer(h)
        h = F.pixel_unshuffle(h, 2)
        for layer in stage[3:]:
            h, _ = layer(h)
        out, h = h.chunk(2, dim=1)
        outs.append(out.flatten(1))
    for layer in flow.final:
        h, _ = layer(h)
    return torch.cat(outs + [h.flatten(1)], dim=1)


def test_flow_log_density_is_the_change_of_variables_with_the_autograd_jacobian():
    from oodscope.generative.realnvp import RealNVP

    torch.manual_seed(0)
    flow = RealNVP(2, hidden=8, blocks=1, scales=1).double()
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.normal_(0, 0.2)  # away from the identity start
    s = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: _flow_latents(flow, v.view(1, 2, 4, 4))[0], s.flatten())
    z = _flow_latents(flow, s)
    expected = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum() + torch.linalg.slogdet(jacobian)[1]
    assert abs(float(jacobian.det())) != pytest.approx(1.0, abs=1e-3)  # a non-trivial volume change
    assert float(flow.log_prob(s)[0].detach()) == pytest.approx(float(expected), rel=1e-10)


def test_flow_bits_per_dim_at_the_identity_start_by_hand():
    """A new flow is the identity (zero last layers), so ``log p`` is the standard normal at the logits plus the
    logit transform's Jacobian minus ``D log 256``, computed here in numpy."""
    from oodscope.generative.realnvp import ALPHA, RealNVP

    flow = RealNVP(3, hidden=8, blocks=1, scales=1)
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 4, 4), dtype=np.uint8)
    noise = np.random.default_rng(1).random((1, 3, 4, 4))
    p = ALPHA + (1 - 2 * ALPHA) * (images + noise) / 256
    s = np.log(p) - np.log1p(-p)
    log_p = (-0.5 * s ** 2 - 0.5 * np.log(2 * np.pi) + np.log((1 - 2 * ALPHA) / (p * (1 - p)))).sum((1, 2, 3))
    expected = -(log_p - 48 * np.log(256)) / (48 * np.log(2))
    got = flow.bits_per_dim(torch.from_numpy(images), torch.from_numpy(noise)).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def _fit_flow_to_gaussian(seed: int = 0):
    """A 4-d correlated Gaussian as (1, 2, 2) 'images'; a RealNVP of four checkerboard couplings fitted by
    maximum likelihood; returns the flow, the covariance and held-out samples."""
    from oodscope.generative.realnvp import RealNVP

    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(4, 4)) * 0.6 + np.eye(4)
    covariance = mixing @ mixing.T
    train = torch.from_numpy(rng.multivariate_normal(np.zeros(4), covariance, 4000)).float().view(-1, 1, 2, 2)
    test = rng.multivariate_normal(np.zeros(4), covariance, 2000)
    torch.manual_seed(seed)
    flow = RealNVP(1, hidden=16, blocks=1, scales=0)
    optimiser = torch.optim.Adam(flow.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, 800)
    for step in range(800):
        batch = train[torch.randint(0, len(train), (256,))]
        loss = -flow.log_prob(batch).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    return flow.eval(), covariance, test


def test_flow_recovers_a_gaussians_analytic_log_density_and_its_typical_set():
    from scipy.stats import multivariate_normal

    from oodscope.generative.typicality import typicality_score

    flow, covariance, test = _fit_flow_to_gaussian()
    with torch.no_grad():
        log_p = flow.log_prob(torch.from_numpy(test).float().view(-1, 1, 2, 2)).double().numpy()
    analytic = multivariate_normal(np.zeros(4), covariance).logpdf(test)
    entropy = 0.5 * np.linalg.slogdet(2 * np.pi * np.e * covariance)[1]
    assert np.mean(-log_p) == pytest.approx(entropy, abs=0.05)  # the fitted flow's cross-entropy ~ the entropy
    assert np.median(np.abs(log_p - analytic)) < 0.1 and np.corrcoef(log_p, analytic)[0, 1] > 0.98
    # typicality: the mode is the most likely point yet atypical by D/2 = 2 nats; a point at the typical
    # radius (Mahalanobis distance sqrt(D)) is typical
    estimated_entropy = float(np.mean(-log_p))
    typical = np.linalg.cholesky(covariance) @ np.full(4, 1.0)  # squared Mahalanobis norm 4 = D
    with torch.no_grad():
        nll = -flow.log_prob(torch.tensor(np.stack([np.zeros(4), typical])).float().view(-1, 1, 2, 2)).numpy()
    mode_score, typical_score = typicality_score(nll, estimated_entropy)
    assert mode_score == pytest.approx(2.0, abs=0.15)
    assert typical_score < 0.15


def test_flow_likelihood_prefers_simple_images_and_typicality_fixes_it(tmp_path):
    from oodscope.persistence import load, save

    train, test, simple = _smooth_and_simple()
    flow = dict(model="realnvp", hidden=16, blocks=1, epochs=10, batch_size=16, lr=2e-3)
    nll = oodscope.create("pixelcnn_nll", **flow).fit(train)
    assert np.isfinite(nll.score(test)).all() and nll.training_["train_bits_per_dim"][-1] < 7.0
    assert _auroc(nll.score(test), nll.score(simple)) < 0.1
    typical = oodscope.create("typicality", **flow).fit(train)
    assert _auroc(typical.score(test), typical.score(simple)) > 0.9
    np.testing.assert_array_equal(load(save(typical, tmp_path / "typicality")).score(simple), typical.score(simple))
    assert oodscope.create("pixelcnn_nll", **{**flow, "model": "glow"}).get_params()["model"] == "glow"
    with pytest.raises(ValueError, match="model must be one of"):
        oodscope.create("pixelcnn_nll", **{**flow, "model": "glow"}).fit(train)


# -- hierarchical VAE ---------------------------------------------------------------------------------------------
def test_gaussian_kl_matches_torch_distributions():
    from torch.distributions import Normal, kl_divergence

    from oodscope.generative.hvae import gaussian_kl

    g = torch.Generator().manual_seed(0)
    mq, sq, mp, sp = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    expected = kl_divergence(Normal(mq, sq.exp()), Normal(mp, sp.exp())).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(mq, sq, mp, sp), expected)


def _tiny_hvae_detector(**params):
    train, test, simple = _smooth_and_simple()
    settings = dict(hidden=16, latent=4, epochs=4, batch_size=16, lr=2e-3, samples=4, **params)
    return oodscope.create("hvae_llr", **settings).fit(train), test, simple


def test_hvae_elbo_estimates_agree_and_llr_is_zero_when_k_covers_no_latent():
    from oodscope.generative.hvae import importance_bound

    detector, test, simple = _tiny_hvae_detector(k=0)
    np.testing.assert_array_equal(detector.score(simple), np.zeros(len(simple)))
    images = torch.from_numpy(test[:6].transpose(0, 3, 1, 2).copy())
    network = detector.network_
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        # the ELBO two ways: closed-form KL terms given the sampled parents, and one-draw weights
        analytic = torch.stack([network.log_weights(images, generator=g, kl_weight=1.0) for _ in range(400)])
        draws = torch.stack([network.log_weights(images, generator=g) for _ in range(400)])
        standard_error = float(torch.sqrt((analytic.var(0) + draws.var(0)) / 400).max())
        np.testing.assert_allclose(draws.mean(0).numpy(), analytic.mean(0).numpy(), atol=4 * standard_error)
        # importance weighting: log-mean-exp of the same draws, bounded below by their mean (Jensen)
        noise = [torch.randn((5, *shape), generator=torch.Generator().manual_seed(2))
                 for shape in network.latent_shapes(images.shape[1:])]
        weights = torch.stack([network.log_weights(images, 0, [layer[s:s + 1] for layer in noise]) for s in range(5)])
        bound = importance_bound(network, images, 0, noise)
    torch.testing.assert_close(bound, torch.logsumexp(weights.double(), 0) - math.log(5))
    assert bool((bound >= weights.double().mean(0) - 1e-9).all())


def test_hvae_llr_bounds_and_bad_input():
    detector, test, simple = _tiny_hvae_detector(k=2)
    bounds = detector.bounds(test, ks=(0, 1, 2))
    np.testing.assert_allclose(detector.score(test), bounds[2] - bounds[0], rtol=1e-12)
    np.testing.assert_array_equal(detector.bounds(test)[2], bounds[2])
    assert detector.training_["train_bits_per_dim"][-1] < detector.training_["train_bits_per_dim"][0]
    with pytest.raises(ValueError, match="0..3"):
        oodscope.create("hvae_llr", k=4).fit(test)
    with pytest.raises(ValueError, match="divide by 8"):
        oodscope.create("hvae_llr", epochs=1).fit(test[:, :12, :12])
    with pytest.raises(ValueError, match="trained on"):
        detector.score(test[:, :8, :8])


# -- MSMA ---------------------------------------------------------------------------------------------------------
def test_score_network_learns_a_gaussians_noise_conditional_score():
    """For isotropic ``N(mu, s^2 I)`` data the score of the data smoothed at ``sigma`` is
    ``-(x - mu) / (s^2 + sigma^2)``; a small network trained by denoising score matching recovers it at every
    level."""
    from oodscope.generative.score_network import ScoreNetwork, geometric_sigmas

    torch.manual_seed(0)
    mu, s = 0.5, 0.1
    sigmas = geometric_sigmas(0.5, 0.05, 4)
    net = ScoreNetwork(1, hidden=16, blocks=1, sigmas=sigmas)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        x = mu + s * torch.randn(256, 1, 2, 2, generator=g)
        loss = net.denoising_loss(x, g).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    x = mu + s * torch.randn(512, 1, 2, 2, generator=g)
    with torch.no_grad():
        for sigma in sigmas:
            noisy = x + sigma * torch.randn(x.shape, generator=g)
            analytic = -(noisy - mu) / (s ** 2 + sigma ** 2)
            got = net(noisy, sigma.expand(len(x)))
            relative = float((got - analytic).norm() / analytic.norm())
            assert relative < 0.15, (float(sigma), relative)


def test_denoising_loss_by_hand_for_the_exact_score_of_a_point_mass():
    """Data = one point ``x0``: the smoothed score at ``x0 + sigma z`` is ``-z / sigma`` exactly; a network that
    outputs zero has loss ``|z|^2 / 2``, by hand from the same draws."""
    from oodscope.generative.score_network import ScoreNetwork

    net = ScoreNetwork(1, hidden=4, blocks=1)
    x0 = torch.full((3, 1, 2, 2), 0.3)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
        g = torch.Generator().manual_seed(3)
        loss = net.denoising_loss(x0, g)
        g = torch.Generator().manual_seed(3)
        torch.randint(0, len(net.sigmas), (3,), generator=g)
        z = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(loss, 0.5 * z.pow(2).flatten(1).sum(1))


def test_msma_fits_a_gmm_on_score_norms_and_flags_noise_images():
    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 200, 16)[None, None, :, None]
    smooth = lambda n: np.clip(ramp + rng.normal(0, 6, (n, 16, 16, 3)), 0, 255).astype(np.uint8)  # noqa: E731
    train, test = smooth(128), smooth(32)
    noise = rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    detector = oodscope.create("msma", levels=4, n_components=2, hidden=16, blocks=1, epochs=6, batch_size=16,
                               lr=2e-3).fit(train)
    norms = detector.score_norms(test.transpose(0, 3, 1, 2).copy())
    assert norms.shape == (32, 4) and (norms > 0).all()
    np.testing.assert_allclose(detector.score(test), -detector.mixture_.score_samples(norms), rtol=1e-10)
    assert detector.training_["train_dsm"][-1] < detector.training_["train_dsm"][0]
    assert _auroc(detector.score(test), detector.score(noise)) > 0.95
    with torch.no_grad():  # the authors' weighted norms, sigma_l |s(x, sigma_l)|, by hand for the first image
        x = torch.from_numpy(test[:1].transpose(0, 3, 1, 2).copy()).float() / 255
        by_hand = [float(sigma * detector.network_(x, sigma.view(1)).norm()) for sigma in detector.network_.sigmas]
    np.testing.assert_allclose(norms[0], by_hand, rtol=1e-5)
    searched = oodscope.create("msma", levels=4, n_components=None, hidden=16, blocks=1, epochs=6, batch_size=16,
                               lr=2e-3).fit(train)  # the same trained network; the GMM size by 10-fold CV
    assert searched.mixture_[-1].n_components in range(2, 21, 2)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        oodscope.create("msma", sigma_min=1.0, sigma_max=0.5).fit(train)
    with pytest.raises(ValueError, match="too few"):
        oodscope.create("msma", n_components=100).fit(train)


# -- MOODv2 -------------------------------------------------------------------------------------------------------
def test_mae_patches_round_trip_and_the_loss_counts_only_removed_patches():
    from oodscope.generative.mae import MaskedAutoencoder, patchify, unpatchify

    x = torch.rand(2, 3, 8, 8)
    patches = patchify(x, 4)
    assert patches.shape == (2, 4, 48)
    torch.testing.assert_close(patches[0, 1], x[0, :, :4, 4:].permute(1, 2, 0).reshape(-1))  # raster order
    torch.testing.assert_close(unpatchify(patches, 4, 3), x)
    mae = MaskedAutoencoder(3, image_size=8, patch=4, width=16, depth=1, heads=2, decoder_width=8, decoder_depth=1)
    kept, removed = mae.random_masking(5, torch.Generator().manual_seed(0))
    assert kept.shape == (5, 1) and removed.sum(1).tolist() == [3.0] * 5  # 75 % of 4 patches removed
    assert float(removed.gather(1, kept).sum()) == 0.0
    # the loss is the normalised-pixel MSE on removed patches: exact predictions there give 0, whatever the
    # predictions on the kept patches
    target = patches[:1]
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    removed = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    predicted = target.clone()
    predicted[0, 1] += 5.0
    assert float(mae.masked_loss(x[:1], predicted, removed)) == pytest.approx(0.0, abs=1e-10)
    predicted[0, 2] += 1.0
    assert float(mae.masked_loss(x[:1], predicted, removed)) == pytest.approx(1.0 / 3.0, rel=1e-6)


def test_moodv2_scores_with_the_feature_detector_on_mae_features(tmp_path):
    from oodscope.extraction.outputs import Outputs
    from oodscope.persistence import load, save

    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 200, 16)[None, None, :, None]
    smooth = lambda n: np.clip(ramp + rng.normal(0, 6, (n, 16, 16, 3)), 0, 255).astype(np.uint8)  # noqa: E731
    train, test = smooth(96), smooth(24)
    noise = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    detector = oodscope.create("moodv2", detector_params={"k": 5}, width=32, depth=2, epochs=4, batch_size=16,
                               lr=2e-3).fit(train)
    assert detector.training_["train_masked_mse"][-1] < detector.training_["train_masked_mse"][0]
    features = detector.features(train.transpose(0, 3, 1, 2).copy())
    knn = oodscope.create("knn", k=5).fit(Outputs(features=features))
    np.testing.assert_allclose(detector.score(noise), knn.score(Outputs(features=detector.features(
        noise.transpose(0, 3, 1, 2).copy()))), rtol=1e-12)
    assert _auroc(detector.score(test), detector.score(noise)) > 0.95
    np.testing.assert_array_equal(load(save(detector, tmp_path / "moodv2")).score(test), detector.score(test))
    with pytest.raises(ValueError, match="only features"):
        oodscope.create("moodv2", detector="mahalanobis").fit(train)
    with pytest.raises(ValueError, match="mask_ratio"):
        oodscope.create("moodv2", mask_ratio=1.0).fit(train)
    with pytest.raises(ValueError, match="divides by patch"):
        oodscope.create("moodv2", patch=5).fit(train)


def test_hvae_llr_refuses_a_non_finite_bound():
    detector, test, _ = _tiny_hvae_detector(k=1)
    with torch.no_grad():
        detector.network_.out[-1].bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="not finite"):
        detector.bounds(test)


def test_hvae_clamps_a_broad_prior_so_llr_stays_finite():
    """A prior log-std of 100 at z_2 (exp overflows float32) is clamped to LOG_STD_LIMIT: L^{>2} stays finite."""
    from oodscope.generative.hvae import LOG_STD_LIMIT, mean_and_log_std

    mean, log_std = mean_and_log_std(torch.tensor([[1.0, -2.0, 100.0, -100.0]]).reshape(1, 4, 1, 1))
    np.testing.assert_array_equal(mean.flatten().numpy(), [1.0, -2.0])
    np.testing.assert_array_equal(log_std.flatten().numpy(), [LOG_STD_LIMIT, -LOG_STD_LIMIT])
    detector, test, _ = _tiny_hvae_detector(k=2)
    latent = detector.network_.latent
    with torch.no_grad():
        for prior in detector.network_.prior:
            prior.bias[latent:].fill_(100.0)
    bounds = detector.bounds(test, ks=(0, 2))
    assert np.isfinite(bounds[2]).all() and np.isfinite(bounds[0]).all()
