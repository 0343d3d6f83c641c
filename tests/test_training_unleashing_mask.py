"""Unleashing Mask (UM) and UMAP: the flooded loss and its gradient on hand cases, the random estimation mask and
the estimated loss level against a numpy recomputation, the mask picking out planted atypical images, fine-tuning
that raises their losses where plain cross-entropy lowers them, UMAP's learned pruning mask (weights unchanged,
the stated share pruned), resuming with the stored level, the CLI and bad parameters."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import oodscope
from oodscope.cli import main
from oodscope.results_io import read_results
from oodscope.training import finetune
from oodscope.training.engine import CHECKPOINT
from oodscope.training.objectives import unleashing_mask as um
from oodscope.training.objectives.unleashing_mask import (estimate_loss_level, flooded, masked_copy, n_dropped,
                                                          per_sample_losses, random_keep_mask)

from test_training import tiny_cli_bench  # noqa: F401  (a fixture)


def _images(seed=0, n=240, size=8):
    """Three classes of 8 x 8 colour images (a dominant channel, +150, over noise); every 10th image is atypical:
    its own channel and the next class's both only +40, so the class must be memorised."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, size, size, 3))
    x[np.arange(n), :, :, y] += 150
    atypical = np.arange(0, n, 10)
    x[atypical] = rng.integers(0, 60, (len(atypical), size, size, 3))
    x[atypical, :, :, y[atypical]] += 40
    x[atypical, :, :, (y[atypical] + 1) % 3] += 40
    return x.astype(np.uint8), y, atypical


def _prep(batch):
    return batch.permute(0, 3, 1, 2).float() / 255.0


def _mlp(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(192, 128), nn.ReLU(), nn.Linear(128, 3))


STEPS = dict(batch_size=32, augmentation=False, progress=False, weight_decay=0.0, preprocess=_prep)


@pytest.fixture(scope="module")
def trained():
    """``(model, x, y, atypical)``: the MLP trained with cross-entropy until it fits every image (10 epochs)."""
    x, y, atypical = _images()
    model, _ = finetune(_mlp(), (x, y), "cross_entropy", epochs=10, lr=0.1, schedule="constant", **STEPS)
    return model, x, y, atypical


# -- the loss ----------------------------------------------------------------------------------------------------
def _hand_ce():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    ce = ((-2 + math.log(math.exp(2) + 2)) + (0 + math.log(2 + math.e))) / 2  # -f_y + log sum_c exp f_c
    return logits, labels, ce


def test_flooded_loss_is_the_cross_entropy_above_the_level_and_its_mirror_below():
    logits, labels, ce = _hand_ce()
    assert ce == pytest.approx((0.2395 + 1.5514) / 2, abs=1e-4)  # log(9.389) - 2, log(4.718)
    objective = oodscope.create("unleashing_mask")
    head_class, _ = um._modules()
    for level, expected, sign in ((0.5, ce, 1.0), (2.0, 2 * 2.0 - ce, -1.0)):
        objective.head_ = head_class(nn.Linear(2, 3), level)
        z = logits.clone().requires_grad_(True)
        total, terms = objective.loss(z, labels)
        assert float(total.detach()) == pytest.approx(expected, rel=1e-6)
        assert terms == pytest.approx({"ce": ce, "level": level, "ascent": float(sign < 0)}, rel=1e-6)
        total.backward()
        # d CE_B / d z = (softmax(z) - onehot(y)) / B: descended above the level, ascended (reversed) below it
        softmax_minus_onehot = (torch.softmax(logits, 1) - nn.functional.one_hot(labels, 3)) / 2
        assert torch.allclose(z.grad, sign * softmax_minus_onehot, atol=1e-7)
        assert z.grad[0, 0] * sign < 0 and z.grad[1, 2] * sign < 0  # the true-class logits: up above, down below
    assert float(flooded(torch.tensor(0.3), 0.3)) == pytest.approx(0.3)  # continuous at the level


