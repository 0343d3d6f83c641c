"""Training-time OOD II, wild data and synthesised outliers: SCONE (margin-constrained energy learning on wild data
with covariate-shifted ID and semantic outliers) and ASCOOD (virtual outliers from attribution), and the
spurious-correlation split. Losses, the augmented-Lagrangian update, the wild mixture, the attribution masks and
the virtual outliers on hand cases; fine-tuning on small images; the CLI; bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import oodscope
from oodscope.cli import main
from oodscope.data.benchmark import Benchmark, Split
from oodscope.data.corruptions import corrupt
from oodscope.data.spurious import NEUTRAL, PALETTE, paint_frame, spurious_benchmark
from oodscope.results_io import read_results
from oodscope.training import finetune
from oodscope.training.engine import CHECKPOINT
from oodscope.training.heads import energy_logistic_head, z_score
from oodscope.training.objectives.ascood import (alpha_at, gradient_mask, gradient_outliers, saliency,
                                                 shuffle_mask, shuffle_outliers, uniform_kl)
from oodscope.training.objectives.scone import (WILD_COVARIATE, WILD_ID, WILD_SEMANTIC, alm_penalty, alm_update,
                                                scone_wild_mixture)

from test_training import tiny_cli_bench  # noqa: F401  (a fixture)


def _auroc(scores_in, scores_out):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))], np.r_[scores_in, scores_out])


def _images(seed=0, n=240, size=8):
    """Three classes of 8 x 8 colour images (a dominant channel + noise); outliers: uniform noise images."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, size, size, 3))
    x[np.arange(n), :, :, y] += 150
    outliers = rng.integers(0, 256, (300, size, size, 3))
    return x.astype(np.uint8), y, outliers.astype(np.uint8)


def _prep(batch):
    return batch.permute(0, 3, 1, 2).float() / 255.0


def _cnn(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 3))


IMAGES = dict(epochs=4, lr=0.05, batch_size=32, augmentation=False, progress=False, weight_decay=0.0,
              preprocess=_prep)


def _energy(model, x):
    with torch.no_grad():
        return (-model(_prep(torch.from_numpy(x))).logsumexp(1)).numpy()


# -- SCONE: wild data ------------------------------------------------------------------------------------------
def test_scone_wild_mixture_has_the_stated_shares_of_clean_shifted_and_semantic_images():
    x, _, outliers = _images()
    wild, kind = scone_wild_mixture(x, outliers, pi_c=0.5, pi_s=0.1, corruption="contrast", severity=5, seed=3)
    n = len(x)
    assert len(wild) == n and np.bincount(kind).tolist() == [n - 120 - 24, 120, 24]
    flat = lambda a: {bytes(row) for row in a.reshape(len(a), -1)}  # noqa: E731
    assert flat(wild[kind == WILD_SEMANTIC]) <= flat(outliers)
    assert flat(wild[kind == WILD_ID]) <= flat(x)
    shifted = flat(wild[kind == WILD_COVARIATE])
    assert shifted <= flat(corrupt(x, "contrast", 5)) and not shifted & flat(x)  # a deterministic corruption
    # the clean and the shifted images come from distinct ID images
    source = {bytes(a): i for i, a in enumerate(corrupt(x, "contrast", 5).reshape(n, -1))}
    clean = {bytes(a): i for i, a in enumerate(x.reshape(n, -1))}
    used_shifted = {source[bytes(a)] for a in wild[kind == WILD_COVARIATE].reshape(-1, x[0].size)}
    used_clean = {clean[bytes(a)] for a in wild[kind == WILD_ID].reshape(-1, x[0].size)}
    assert len(used_shifted) == 120 and not used_shifted & used_clean
    again, kind_again = scone_wild_mixture(x, outliers, 0.5, 0.1, "contrast", 5, seed=3)
    assert np.array_equal(again, wild) and np.array_equal(kind_again, kind)
    assert not np.array_equal(scone_wild_mixture(x, outliers, 0.5, 0.1, "contrast", 5, seed=4)[1], kind)


@pytest.mark.parametrize("pi_c, pi_s, message", [(-0.1, 0.1, r"pi_c .* \[0, 1\]"), (0.5, 1.2, r"pi_s .* \[0, 1\]"),
                                                  (0.7, 0.4, "sum to at most 1"), (0.5, 0.0, "without semantic")])
