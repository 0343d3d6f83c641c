"""The small DDPM and the two diffusion detectors (LMD, DiffGuard): the schedule and the simple loss by hand, the
samplers against analytic denoisers (a point mass and a Gaussian), LMD's masks, known-region replacement and
median, DiffGuard's guidance gradient by hand and its zero-guidance identity, determinism, subsets, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import oodscope
from oodscope.generative import ddpm
from oodscope.generative.lmd import center_mask, checkerboard_mask

LMD_TINY = dict(attempts=3, mask_blocks=2, sampling_steps=5, hidden=8, epochs=2, batch_size=16)
GUARD_TINY = dict(ddim_steps=6, inversion_steps=3, hidden=8, epochs=2, batch_size=16)


def _smooth(n: int, seed: int = 0, size: int = 8) -> np.ndarray:
    """Smooth uint8 (N, H, W, 3) images: a horizontal ramp with a random offset and a little noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 200, size)[None, None, :, None] + rng.integers(-20, 20, (n, 1, 1, 1))
    return np.clip(ramp + rng.normal(0, 4, (n, size, size, 3)), 0, 255).astype(np.uint8)


def _noise_images(n: int, seed: int = 1, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _auroc(s_in, s_out):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out])


class PointMass(nn.Module):
    """The exact noise prediction when the data is the single image ``x*``: ``(x_t - sqrt(abar) x*) / sqrt(1-abar)``."""

    def __init__(self, target: torch.Tensor, steps: int = 1000):
        super().__init__()
        self.target, self.steps = target, steps
        self.alphas_cumprod = ddpm.linear_alphas_cumprod(steps)

    def forward(self, x, t):
        abar = self.alphas_cumprod[t.cpu()].float().view(-1, 1, 1, 1)
        return (x - abar.sqrt() * self.target) / (1 - abar).sqrt()


class Gaussian(nn.Module):
    """Data ``N(mu, s^2)`` per dimension, whose exact noise prediction is
    ``E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)``."""

    def __init__(self, mu: float, s: float, steps: int = 1000):
        super().__init__()
        self.mu, self.s, self.steps = mu, s, steps
        self.alphas_cumprod = ddpm.linear_alphas_cumprod(steps)

    def forward(self, x, t):
        abar = self.alphas_cumprod[t.cpu()].to(x.dtype).view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x - abar.sqrt() * self.mu) / (abar * self.s ** 2 + 1 - abar)


# -- the DDPM ----------------------------------------------------------------------------------------------------
def test_linear_schedule_and_strided_steps_by_hand():
    abar = ddpm.linear_alphas_cumprod(1000).numpy()
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(abar, np.cumprod(1 - betas), rtol=1e-12)
    assert abar[-1] == pytest.approx(4.04e-5, rel=0.01)  # Ho et al.: x_T is almost pure noise
    assert ddpm.strided_timesteps(5, 1000) == [0, 250, 500, 749, 999]
    assert ddpm.strided_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError, match="sampling steps"):
        ddpm.strided_timesteps(0)


