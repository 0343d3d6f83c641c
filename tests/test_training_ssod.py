"""SSOD (self-supervised sampling of OOD signals from the ID images' background): the sampler on a planted feature
map, the loss by hand, the engine's feature-map hook, finding the map (``layer3`` of a CIFAR ResNet), a short
fine-tuning on small images with a class-coloured square on a noise background, the deployed model, the CLI and
bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import oodscope
from oodscope.cli import main
from oodscope.results_io import read_results
from oodscope.training import finetune
from oodscope.training.heads import OutlierLogitHead, outlier_logit_head
from oodscope.training.objectives.ssod import (SSOD, find_feature_map, position_confidence, position_loss,
                                               positions, sample_positions)

from test_training import tiny_cli_bench  # noqa: F401  (a fixture)


def _auroc(scores_in, scores_out):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))], np.r_[scores_in, scores_out])


def _images(seed=0, n=240, size=8):
    """Three classes of 8 x 8 colour images: a 3 x 3 square of the class's channel (+190) at a random place on a
    dark noise background (0..59), so that the foreground is local and most positions are background."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, size, size, 3))
    top, left = rng.integers(0, size - 3, n), rng.integers(0, size - 3, n)
    for i in range(n):
        x[i, top[i]:top[i] + 3, left[i]:left[i] + 3, y[i]] += 190
    return x.astype(np.uint8), y


def _background(seed=5, n=200, size=8):
    """Background alone: the noise of :func:`_images` without a square (the OOD proxy SSOD learns from)."""
    return np.random.default_rng(seed).integers(0, 60, (n, size, size, 3)).astype(np.uint8)


def _prep(batch):
    return batch.permute(0, 3, 1, 2).float() / 255.0


def _cnn(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(16, 3))


IMAGES = dict(epochs=10, lr=0.05, batch_size=32, augmentation=False, progress=False, weight_decay=0.0,
              preprocess=_prep)


def _score(model, images):
    """The deployed model's ``ood_probability`` layer on ``images``."""
    recorded = {}
    handle = model[4].ood_probability.register_forward_hook(lambda _m, _i, out: recorded.__setitem__("p", out))
    with torch.no_grad():
        model(_prep(torch.from_numpy(images)))
    handle.remove()
    return recorded["p"].squeeze(1).numpy()


def _planted():
    """A 3 x 3 map of 3-d local features: positions 0, 1, 3, 4 (the top-left 2 x 2) are ``e_1``, positions 2, 5, 8
    (the right column) ``e_0``, positions 6, 7 zero; with the head ``10 I`` the ``e_1`` positions give class 1
    ``e^10 / (e^10 + 2) = 0.99991``, the ``e_0`` positions ``1 / (e^10 + 2) = 4.5e-5``, the zeros ``1/3``."""
    fmap = torch.zeros(3, 9)
    fmap[1, [0, 1, 3, 4]] = 1.0
    fmap[0, [2, 5, 8]] = 1.0
    classes = nn.Linear(3, 3)
    with torch.no_grad():
        classes.weight.copy_(10 * torch.eye(3))
        classes.bias.zero_()
    return fmap.reshape(1, 3, 3, 3), classes


# -- the sampler and the loss ----------------------------------------------------------------------------------
def test_sampler_takes_the_confident_foreground_as_id_and_the_confident_background_as_ood():
    one, classes = _planted()
    fmap = torch.cat([one, one])  # the same map, labelled 1 and 0: the roles of the two regions swap
    labels = torch.tensor([1, 0])
    assert positions(fmap)[0, 2].tolist() == [1.0, 0.0, 0.0]  # (h, w) = (0, 2), row-major
    confidence = position_confidence(classes, fmap, labels)
    high, low = math.exp(10) / (math.exp(10) + 2), 1 / (math.exp(10) + 2)
    assert confidence[0].tolist() == pytest.approx([high, high, low, high, high, low, 1 / 3, 1 / 3, low], rel=1e-5)
    id_mask, ood_mask = sample_positions(confidence, 0.95)
    assert torch.nonzero(id_mask[0]).squeeze(1).tolist() == [0, 1, 3, 4]
    assert torch.nonzero(ood_mask[0]).squeeze(1).tolist() == [2, 5, 8]
    assert torch.nonzero(id_mask[1]).squeeze(1).tolist() == [2, 5, 8]
    assert torch.nonzero(ood_mask[1]).squeeze(1).tolist() == [0, 1, 3, 4]
    assert not (id_mask | ood_mask)[:, [6, 7]].any()  # 1/3: neither sure nor sure-not, unused
    # gamma decides: at 0.6 the 1/3 positions are OOD (1/3 <= 0.4), at 0.99995 no position is sure enough for ID
    assert sample_positions(confidence, 0.6)[1][0].tolist() == [False, False, True, False, False, True, True, True,
                                                                True]
    assert not sample_positions(confidence, 0.99995)[0].any()


