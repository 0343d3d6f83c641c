"""Image anomaly detectors that train a network (CAE, NSA) and PatchCore's reference aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodscope.imagead import create
from oodscope.imagead.cae import ConvAutoencoderAD, PCBAutoencoder, cutout
from oodscope.imagead.patchcore import reference_patch_features


def _normal_images(rng, n, size=64):
    base = 0.5 + 0.04 * rng.standard_normal((n, 1, size, size))
    return np.clip(np.repeat(base, 3, axis=1), 0, 1).astype(np.float32)


def _with_defect(images, value=1.0, box=(20, 36, 24, 40)):
    out = images.copy()
    y0, y1, x0, x1 = box
    out[:, :, y0:y1, x0:x1] = value
    return out


# -- PatchCore's reference aggregation -------------------------------------------------------------------------
def test_reference_aggregation_is_unfold_then_adaptive_pooling():
    torch.manual_seed(0)
    a = torch.randn(2, 2, 4, 4)
    # one layer, 1x1 neighbourhood, embed_dim = channels: the features themselves, channels last
    out = reference_patch_features({"a": a}, ["a"], 1, 2)
    assert torch.allclose(out, a.permute(0, 2, 3, 1))
    # 3x3 neighbourhood of one channel, embed_dim 9: the zero-padded 3x3 patch, row-major
    out = reference_patch_features({"a": a[:, :1]}, ["a"], 3, 9)
    assert torch.allclose(out[0, 1, 1], a[0, 0, 0:3, 0:3].reshape(-1))
    assert torch.allclose(out[0, 0, 0], torch.nn.functional.pad(a[0, 0], (1, 1, 1, 1))[0:3, 0:3].reshape(-1))
    # two layers (the second at half resolution, upsampled): every layer gets half of the final dimensions
    b = torch.randn(2, 6, 2, 2)
    out = reference_patch_features({"a": a, "b": b}, ["a", "b"], 1, 2)
    up = torch.nn.functional.interpolate(b, size=(4, 4), mode="bilinear", align_corners=False)
    pooled_b = torch.nn.functional.adaptive_avg_pool1d(up.permute(0, 2, 3, 1).reshape(-1, 1, 6), 2)
    expected = torch.stack([a.mean(1).reshape(-1), pooled_b[:, 0].mean(1)], dim=1).reshape(2, 4, 4, 2)
    assert torch.allclose(out, expected, atol=1e-6)


def test_patchcore_mean_aggregation_still_available(rng):
    with pytest.raises(ValueError, match="aggregation"):
        create("patchcore", aggregation="sum").fit(_normal_images(rng, 4, 32))


# -- CAE -------------------------------------------------------------------------------------------------------
def test_cae_architecture_shapes_and_cutout():
    model = PCBAutoencoder(128, latent_dim=8, width=0.125).eval()
    x = torch.rand(2, 3, 128, 128)
    y = model(x)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1  # sigmoid output
    assert model.grid == 1  # 7 stride-2 levels: 128 -> 1
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ones = torch.ones(8, 3, 64, 64)
    a, b = cutout(ones, g1), cutout(ones, g2)
    assert torch.equal(a, b)  # seeded
    assert set(torch.unique(a).tolist()) <= {0.0, 1.0}
    assert (a == 0).any()
    with pytest.raises(ValueError, match="multiple of 128"):
        ConvAutoencoderAD(input_size=100).fit(np.zeros((2, 3, 32, 32), np.float32))


def test_cae_learning_rate_schedule():
    det = ConvAutoencoderAD(steps=1000, lr=9e-4, lr_min=1e-5)
    assert det.learning_rate(0) == pytest.approx(1e-5)
    assert det.learning_rate(3) == pytest.approx(9e-4)
    assert det.learning_rate(500) == pytest.approx(9e-4 * 0.5 * (1 + np.cos(np.pi * 497 / 997)))
    assert det.learning_rate(999) == pytest.approx(1e-5, abs=1e-6)


def test_cae_end_to_end_pasted_defect_scores_higher(rng):
    train = _normal_images(rng, 8)
    det = create("cae", input_size=128, width=0.25, latent_dim=16, steps=12, batch_size=4, feature_size=64,
                 seed=0)
    det.fit(train)
    assert np.isfinite(det.losses_).all()
    test_normal = _normal_images(rng, 3)
    scores, maps = det.score_and_map(np.concatenate([test_normal, _with_defect(test_normal)]))
    assert maps.shape == (6, 64, 64)
    assert scores[3:].min() > scores[:3].max()
    # the map is highest inside the pasted square
    inside = maps[3:, 20:36, 24:40].mean()
    outside = maps[3:, :, :8].mean()
    assert inside > outside
    # image score = the 11th largest map value (an image is flagged when > 10 pixels exceed the threshold)
    assert scores[0] == pytest.approx(np.sort(maps[0].ravel())[-11])
    again = create("cae", input_size=128, width=0.25, latent_dim=16, steps=12, batch_size=4, feature_size=64,
                   seed=0).fit(train)
    assert np.allclose(again.losses_, det.losses_)  # seeded


# -- NSA -------------------------------------------------------------------------------------------------------
def test_nsa_anomaly_generator():
    pytest.importorskip("cv2")
    from oodscope.imagead.nsa import nsa_anomaly

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    dest = np.repeat((100 + 20 * np.sin(xx / 5.0))[..., None], 3, axis=2).astype(np.uint8)
    src = np.repeat((180 + 30 * np.cos(yy / 3.0))[..., None], 3, axis=2).astype(np.uint8)
    changed_any = False
    for seed in range(8):
        image, target = nsa_anomaly(dest, src, np.random.default_rng(seed))
        image2, target2 = nsa_anomaly(dest, src, np.random.default_rng(seed))
        assert np.array_equal(image, image2) and np.array_equal(target, target2)  # deterministic
        assert image.shape == dest.shape and image.dtype == np.uint8 and target.shape == (96, 96)
        assert target.min() >= 0.0 and target.max() <= 1.0
        labelled = target > 0
        diff = np.abs(image.astype(float) - dest.astype(float)).mean(axis=2)
        if labelled.any():
            changed_any = True
            assert diff[labelled].mean() > 1.0  # the labelled region was changed by the blend
            assert (diff[labelled] > 0).mean() > 0.9
            # outside the label only the blend's rim changes a little (the label mask is median-filtered)
            assert diff[~labelled].mean() < 0.2 * diff[labelled].mean()
    assert changed_any
    with pytest.raises(ValueError, match="uint8"):
        nsa_anomaly(dest.astype(np.float32), src, rng)


def test_nsa_anomaly_survives_thin_patches_on_every_opencv():
    """Many seeded draws at 128 px include patches 3-4 pixels thin, on which OpenCV 5's seamlessClone asserts;
    such a patch must be skipped (this draw sequence crashed at its 932nd call before the fix)."""
    pytest.importorskip("cv2")
    from oodscope.imagead.nsa import nsa_anomaly

    rng = np.random.default_rng(0)
    pool = rng.integers(0, 255, (20, 128, 128, 3), dtype=np.uint8)
    blended = 0
    for t in range(1000):
        image, target = nsa_anomaly(pool[t % 20], pool[(t + 1) % 20], rng)
        blended += bool(target.max() > 0)
    assert blended > 900  # thin patches are skipped, not whole examples


def test_nsa_end_to_end_pasted_defect_scores_higher(rng):
    pytest.importorskip("cv2")
    yy, xx = np.mgrid[:64, :64]
    phases = rng.uniform(0, 2 * np.pi, size=12)
    train = np.stack([0.5 + 0.15 * np.sin(xx / 2.0 + p) for p in phases])[:, None].repeat(3, axis=1)
    train = train.astype(np.float32)
    det = create("nsa", input_size=48, steps=60, batch_size=8, decoder_width=16, lr=1e-2, seed=0).fit(train)
    assert np.isfinite(det.losses_).all() and det.losses_[-10:].mean() < det.losses_[:5].mean()
    normal = train[:3]
    defect = normal.copy()  # a patch of stripes turned by 90 degrees: a structural anomaly
    defect[:, :, 20:36, 24:40] = (0.5 + 0.15 * np.sin(yy / 2.0))[20:36, 24:40]
    scores, maps = det.score_and_map(np.concatenate([normal, defect]))
    assert maps.shape == (6, 64, 64) and maps.min() >= 0 and maps.max() <= 1
    assert scores[3:].min() > scores[:3].max()
    assert maps[3:, 20:36, 24:40].mean() > 2 * maps[:3, 20:36, 24:40].mean()