def test_scone_refuses_bad_proportions(pi_c, pi_s, message):
    x, _, outliers = _images()
    with pytest.raises(ValueError, match=message):
        scone_wild_mixture(x, outliers, pi_c, pi_s)
    with pytest.raises(ValueError, match=message):
        oodscope.create("scone", pi_c=pi_c, pi_s=pi_s).check_params()


def test_scone_refuses_wild_data_without_outliers_and_a_margin_that_is_not_finite():
    x, y, outliers = _images()
    with pytest.raises(ValueError, match="needs auxiliary semantic outliers"):
        scone_wild_mixture(x, outliers[:0], 0.5, 0.1)
    with pytest.raises(ValueError, match="needs auxiliary outliers"):
        finetune(_cnn(), (x, y), "scone", **IMAGES)
    with pytest.raises(ValueError, match="leaves no outlier"):
        scone_wild_mixture(x, outliers, 0.5, 0.001)
    with pytest.raises(ValueError, match="only 10 given"):
        scone_wild_mixture(x, outliers[:10], 0.5, 0.1)
    for eta in (float("inf"), float("nan"), "10"):
        with pytest.raises(ValueError, match="eta .* finite"):
            finetune(_cnn(), (x, y), oodscope.create("scone", eta=eta), outliers, **IMAGES)
    for bad, message in ((dict(alpha=0.0), "alpha"), (dict(penalty_mult=0.5), "penalty_mult"),
                         (dict(corruption="fog"), "unknown corruption"), (dict(severity=6), "severity"),
                         (dict(ce_tol=0), "ce_tol")):
        with pytest.raises(ValueError, match=message):
            oodscope.create("scone", **bad).check_params()


# -- SCONE: the loss and the augmented Lagrangian ----------------------------------------------------------------
def test_alm_penalty_and_update_hand_computed():
    assert alm_penalty(0.2, 0.5, 2.0) == pytest.approx(0.5 * 0.2 + 2.0 / 2 * 0.04)  # beta c + lambda >= 0
    assert alm_penalty(-0.5, 0.3, 1.0) == pytest.approx(-0.3 ** 2 / 2)  # inactive: a constant
    c = torch.tensor(0.2, requires_grad=True)
    alm_penalty(c, 0.5, 2.0).backward()
    assert float(c.grad) == pytest.approx(0.5 + 2.0 * 0.2)  # lambda + beta c
    c = torch.tensor(-0.5, requires_grad=True)
    alm_penalty(c, 0.3, 1.0).backward()
    assert float(c.grad) == 0.0
    assert alm_update(0.2, 0.5, 2.0) == pytest.approx((0.7, 3.0))  # lambda + c; violated: beta * 1.5
    assert alm_update(-0.5, 0.3, 1.0) == pytest.approx((0.0, 1.0))  # lambda - lambda / beta; satisfied
    assert alm_update(-0.1, 0.3, 1.0) == pytest.approx((0.2, 1.0))
    assert alm_update(0.1, 0.0, 1.0, lr_lam=0.5, penalty_mult=2.0, constraint_tol=0.2) == pytest.approx((0.05, 1.0))


def _scone_with_head(w=-0.5, b=2.0, multipliers=(0.2, 0.1), penalties=(1.0, 2.0), ce_0=0.3, **params):
    objective = oodscope.create("scone", **params)
    head = energy_logistic_head(nn.Linear(2, 3), penalties).double()
    with torch.no_grad():
        head.logistic.weight.fill_(w)
        head.logistic.bias.fill_(b)
        head.multipliers.copy_(torch.tensor(multipliers))
        head.ce_reference.fill_(ce_0)
    objective.head_ = head
    return objective


def _sig(v):
    return 1 / (1 + math.exp(-v))


def _lse(row):
    return math.log(sum(math.exp(v) for v in row))