def test_ssod_loss_hand_computed_with_balanced_means_and_gradient_into_the_map():
    one, classes = _planted()
    fmap = torch.cat([one, one]).requires_grad_(True)
    labels = torch.tensor([1, 0])
    objective = SSOD(gamma=0.95, alpha=0.5)
    head = outlier_logit_head(classes)
    with torch.no_grad():
        head.outlier.weight.copy_(torch.tensor([[1.0, -1.0, 0.5]]))
        head.outlier.bias.fill_(0.2)
    objective.head_ = head
    logits = torch.tensor([[0.0, 2.0, -1.0, 9.0], [1.0, 0.0, 0.0, -9.0]])  # the last column (pooled s) is unused
    total, terms = objective.loss(logits, labels, feature_map=fmap)
    lse = lambda row: math.log(sum(math.exp(v) for v in row))  # noqa: E731
    ce = ((lse([0, 2, -1]) - 2) + (lse([1, 0, 0]) - 1)) / 2
    s_e1, s_e0 = -1.0 + 0.2, 1.0 + 0.2  # s(e_1), s(e_0)
    bce1, bce0 = (lambda s: math.log1p(math.exp(-s))), (lambda s: math.log1p(math.exp(s)))
    id_mean = (4 * bce1(s_e1) + 3 * bce1(s_e0)) / 7  # image 0: e_1 is ID (4 positions); image 1: e_0 (3)
    ood_mean = (3 * bce0(s_e0) + 4 * bce0(s_e1)) / 7
    assert terms["ce"] == pytest.approx(ce, rel=1e-6)
    assert terms["ood"] == pytest.approx(id_mean + ood_mean, rel=1e-6)
    assert float(total.detach()) == pytest.approx(ce + 0.5 * (id_mean + ood_mean), rel=1e-6)
    assert terms["id_share"] == pytest.approx(7 / 18) and terms["ood_share"] == pytest.approx(7 / 18)
    total.backward()  # end to end: the OOD head's loss reaches the local features (the sampler has no gradient)
    grad = fmap.grad.flatten(2)
    assert grad[0, :, [0, 1, 2, 3, 4, 5, 8]].abs().sum(0).min() > 0 and float(grad[:, :, [6, 7]].abs().sum()) == 0
    # no position of a kind: its mean is 0, not NaN
    empty = position_loss(torch.tensor([[0.3, -0.2]]), torch.tensor([[False, False]]), torch.tensor([[False, True]]))
    assert float(empty) == pytest.approx(bce0(-0.2))
    assert float(position_loss(torch.zeros(1, 2), torch.zeros(1, 2, dtype=bool), torch.zeros(1, 2, dtype=bool))) == 0


# -- the map ---------------------------------------------------------------------------------------------------
def test_the_feature_map_is_the_last_module_whose_global_average_is_the_heads_input():
    from oodscope.models.cifar_resnet import build_cifar_resnet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        resnet = build_cifar_resnet("cifar10_resnet20")
    images = torch.rand(4, 3, 32, 32)
    assert find_feature_map(resnet, images, "fc") == "layer3"  # the CIFAR ResNet's last map, 8 x 8 x 64
    assert find_feature_map(resnet, images, "fc", "layer3") == "layer3"
    cnn = _cnn()
    assert find_feature_map(cnn, torch.rand(2, 3, 8, 8), "4") == "1"  # the ReLU's output, not the conv's
    with pytest.raises(ValueError, match="global average is the input of the classifier '4'.*found: '1'"):
        find_feature_map(cnn, torch.rand(2, 3, 8, 8), "4", "0")
    with pytest.raises(ValueError, match="no module 'layer9'"):
        find_feature_map(resnet, images, "fc", "layer9")
    flat = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3))
    with pytest.raises(ValueError, match="global average pooling before its head"):
        find_feature_map(flat, torch.rand(2, 3, 8, 8), "3")


def test_engine_hands_the_maps_output_to_the_loss_with_its_gradient():
    x, y = _images()
    seen = []

    class Recording(SSOD):
        def loss(self, logits, labels, outlier_logits=None, feature_map=None, **context):
            seen.append((tuple(feature_map.shape), feature_map.requires_grad, sorted(context)))
            return super().loss(logits, labels, outlier_logits, feature_map=feature_map, **context)

    finetune(_cnn(), (x, y), Recording(), **{**IMAGES, "epochs": 1, "max_steps": 2})
    assert seen == [((32, 16, 8, 8), True, [])] * 2  # the ReLU's map of the ID rows; no other context
    # the hook's general form: a step with a second part gets it as outlier_feature_map
    from oodscope.training.engine import _FeatureCapture

    objective = SSOD()
    objective.map_name_ = "1"
    model = _cnn()
    with _FeatureCapture(model, objective) as captured:
        model(torch.rand(5, 3, 8, 8))
        split = captured.split(3, 5)
    assert split["feature_map"].shape == (3, 16, 8, 8) and split["outlier_feature_map"].shape == (2, 16, 8, 8)
    assert _FeatureCapture(model, oodscope.create("oe")).split(3, 5) == {}  # other objectives: nothing