# -- the estimated level -------------------------------------------------------------------------------------------
def test_the_random_mask_drops_int_one_minus_keep_of_each_layer_uniformly():
    mask = random_keep_mask((10, 20), 0.965, torch.Generator().manual_seed(0))
    assert int((mask == 0).sum()) == n_dropped(200, 0.965) == 7 and set(mask.unique().tolist()) == {0.0, 1.0}
    assert n_dropped(24576, 0.8) == 4915 and n_dropped(9, 1.0) == 0
    again = random_keep_mask((10, 20), 0.965, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again) and not torch.equal(mask, random_keep_mask((10, 20), 0.965,
                                                                                torch.Generator().manual_seed(1)))
    hits = sum(random_keep_mask((4, 5), 0.5, torch.Generator().manual_seed(s)) for s in range(400))
    assert ((hits / 400 - 0.5).abs() < 0.12).all()  # every entry dropped about half the time


def test_estimated_level_is_the_masked_models_mean_cross_entropy_on_a_planted_set():
    # a linear "classifier" whose logits are the inputs: sample i has logits (a_i, 0, 0), label 0, so its loss is
    # log(1 + 2 exp(-a_i)); masking the weights is recomputed by hand in numpy
    a = np.array([0.0, 1.0, 2.0, 4.0, 8.0])
    images = np.stack([a, np.zeros(5), np.zeros(5)], axis=1).astype(np.float32)
    labels = np.zeros(5, dtype=np.int64)
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3) + 0.5 * (1 - torch.eye(3)))  # off-diagonal 0.5: logits (a, a/2, a/2)
    planted = np.log1p(2 * np.exp(-a / 2))  # CE of (a, a/2, a/2) against class 0
    assert per_sample_losses(model, images, labels) == pytest.approx(planted, rel=1e-12)
    assert estimate_loss_level(model, images, labels, keep=1.0) == pytest.approx(planted.mean(), rel=1e-12)
    for seed in range(4):  # keep 0.85 drops int(0.15 * 9) = 1 of the 9 weights
        mask = random_keep_mask((3, 3), 0.85, torch.Generator().manual_seed(seed)).numpy()
        weight = model.weight.detach().numpy() * mask
        logits = images @ weight.T
        expected = (np.log(np.exp(logits).sum(1)) - logits[:, 0]).mean()
        level = estimate_loss_level(model, images, labels, keep=0.85, generator=torch.Generator().manual_seed(seed))
        assert int((mask == 0).sum()) == 1 and level == pytest.approx(expected, rel=1e-6)
    assert torch.equal(model.weight, torch.eye(3) + 0.5 * (1 - torch.eye(3)))  # the model itself untouched
    assert estimate_loss_level(model, images, labels, keep=1.0, n_reference=2) == pytest.approx(
        planted[np.sort(np.random.default_rng(0).permutation(5)[:2])].mean())


def test_the_mask_raises_the_loss_of_the_planted_atypical_images_not_of_the_typical_ones(trained):
    model, x, y, atypical = trained
    typical = np.setdiff1d(np.arange(len(x)), atypical)
    before = per_sample_losses(model, x, y, _prep)
    masked = per_sample_losses(masked_copy(model, 0.9, torch.Generator().manual_seed(0)), x, y, _prep)
    rise_atypical = masked[atypical].mean() - before[atypical].mean()
    rise_typical = masked[typical].mean() - before[typical].mean()
    assert before[atypical].mean() > 100 * before[typical].mean()  # fitted, with far smaller margins
    assert rise_atypical > 0.5 * before[atypical].mean() and rise_atypical > 20 * rise_typical
    level = estimate_loss_level(model, x, y, _prep, keep=0.9, generator=torch.Generator().manual_seed(0))
    assert level == pytest.approx(masked.mean(), rel=1e-9) and level > before.mean()
    torch.manual_seed(5)  # in adapt the mask comes from torch's global RNG, which finetune seeds
    adapted = oodscope.create("unleashing_mask", keep=0.9).adapt(copy.deepcopy(model), 3, (x, y), _prep)
    torch.manual_seed(5)
    assert float(adapted.get_submodule("3").level) == pytest.approx(estimate_loss_level(model, x, y, _prep, 0.9))