def test_scone_loss_hand_computed():
    objective = _scone_with_head()
    logits = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]
    labels = [0, 2]
    wild = [[0.1, 0.2, 0.3], [4.0, 0.0, 0.0], [-1.0, -2.0, 0.5]]
    ce = np.mean([_lse(r) - r[y] for r, y in zip(logits, labels)])
    in_term = np.mean([_sig(-0.5 * _lse(r) + 2.0) for r in logits])
    wild_term = np.mean([_sig(-(-0.5 * (_lse(r) - (-10.0)) + 2.0)) for r in wild])
    c_in, c_ce = in_term - 0.05, ce - 2.0 * 0.3
    psi = lambda c, lam, beta: lam * c + beta / 2 * c * c if beta * c + lam >= 0 else -lam ** 2 / (2 * beta)  # noqa
    hand = psi(c_ce, 0.1, 2.0) + 1.0 * wild_term + psi(c_in, 0.2, 1.0)
    total, terms = objective.loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels),
                                  torch.tensor(wild, dtype=torch.float64))
    assert float(total.detach()) == pytest.approx(hand, rel=1e-6)
    assert terms == pytest.approx({"ce": ce, "in_sigmoid": in_term, "wild_sigmoid": wild_term}, rel=1e-6)
    # a satisfied CE constraint with lambda_ce = 0 gives the classifier no gradient (the code's ALM)
    loose = _scone_with_head(multipliers=(0.2, 0.0), ce_0=10.0)
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    total, _ = loose.loss(x, torch.tensor(labels), torch.tensor(wild, dtype=torch.float64))
    in_only = _scone_with_head(multipliers=(0.2, 0.0), ce_0=10.0)
    y = x.detach().clone().requires_grad_(True)
    c = torch.sigmoid(in_only.head_.energy_logit(y.logsumexp(1))).mean() - 0.05
    total.backward()
    alm_penalty(c, 0.2, 1.0).backward()
    assert torch.allclose(x.grad, y.grad)


def test_scone_end_epoch_updates_the_multipliers_from_the_whole_training_set():
    x, y, outliers = _images()
    model = _cnn()
    objective = oodscope.create("scone", n_reference=100000)
    model = objective.adapt(model, 3, (x, y), _prep)
    head = objective.head_
    objective.prepare_outliers(model, (x, y), outliers, _prep, 0)
    with torch.no_grad():
        logits = model(_prep(torch.from_numpy(x))).double()
        ce_0 = float(nn.functional.cross_entropy(logits, torch.from_numpy(y)))
        sig = float(torch.sigmoid(head.energy_logit(logits.logsumexp(1))).mean())
    assert float(head.ce_reference) == pytest.approx(ce_0, rel=1e-6)
    assert objective.wild_ == {"wild": 240, "id": 96, "covariate": 120, "semantic": 24, "ce_reference":
                               pytest.approx(ce_0)}
    with torch.no_grad():
        head.multipliers.copy_(torch.tensor([0.3, 0.05]))
        head.penalties.copy_(torch.tensor([1.0, 2.0]))
    terms = objective.end_epoch(model, (x, y), _prep)
    c_in, c_ce = sig - 0.05, ce_0 - 2 * ce_0
    lam_in, beta_in = alm_update(c_in, 0.3, 1.0)
    lam_ce, beta_ce = alm_update(c_ce, 0.05, 2.0)
    assert terms == pytest.approx({"c_in": c_in, "c_ce": c_ce, "lambda_in": lam_in, "lambda_ce": lam_ce,
                                   "beta_in": beta_in, "beta_ce": beta_ce}, rel=1e-6)
    assert head.multipliers.tolist() == pytest.approx([lam_in, lam_ce])