def test_simple_loss_of_the_untrained_network_is_the_mean_squared_noise():
    """The output convolution starts at zero, so eps_theta = 0 and Eq. 14 is mean(eps^2) of the drawn noise."""
    torch.manual_seed(0)
    model = ddpm.DDPM(3, hidden=8, blocks=1)
    images = torch.from_numpy(_smooth(4).transpose(0, 3, 1, 2).copy())
    loss = model.training_loss(images, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    torch.randint(0, 1000, (4,), generator=generator)  # the steps, drawn first
    eps = torch.randn((4, 3, 8, 8), generator=generator)
    np.testing.assert_allclose(loss.detach().numpy(), eps.pow(2).flatten(1).mean(1).numpy(), rtol=1e-6)
    x0, t = ddpm.to_model_range(images), torch.tensor([0, 10, 500, 999])
    abar = ddpm.linear_alphas_cumprod(1000)[t].float().view(-1, 1, 1, 1)
    np.testing.assert_allclose(model.q_sample(x0, t, eps).numpy(), (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).numpy(),
                               rtol=1e-6)


def test_the_u_net_keeps_the_shape_and_is_conditioned_on_the_step():
    torch.manual_seed(0)
    model = ddpm.DDPM(3, hidden=8, blocks=2)
    nn.init.normal_(model.out.weight, std=0.1)
    x = torch.randn(2, 3, 16, 16)
    a, b = model(x, torch.tensor([0, 0])), model(x, torch.tensor([500, 500]))
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_the_respaced_ancestral_step_equals_ho_et_al_eq_11_for_single_steps():
    """Stride 1: posterior mean = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t), variance beta~_t (Eq. 7)."""
    model = Gaussian(0.1, 0.3)
    x_t = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.3
    abar = ddpm.linear_alphas_cumprod(1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    for t in (1, 20, 300):
        eps = model(x_t, torch.tensor([t]))
        expected = (x_t - betas[t] / (1 - abar[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
        got = ddpm.ancestral_step(model, x_t, t, t - 1, None)
        np.testing.assert_allclose(got.numpy(), expected.float().numpy(), rtol=1e-5, atol=1e-6)
        noise = torch.ones_like(x_t)
        spread = ddpm.ancestral_step(model, x_t, t, t - 1, noise) - got
        variance = float((1 - abar[t - 1]) / (1 - abar[t]) * betas[t])
        np.testing.assert_allclose(spread.numpy(), math.sqrt(variance), rtol=1e-5)


def test_samplers_recover_a_point_mass_exactly():
    target = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    model = PointMass(target)
    drawn = ddpm.sample(model, (2, 3, 4, 4), 10, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(drawn.numpy(), target.expand(2, -1, -1, -1).numpy(), atol=1e-5)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1.0
    filled = ddpm.inpaint(model, target, mask, 7, torch.Generator().manual_seed(2))
    np.testing.assert_allclose(filled.numpy(), target.numpy(), atol=1e-5)
    timesteps = ddpm.strided_timesteps(20)[:8]
    latent = ddpm.ddim_invert(model, target, timesteps)
    assert not torch.allclose(latent, target, atol=1e-2)
    np.testing.assert_allclose(ddpm.ddim_sample(model, latent, timesteps).numpy(), target.numpy(), atol=1e-5)


def test_ancestral_sampling_draws_a_gaussian_with_the_right_mean_and_spread():
    """With all T = 1000 steps the chain draws N(mu, s^2) (4,096 independent pixels); strided chains keep the mean
    but shrink the spread (sigma^2 = beta~ with x0_hat plugged in ignores the uncertainty of x_0 over a long stride:
    0.162 at 50 steps, 0.187 at 250, 0.195 at 1,000 for s = 0.2)."""
    mu, s = 0.3, 0.2
    stds = []
    for steps in (50, 1000):
        drawn = ddpm.sample(Gaussian(mu, s), (1, 1, 64, 64), steps, torch.Generator().manual_seed(0)).numpy()
        assert drawn.mean() == pytest.approx(mu, abs=0.01)
        stds.append(drawn.std())
    assert stds[1] == pytest.approx(s, rel=0.03)
    assert 0.7 * s < stds[0] < stds[1]


def test_training_through_the_family_trainer_lowers_the_simple_loss():
    detector = oodscope.create("lmd", **{**LMD_TINY, "epochs": 4, "lr": 3e-3}).fit(_smooth(48))
    losses = detector.training_["train_simple_loss"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    held_out = detector.diffusion_loss(_smooth(8, seed=5))
    assert held_out.shape == (8,) and np.isfinite(held_out).all()
    np.testing.assert_allclose(detector.diffusion_loss(_smooth(8, seed=5)[2:5]), held_out[2:5], rtol=1e-6)


# -- LMD ---------------------------------------------------------------------------------------------------------
def test_the_alternating_checkerboard_masks_by_hand():
    mask = checkerboard_mask(4, 4, 2)
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(checkerboard_mask(4, 4, 2, inverted=True), 1 - mask)
    detector = oodscope.create("lmd", attempts=4, mask_blocks=2)
    masks = detector.masks(4, 4)
    np.testing.assert_array_equal(masks, [mask, 1 - mask, mask, 1 - mask])
    assert center_mask(8, 8).sum() == 64 - 16 and center_mask(8, 8)[2:6, 2:6].sum() == 0
    with pytest.raises(ValueError, match="divisible"):
        checkerboard_mask(6, 6, 4)


@pytest.fixture(scope="module")
def lmd():
    return oodscope.create("lmd", **LMD_TINY).fit(_smooth(48))


def test_inpainting_with_nothing_masked_returns_the_input(lmd):
    images = _smooth(5, seed=3)
    filled = lmd.inpaint(images, np.ones((8, 8)))
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    np.testing.assert_allclose(filled, x, rtol=0, atol=1e-7)
    distance = np.mean((filled.astype(np.float64) - x) ** 2, axis=(1, 2, 3))
    assert np.all(distance < 1e-14)


def test_known_region_comes_back_exactly_and_the_rest_is_inpainted(lmd):
    images = _smooth(5, seed=3)
    mask = checkerboard_mask(8, 8, 2)
    filled = lmd.inpaint(images, mask, attempt=1)
    chw = images.transpose(0, 3, 1, 2)
    x = (chw.astype(np.float32) * np.float32(2 / 255) - np.float32(1) + np.float32(1)) / np.float32(2)
    known = np.broadcast_to(mask == 1, filled.shape)
    np.testing.assert_array_equal(filled[known], x[known])
    assert np.abs(filled[~known] - x[~known]).mean() > 1e-3
    assert not np.array_equal(filled, lmd.inpaint(images, mask, attempt=2))  # another attempt, other noise


def test_lmd_score_is_the_median_of_the_per_mask_distances(lmd):
    images = _smooth(6, seed=4).transpose(0, 3, 1, 2).copy()
    distances = lmd.distances(images)
    x = images.astype(np.float32) / 255.0
    for j, mask in enumerate(lmd.masks(8, 8)):
        by_hand = np.mean((lmd.inpaint(images, mask, j).astype(np.float64) - x) ** 2, axis=(1, 2, 3))
        np.testing.assert_allclose(distances[:, j], by_hand, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(lmd.score(images), np.median(distances, axis=1))


def test_lmd_is_deterministic_per_seed_and_a_subset_scores_the_same(lmd):
    test = np.concatenate([_smooth(6, seed=7), _noise_images(3)])
    scores = lmd.score(test)
    again = oodscope.create("lmd", **LMD_TINY).fit(_smooth(48))
    np.testing.assert_array_equal(again.score(test), scores)
    index = np.array([8, 0, 3])
    np.testing.assert_allclose(lmd.score(test[index]), scores[index], rtol=1e-9, atol=1e-12)
    other = oodscope.create("lmd", **{**LMD_TINY, "seed": 1}).fit(_smooth(48))
    assert not np.allclose(other.score(test), scores)


def test_lmd_flags_noise_images_that_no_inpainting_of_smooth_images_explains():
    """A DDPM of smooth ramps inpaints a checkerboard of a ramp well and one of white noise badly (15 epochs on 64
    images: ID MSE about 0.011, noise about 0.056)."""
    detector = oodscope.create("lmd", **{**LMD_TINY, "sampling_steps": 10, "epochs": 15, "lr": 3e-3,
                                         "hidden": 16}).fit(_smooth(64))
    ind, noise = detector.score(_smooth(12, seed=8)), detector.score(_noise_images(6))
    assert _auroc(ind, noise) > 0.95 and noise.mean() > 2 * ind.mean()


def test_lmd_refuses_bad_settings():
    train = _smooth(8)
    with pytest.raises(ValueError, match="LPIPS"):
        oodscope.create("lmd", distance="lpips").fit(train)
    with pytest.raises(ValueError, match="mask must be one of"):
        oodscope.create("lmd", mask="random").fit(train)
    with pytest.raises(ValueError, match="divisible by 3"):
        oodscope.create("lmd", **{**LMD_TINY, "mask_blocks": 3}).fit(train)
    with pytest.raises(ValueError, match="sampling_steps"):
        oodscope.create("lmd", sampling_steps=2000).fit(train)
    with pytest.raises(ValueError, match="divide by 4"):
        oodscope.create("lmd", **{**LMD_TINY, "mask_blocks": 1}).fit(_smooth(8, size=6))
    with pytest.raises(ValueError, match="attempts"):
        oodscope.create("lmd", attempts=0).fit(train)


def test_lmd_and_diffguard_share_one_trained_ddpm(lmd):
    guard = oodscope.create("diffguard", classifier=_linear_classifier(), **{
        **GUARD_TINY, "hidden": LMD_TINY["hidden"], "epochs": LMD_TINY["epochs"],
        "batch_size": LMD_TINY["batch_size"]}).fit(_smooth(48))
    for key, value in lmd.network_.state_dict().items():
        assert torch.equal(value, guard.network_.state_dict()[key])


# -- DiffGuard ---------------------------------------------------------------------------------------------------
def _linear_classifier(seed: int = 0, size: int = 8, classes: int = 3) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, classes))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(model[1].weight.shape, generator=generator) * 0.1)
        model[1].bias.zero_()
    return model


@pytest.fixture(scope="module")
def guard():
    return oodscope.create("diffguard", classifier=_linear_classifier(), **GUARD_TINY).fit(_smooth(48))


def test_the_guidance_gradient_by_hand_for_a_linear_classifier(guard):
    """For logits W (x_in + 1) / 2 + b: grad_x_in log softmax_y = W^T (e_y - p) / 2, times the scale."""
    network = guard.network_
    W = guard.classifier_[1].weight.detach().double()
    x_t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])
    t = 300
    got = guard._guidance(network, guard.classifier_, labels)(x_t, eps, t)
    abar = float(network.alphas_cumprod[t])
    f = math.sqrt(1 - abar)
    x_in = (f * (x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar) + (1 - f) * x_t).double()
    p = torch.softmax(((x_in + 1) / 2).flatten(1) @ W.T, dim=1)
    onehot = torch.nn.functional.one_hot(labels, 3).double()
    expected = guard.guidance_scale * ((onehot - p) @ W / 2).view(2, 3, 8, 8)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-7)


def test_without_guidance_the_synthesis_is_the_unconditional_one_and_the_score_zero():
    detector = oodscope.create("diffguard", classifier=_linear_classifier(), guidance_scale=0.0,
                               **GUARD_TINY).fit(_smooth(48))
    images = np.concatenate([_smooth(4, seed=2), _noise_images(2)])
    parts = detector.synthesise(images)
    np.testing.assert_array_equal(parts["synthesis"], parts["reference"])
    np.testing.assert_array_equal(detector.score(images), np.zeros(len(images)))


def test_diffguard_guides_towards_the_predicted_label_and_scores_the_logit_mismatch(guard):
    images = np.concatenate([_smooth(4, seed=2), _noise_images(3)])
    parts = guard.synthesise(images)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float() / 255.0
    with torch.no_grad():
        logits = guard.classifier_(x)
        np.testing.assert_array_equal(parts["labels"], logits.argmax(1).numpy())
        guided = guard.classifier_(torch.from_numpy(parts["synthesis"]))
        reference = guard.classifier_(torch.from_numpy(parts["reference"]))
    by_hand = (reference - guided).abs().sum(1).double().numpy()
    np.testing.assert_allclose(guard.score(images), by_hand, rtol=1e-4, atol=1e-6)
    # guidance raises the predicted class's probability over the unguided synthesis
    chosen = torch.from_numpy(parts["labels"])[:, None]
    assert (torch.log_softmax(guided, 1).gather(1, chosen) > torch.log_softmax(reference, 1).gather(1, chosen)).all()
    as_input = guard.clone(reference="input").fit(_smooth(48)).synthesise(images)
    np.testing.assert_allclose(as_input["reference"], x.numpy(), atol=1e-6)


def test_diffguard_is_deterministic_and_a_subset_scores_the_same(guard):
    test = np.concatenate([_smooth(5, seed=9), _noise_images(3)])
    scores = guard.score(test)
    np.testing.assert_array_equal(guard.clone().fit(_smooth(48)).score(test), scores)
    index = np.array([7, 1, 2])
    np.testing.assert_allclose(guard.score(test[index]), scores[index], rtol=1e-9, atol=1e-12)


def test_diffguard_takes_the_cifar_resnet_by_name(tmp_path):
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-bench"
    weights = bench / "models" / "cifar10_resnet20.pth"
    if not weights.exists():
        pytest.skip("the shared CIFAR-10 ResNet-20 weights are not here")
    from oodscope.models.zoo import load_model

    images = _smooth(6, size=32)
    detector = oodscope.create("diffguard", classifier="cifar10_resnet20", weights=str(weights),
                               **{**GUARD_TINY, "epochs": 1}).fit(images)
    model, preprocess = load_model("cifar10_resnet20", weights)
    with torch.no_grad():
        expected = model(preprocess(torch.from_numpy(images))).argmax(1).numpy()
    np.testing.assert_array_equal(detector.synthesise(images)["labels"], expected)
    # the benchmark's route: its model and uint8 NHWC preprocessing, wrapped for [0, 1] NCHW images
    benched = oodscope.create("diffguard", **{**GUARD_TINY, "epochs": 1}).use_classifier(model, preprocess)
    np.testing.assert_array_equal(benched.fit(images).synthesise(images)["labels"], expected)
    with torch.no_grad():
        np.testing.assert_allclose(benched.classifier_(torch.from_numpy(images.transpose(0, 3, 1, 2)).float() / 255),
                                   model(preprocess(torch.from_numpy(images))), rtol=1e-4, atol=1e-4)


def test_diffguard_refuses_bad_settings_and_classifiers():
    train = _smooth(8)
    with pytest.raises(ValueError, match="needs classifier="):
        oodscope.create("diffguard").fit(train)
    with pytest.raises(ValueError, match="torch module"):
        oodscope.create("diffguard", classifier=42).fit(train)
    with pytest.raises(ValueError, match="unknown model"):
        oodscope.create("diffguard", classifier="imagenet_vit").fit(train)
    with pytest.raises(ValueError, match="inversion_steps"):
        oodscope.create("diffguard", classifier=_linear_classifier(), ddim_steps=5, inversion_steps=5).fit(train)
    with pytest.raises(ValueError, match="reference"):
        oodscope.create("diffguard", classifier=_linear_classifier(), reference="noise").fit(train)
    with pytest.raises(ValueError, match="guidance_scale"):
        oodscope.create("diffguard", classifier=_linear_classifier(), guidance_scale=float("nan")).fit(train)
    with pytest.raises(ValueError, match="classifier fails"):
        oodscope.create("diffguard", classifier=_linear_classifier(size=16), **GUARD_TINY).fit(train)
    with pytest.raises(ValueError, match="logits"):
        one_number = nn.Sequential(nn.Flatten(), nn.Linear(192, 1), nn.Flatten(0))  # (N,), not (N, classes)
        oodscope.create("diffguard", classifier=one_number, **GUARD_TINY).fit(train)


def test_diffguard_saves_and_loads_with_the_same_scores(guard, tmp_path):
    from oodscope.persistence import load, save

    test = np.concatenate([_smooth(3, seed=11), _noise_images(2)])
    loaded = load(save(guard, tmp_path / "diffguard"), classifier=guard.classifier)
    np.testing.assert_array_equal(loaded.score(test), guard.score(test))