# -- fine-tuning ---------------------------------------------------------------------------------------------------
def test_ssod_fine_tuning_lowers_its_loss_learns_the_background_and_deploys_k_class_logits():
    x, y = _images()
    test_x, test_y = _images(seed=1)
    pretrained, _ = finetune(_cnn(), (x, y), "cross_entropy", **{**IMAGES, "epochs": 12, "lr": 0.2})
    objective = oodscope.create("ssod")
    tuned, history = finetune(pretrained, (x, y), objective, **IMAGES)
    first, last = history.epochs[0], history.epochs[-1]
    assert last["loss"] < 0.6 * first["loss"] and last["ood"] < 0.6 * first["ood"]
    assert first["id_share"] > 0.2 and first["ood_share"] > 0.02  # both kinds are sampled from the ID images
    assert objective.map_name_ == "1" and objective.score_detector().layer_names() == ["4.ood_probability"]
    head = tuned[4]
    assert isinstance(head, OutlierLogitHead) and not head.joint and not tuned.training
    inputs = _prep(torch.from_numpy(test_x))
    with torch.no_grad():
        logits = tuned(inputs)
        # the class logits are those of the original architecture with the tuned weights
        plain = _cnn()
        plain.load_state_dict({**{k: v for k, v in tuned.state_dict().items() if not k.startswith("4.")},
                               "4.weight": head.classes.weight, "4.bias": head.classes.bias})
        assert torch.allclose(logits, plain(inputs)) and logits.shape == (len(test_x), 3)
        assert (logits.argmax(1).numpy() == test_y).mean() > 0.95
        s = head.outlier(tuned[:4](inputs)).squeeze(1).numpy()
    p_in = _score(tuned, test_x)
    assert np.allclose(p_in, 1 / (1 + np.exp(s)), atol=1e-6)  # ood_probability = sigmoid(-s) = 1 - P(x in S_ID | x)
    # the OOD head separates images of background alone (no square) from the ID test images
    assert _auroc(p_in, _score(tuned, _background())) > 0.9


def test_ssod_refuses_bad_parameters():
    x, y = _images(n=40)
    for bad, message in ((dict(gamma=0.5), "gamma"), (dict(gamma=1.0), "gamma"), (dict(gamma=True), "gamma"),
                         (dict(alpha=0.0), "alpha must"), (dict(alpha=-1.0), "alpha must"),
                         (dict(feature_map=""), "feature_map must"), (dict(feature_map=3), "feature_map must"),
                         (dict(feature_map="9"), "no module '9'")):
        with pytest.raises(ValueError, match=message):
            finetune(_cnn(), (x, y), oodscope.create("ssod", **bad), **IMAGES)
    flat = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3))
    with pytest.raises(ValueError, match="needs a convolutional network"):
        finetune(flat, (x, y), "ssod", **IMAGES)
    with pytest.raises(ValueError, match="uses no outliers"):
        finetune(_cnn(), (x, y), "ssod", x[:10], **IMAGES)


# -- the CLI -------------------------------------------------------------------------------------------------------
def test_train_cli_runs_ssod_and_adds_its_ood_probability(tmp_path, capsys, tiny_cli_bench):  # noqa: F811
    bench, weights, _ = tiny_cli_bench
    out = tmp_path / "out"
    args = ["train", str(bench), "--model", "cifar10_resnet20", "--weights", str(weights), "--method", "ssod",
            "--epochs", "1", "--max-steps", "2", "--train-batch-size", "8", "--detectors", "knn",
            "--cache-dir", str(tmp_path / "cache"), "--quiet", "--out", str(out)]
    assert main(args) == 0
    meta, records = read_results(out / "results.json")
    assert {r["detector"] for r in records} == {"knn", "ood_probability"}
    assert meta["training"]["objective"] == "ssod"
    assert {"ce", "ood", "id_share", "ood_share"} <= meta["training"]["history"][0].keys()
    state = torch.load(out / "finetuned.pth", weights_only=True)
    assert {"fc.classes.weight", "fc.outlier.weight", "layer3.2.conv2.weight"} <= state.keys()