def test_scone_fine_tunes_toward_its_constraints_and_deploys_the_original_architecture(tmp_path):
    x, y, outliers = _images()
    test_x, test_y, _ = _images(seed=1)
    pretrained, _ = finetune(_cnn(), (x, y), "cross_entropy", **{**IMAGES, "epochs": 6})  # SCONE fine-tunes
    tuned, history = finetune(pretrained, (x, y), "scone", outliers, **IMAGES)
    assert tuned.state_dict().keys() == _cnn().state_dict().keys()  # the logistic unit is dropped
    first, last = history.epochs[0], history.epochs[-1]
    assert {"lambda_in", "beta_in", "c_in", "c_ce", "wild_sigmoid", "in_sigmoid"} <= last.keys()
    assert 0 < last["c_in"] < first["c_in"]  # the ID false-alarm constraint: violated, less so every epoch
    assert last["beta_in"] == pytest.approx(1.5 ** 4)  # violated after each of the 4 epochs: beta *= 1.5
    assert last["lambda_in"] == pytest.approx(sum(e["c_in"] for e in history.epochs))  # lambda += c, c > 0
    assert last["c_ce"] < 0 and last["lambda_ce"] == 0.0  # the risk constraint holds: no multiplier
    with torch.no_grad():
        assert (tuned(_prep(torch.from_numpy(test_x))).argmax(1).numpy() == test_y).mean() > 0.95
    # resumable: the multipliers and penalties are in the checkpoint; 2 + 2 epochs equal 4
    from oodscope.training.objectives.scone import SCONE

    original, calls = SCONE.loss, {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 8 + 3:  # in the 3rd epoch (8 steps an epoch)
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    SCONE.loss = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(pretrained, (x, y), "scone", outliers, checkpoint_dir=tmp_path, **IMAGES)
    finally:
        SCONE.loss = original
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["epoch"] == 2
    assert {"4.multipliers", "4.penalties", "4.ce_reference"} <= saved["model"].keys()  # the head replaced "4"
    resumed, again = finetune(pretrained, (x, y), "scone", outliers, checkpoint_dir=tmp_path, **IMAGES)
    assert all(torch.equal(tuned.state_dict()[k], resumed.state_dict()[k]) for k in tuned.state_dict())
    assert again.epochs[-1]["lambda_in"] == pytest.approx(history.epochs[-1]["lambda_in"])


# -- ASCOOD ----------------------------------------------------------------------------------------------------
def _planted_linear(weights: np.ndarray) -> nn.Module:
    """``f(x) = W vec(x)``: the gradient of logit ``y`` w.r.t. ``x`` is row ``y`` of ``W`` reshaped."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(weights.shape[1], weights.shape[0], bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(weights))
    return model


def test_saliency_is_the_input_gradient_of_the_true_class_logit():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(3, 2 * 4 * 4))
    model = _planted_linear(weights).train()
    x = torch.from_numpy(rng.normal(size=(5, 2, 4, 4)))
    labels = torch.tensor([0, 2, 1, 1, 0])
    grad = saliency(model, x, labels)
    assert np.allclose(grad.numpy(), weights[labels.numpy()].reshape(5, 2, 4, 4))
    assert model.training and model[1].weight.grad is None  # mode restored, parameters' gradients untouched


def test_shuffle_selects_the_most_attributed_pixels_and_changes_the_image_exactly_there():
    c, h, w = 3, 4, 4
    weights = np.zeros((2, c, h, w))
    planted = [(0, 1), (2, 3), (3, 0), (1, 1)]  # class 0: these 4 pixels carry the class
    for i, (r, q) in enumerate(planted):
        weights[0, :, r, q] = 1.0 + i  # sum_c exp(g_c) grows with i
    weights[0, 0, 2, 2] = -5.0  # a large negative attribution is not selected by the shuffle's ranking
    weights[1, :, 0, 0] = 3.0
    model = _planted_linear(weights.reshape(2, -1))
    x = torch.arange(2 * c * h * w, dtype=torch.float64).reshape(2, c, h, w)
    labels = torch.tensor([0, 1])
    grad = saliency(model, x, labels)
    top = shuffle_mask(grad, 0.25)  # int(16 * 0.25) = 4 pixels
    assert sorted(top[0].tolist()) == sorted(r * w + q for r, q in planted)
    assert top[1][0].item() == 0  # class 1: pixel (0, 0) first
    out = shuffle_outliers(x, grad, 0.25, torch.Generator().manual_seed(0))
    flat_x, flat_out = x.reshape(2, c, -1), out.reshape(2, c, -1)
    changed = (flat_x != flat_out).any(dim=1)
    for i in range(2):
        chosen = set(top[i].tolist())
        assert set(torch.nonzero(changed[i]).squeeze(1).tolist()) <= chosen  # only selected pixels change
        assert changed[i].any()
        before = sorted(map(tuple, flat_x[i][:, sorted(chosen)].T.tolist()))
        after = sorted(map(tuple, flat_out[i][:, sorted(chosen)].T.tolist()))
        assert before == after  # a permutation of the selected pixels, all channels together


def test_gradient_outliers_move_exactly_the_top_attributed_elements_along_the_attribution():
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(2, 1 * 4 * 5))
    model = _planted_linear(weights)
    x = torch.from_numpy(rng.normal(size=(3, 1, 4, 5)))
    labels = torch.tensor([1, 0, 1])
    grad = saliency(model, x, labels)
    mask = gradient_mask(grad, 0.2)  # int(20 * 0.2) = 4 elements per image
    for i in range(3):
        top = np.argsort(-np.abs(weights[labels[i]]))[:4]
        assert sorted(torch.nonzero(mask[i].flatten()).squeeze(1).tolist()) == sorted(top.tolist())
    out = gradient_outliers(x, grad, 0.2, alpha=30.0)
    assert torch.equal(out != x, mask.bool())
    assert torch.allclose(out - x, 30.0 * grad * mask)
    # the true-class logit rises: W_y . (alpha g m) = alpha sum_m g^2 > 0
    assert (model(out).gather(1, labels[:, None]) > model(x).gather(1, labels[:, None])).all()
    assert [alpha_at(p, 30.0, 300.0) for p in (0.0, 0.5, 1.0)] == [300.0, 165.0, 30.0]


def test_ascood_loss_standardised_head_and_engine_hook_hand_computed():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    hand = np.mean([-math.log(3) - np.mean([v - _lse(r) for v in r]) for r in logits.tolist()])
    reference = nn.KLDivLoss(reduction="batchmean")(logits.log_softmax(1), torch.full((2, 3), 1 / 3).double())
    assert float(uniform_kl(logits)) == pytest.approx(hand) == pytest.approx(float(reference))
    ce = float(nn.functional.cross_entropy(logits[:1], torch.tensor([1])))
    total, terms = oodscope.create("ascood", w=0.5).loss(logits[:1], torch.tensor([1]), logits[1:])
    assert float(total) == pytest.approx(ce + 0.5 * 0.0) and terms["uniform_kl"] == pytest.approx(0.0, abs=1e-12)
    features = torch.tensor([[1.0, 2.0, 6.0]])
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)  # Bessel's correction
    assert z_score(features).tolist()[0] == pytest.approx([(v - mean) / (std + 1e-6) for v in (1, 2, 6)])
    # the engine hands extend_inputs the preprocessed ID batch and the training progress; ASCOOD appends x'
    x, y, _ = _images()
    seen = []
    from oodscope.training.objectives.ascood import ASCOOD

    class Recording(ASCOOD):
        def extend_inputs(self, model, inputs, labels, generator, progress):
            out = super().extend_inputs(model, inputs, labels, generator, progress)
            seen.append((progress, tuple(inputs.shape), tuple(out.shape)))
            return out

    tuned, history = finetune(_cnn(), (x, y), Recording(), **{**IMAGES, "epochs": 2})
    assert [s[0] for s in seen] == [0.0] * 8 + [0.5] * 8
    assert seen[0][1:] == ((32, 3, 8, 8), (64, 3, 8, 8))
    assert {"ce", "uniform_kl"} <= history.epochs[0].keys()
    # the deployed model keeps the standardised head: its logits are W (sigma z(phi)) + b
    head = tuned[4]
    phi = tuned[:4](_prep(torch.from_numpy(x[:5])))
    expected = head.classes(0.5 * z_score(phi))
    assert torch.allclose(tuned(_prep(torch.from_numpy(x[:5]))), expected)


def test_ascood_fine_tuning_flattens_the_posterior_on_its_virtual_outliers_and_keeps_the_id_accuracy():
    x, y, _ = _images()
    test_x, test_y, _ = _images(seed=1)
    pretrained, _ = finetune(_cnn(), (x, y), "cross_entropy", **{**IMAGES, "epochs": 6})
    tuned, history = finetune(pretrained, (x, y), oodscope.create("ascood", p_inv=0.25), **IMAGES)
    assert history.epochs[-1]["uniform_kl"] < 0.5 * history.epochs[0]["uniform_kl"]
    with torch.no_grad():
        assert (tuned(_prep(torch.from_numpy(test_x))).argmax(1).numpy() == test_y).mean() > 0.9


def test_ascood_refuses_bad_parameters():
    x, y, _ = _images()
    for bad, message in ((dict(ood_type="mixup"), "ood_type"), (dict(p_inv=0.0), "p_inv"),
                         (dict(p_inv=1.5), "p_inv"), (dict(w=-1.0), "w must"), (dict(sigma=0.0), "sigma"),
                         (dict(alpha_min=400.0), "alpha_min must not exceed")):
        with pytest.raises(ValueError, match=message):
            finetune(_cnn(), (x, y), oodscope.create("ascood", **bad), **IMAGES)
    with pytest.raises(ValueError, match="selects no pixel"):
        finetune(_cnn(), (x[:, :2, :2], y), oodscope.create("ascood", p_inv=0.1), **IMAGES)
    with pytest.raises(ValueError, match="uses no outliers"):
        finetune(_cnn(), (x, y), "ascood", x[:10], **IMAGES)


# -- the CLI ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["scone", "ascood"])
def test_train_cli_runs_scone_and_ascood(method, tmp_path, capsys, tiny_cli_bench):  # noqa: F811
    bench, weights, outliers = tiny_cli_bench
    out = tmp_path / "out"
    args = ["train", str(bench), "--model", "cifar10_resnet20", "--weights", str(weights), "--method", method,
            "--epochs", "1", "--max-steps", "2", "--train-batch-size", "8", "--detectors", "knn",
            "--cache-dir", str(tmp_path / "cache"), "--quiet", "--out", str(out)]
    assert main(args + (["--outliers", str(outliers)] if method == "scone" else [])) == 0
    meta, records = read_results(out / "results.json")
    own = oodscope.create(method).score
    assert {r["detector"] for r in records} == {"knn", own}
    assert meta["training"]["objective"] == method
    assert ("lambda_in" in meta["training"]["history"][0]) == (method == "scone")


# -- the spurious-correlation split -----------------------------------------------------------------------------
def test_spurious_split_correlates_the_frame_with_the_class_in_training_only():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2000, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 2000)
    ood = {"near": {"a": Split(images[:50], -np.ones(50))}, "far": {"b": Split(images[50:80], -np.ones(30))}}
    bench = Benchmark("toy", Split(images, labels), Split(images[:100], labels[:100]),
                      Split(images[:1000], labels[:1000]), ood)
    split = spurious_benchmark(bench, correlation=0.9, width=1, seed=0)

    def frame_colour(x):
        return x[:, 0, 0]

    def palette_index(colours):
        return np.argmax((colours[:, None, :] == PALETTE[None, :10]).all(axis=2), axis=1)

    train = split.train.inputs
    assert np.array_equal(train[:, 1:-1, 1:-1], images[:, 1:-1, 1:-1])  # inside the frame: unchanged
    assert (train[:, 0] == train[:, 0, :1]).all() and (train[:, :, -1] == train[:, :1, -1]).all()  # one colour
    match = palette_index(frame_colour(train)) == labels
    assert 0.88 < match.mean() < 0.92
    test_match = palette_index(frame_colour(split.test.inputs)) == labels[:1000]
    assert 0.05 < test_match.mean() < 0.16  # independent of the class: about 1 in 10
    assert set(split.ood) == {"spurious", "non-spurious"}
    assert set(split.ood["spurious"]) == {"a+class-frame", "b+class-frame"}  # names differ between the groups
    assert (frame_colour(split.ood["non-spurious"]["a+grey-frame"].inputs) == NEUTRAL).all()
    assert np.isin(palette_index(frame_colour(split.ood["spurious"]["b+class-frame"].inputs)), range(10)).all()
    with pytest.raises(ValueError, match="correlation"):
        spurious_benchmark(bench, correlation=1.5)
    with pytest.raises(ValueError, match="width"):
        paint_frame(images[:2], PALETTE[:2], width=4)
    with pytest.raises(ValueError, match="uint8"):
        paint_frame(images[:2].astype(np.float32), PALETTE[:2], width=1)