# -- fine-tuning -------------------------------------------------------------------------------------------------
def test_um_fine_tuning_raises_the_atypical_losses_toward_the_level_where_cross_entropy_lowers_them(trained):
    model, x, y, atypical = trained
    typical = np.setdiff1d(np.arange(len(x)), atypical)
    before = per_sample_losses(model, x, y, _prep)
    torch.manual_seed(0)  # the engine's seed 0: the same mask as adapt draws
    level = estimate_loss_level(model, x, y, _prep, keep=0.9)
    tuned, history = finetune(model, (x, y), oodscope.create("unleashing_mask", keep=0.9), epochs=5, lr=0.5, **STEPS)
    control, _ = finetune(model, (x, y), "cross_entropy", epochs=5, lr=0.5, **STEPS)
    after, plain = per_sample_losses(tuned, x, y, _prep), per_sample_losses(control, x, y, _prep)
    assert all(epoch["level"] == pytest.approx(level) for epoch in history.epochs)
    assert 0 < history.epochs[0]["ascent"] <= 1  # below the level: ascent steps
    assert after[atypical].mean() > 1.5 * before[atypical].mean()  # forgotten, partly
    assert plain[atypical].mean() < 0.8 * before[atypical].mean()  # the control memorises them further
    assert abs(after[typical].mean() - before[typical].mean()) < 1e-4  # the typical images keep their fit
    assert plain.mean() < before.mean() < after.mean() < level  # the training loss climbs toward the level
    assert list(tuned.state_dict()) == list(model.state_dict())  # deployed: the plain network again
    assert (tuned(_prep(torch.from_numpy(x))).argmax(1).numpy()[typical] == y[typical]).all()


def test_umap_learns_a_mask_of_the_stated_share_over_frozen_weights(trained):
    model, x, y, _ = trained
    objective = oodscope.create("umap_mask", keep=0.9, prune_keep=0.8)
    torch.manual_seed(0)
    start = objective.adapt(copy.deepcopy(model), 3, (x, y), _prep)  # the random initial mask of seed 0
    assert {n for n, p in start.named_parameters() if p.requires_grad} == {"1.scores", "3.classes.scores"}
    initial = per_sample_losses(start, x, y, _prep).mean()
    tuned, history = finetune(model, (x, y), objective, epochs=5, lr=0.5, **STEPS)
    assert list(tuned.state_dict()) == list(model.state_dict())
    for name in ("1", "3"):
        weight, original = tuned.get_submodule(name).weight, model.get_submodule(name).weight
        kept = weight != 0
        assert int((~kept).sum()) == n_dropped(original.numel(), 0.8)  # 4915 of 24576, 76 of 384
        assert torch.equal(weight[kept], original[kept])  # frozen: only the mask was learned
        assert torch.equal(tuned.get_submodule(name).bias, model.get_submodule(name).bias)
    final = per_sample_losses(tuned, x, y, _prep).mean()
    level = history.epochs[0]["level"]
    assert initial > 2 * level and abs(final - level) < 0.5 * abs(initial - level)  # the mask moved to the level
    torch.manual_seed(0)
    assert level == pytest.approx(estimate_loss_level(model, x, y, _prep, keep=0.9))


def test_a_resumed_run_continues_with_the_stored_level(tmp_path, monkeypatch, trained):
    model, x, y, _ = trained
    objective = oodscope.create("unleashing_mask", keep=0.9)
    full, full_history = finetune(model, (x, y), objective, epochs=3, lr=0.5, **STEPS)
    original_loss, calls = um.UnleashingMask.loss, {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 8 + 3:  # in the 3rd epoch (8 steps an epoch)
            raise KeyboardInterrupt
        return original_loss(self, *args, **kwargs)

    monkeypatch.setattr(um.UnleashingMask, "loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        finetune(model, (x, y), oodscope.create("unleashing_mask", keep=0.9), epochs=3, lr=0.5,
                 checkpoint_dir=tmp_path, **STEPS)
    monkeypatch.setattr(um.UnleashingMask, "loss", original_loss)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["epoch"] == 2 and float(state["model"]["3.level"]) == pytest.approx(full_history.epochs[0]["level"])
    resumed, _ = finetune(model, (x, y), oodscope.create("unleashing_mask", keep=0.9), epochs=3, lr=0.5,
                          checkpoint_dir=tmp_path, **STEPS)
    assert all(torch.equal(full.state_dict()[k], resumed.state_dict()[k]) for k in full.state_dict())
    state["model"]["3.level"] = torch.tensor(0.25, dtype=torch.float64)  # a stored level the estimate never gives
    state["epoch"] = 2
    torch.save(state, tmp_path / CHECKPOINT)
    _, history = finetune(model, (x, y), oodscope.create("unleashing_mask", keep=0.9), epochs=3, lr=0.5,
                          checkpoint_dir=tmp_path, **STEPS)
    assert history.epochs[2]["level"] == 0.25 and history.epochs[2]["ascent"] == 1.0


def test_a_given_level_is_used_as_is_without_estimating(monkeypatch, trained):
    model, x, y, _ = trained
    monkeypatch.setattr(um, "estimate_loss_level", lambda *a, **k: pytest.fail("estimated despite level="))
    _, history = finetune(model, (x, y), oodscope.create("unleashing_mask", level=0.3), epochs=1, lr=0.1, **STEPS)
    assert history.epochs[0]["level"] == 0.3 and history.epochs[0]["ascent"] == 1.0
    assert history.epochs[0]["loss"] == pytest.approx(2 * 0.3 - history.epochs[0]["ce"])


# -- bad parameters, the CLI -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, params, message", [
    ("unleashing_mask", dict(keep=0.0), r"keep .* must lie in \(0, 1\]"),
    ("unleashing_mask", dict(keep=1.5), r"keep .* must lie in \(0, 1\]"),
    ("unleashing_mask", dict(keep=True), r"keep .* must lie in \(0, 1\]"),
    ("unleashing_mask", dict(level=-0.1), "level .* finite number >= 0 or None"),
    ("unleashing_mask", dict(level=float("nan")), "level .* finite number >= 0 or None"),
    ("unleashing_mask", dict(n_reference=0), "n_reference must be a number > 0"),
    ("umap_mask", dict(prune_keep=0.0), r"prune_keep .* must lie in \(0, 1\]"),
    ("umap_mask", dict(keep=2), r"keep .* must lie in \(0, 1\]")])
def test_bad_parameters_are_refused(name, params, message, trained):
    model, x, y, _ = trained
    with pytest.raises(ValueError, match=message):
        oodscope.create(name, **params).check_params()
    with pytest.raises(ValueError, match=message):
        finetune(model, (x, y), oodscope.create(name, **params), epochs=1, **STEPS)


def test_a_model_without_a_linear_head_is_refused():
    x, y, _ = _images()
    conv = nn.Sequential(nn.Conv2d(3, 3, 8), nn.Flatten())
    with pytest.raises(ValueError, match="no nn.Linear classifier head"):
        finetune(conv, (x, y), "unleashing_mask", epochs=1, **STEPS)


@pytest.mark.parametrize("method", ["unleashing_mask", "umap_mask"])
def test_train_cli_runs_unleashing_mask(method, tmp_path, capsys, tiny_cli_bench):  # noqa: F811
    bench, weights, _ = tiny_cli_bench
    out = tmp_path / "out"
    args = ["train", str(bench), "--model", "cifar10_resnet20", "--weights", str(weights), "--method", method,
            "--epochs", "1", "--max-steps", "2", "--train-batch-size", "8", "--detectors", "knn",
            "--cache-dir", str(tmp_path / "cache"), "--quiet", "--out", str(out)]
    assert main(args) == 0
    meta, records = read_results(out / "results.json")
    assert {r["detector"] for r in records} == {"knn", "energy"}
    assert meta["training"]["objective"] == method
    epoch = meta["training"]["history"][0]
    assert epoch["level"] > 0 and 0 <= epoch["ascent"] <= 1
    state = torch.load(out / "finetuned.pth", weights_only=True)
    assert state.keys() == torch.load(weights, weights_only=True).keys()
