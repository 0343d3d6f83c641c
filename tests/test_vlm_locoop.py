"""LoCoOp through the training engine: the ``locoop_reg`` objective's loss by hand, the prompt learner's logits and
the engine's first step by hand on a fixed batch, the detector equal to a direct ``finetune`` call, and the same
objective on a convolutional classifier (its map's positions scored by the head). Tiny random CLIP, no weights."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import oodscope  # noqa: E402
from oodscope.training import finetune  # noqa: E402
from oodscope.training.objectives.locoop_reg import default_top_k  # noqa: E402
from oodscope.vlm.locoop import PromptLearner, pack_features  # noqa: E402
from test_training import tiny_cli_bench  # noqa: E402,F401  (a fixture)
from test_training_wild import _cnn, _prep  # noqa: E402  (the 3-class toy CNN and its preprocessing)
from test_vlm import clip, few_shot  # noqa: E402,F401  (fixtures: the tiny CLIP, 12 labelled images)

CLASSES = ["apple", "leaf", "sky"]


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _loss_by_hand(global_logits, local_logits, labels, top_k, lam):
    """Eq. 4-6 in numpy: mean CE of the global logits, minus lam times the mean entropy of the regions whose label
    is not among their top_k classes."""
    ce = np.mean([-np.log(_softmax(global_logits[i])[labels[i]]) for i in range(len(labels))])
    entropies = [-(p * np.log(p)).sum() for i in range(len(labels)) for p in _softmax(local_logits[i])
                 if labels[i] not in np.argsort(-p)[:top_k]]
    return ce - lam * (np.mean(entropies) if entropies else 0.0), len(entropies)


@pytest.fixture(scope="module")
def features(clip, few_shot):
    global_, local = clip.encode_images(few_shot[0])
    return pack_features(global_, local)


def test_the_objective_loss_equals_the_hand_computation():
    rng = np.random.default_rng(0)
    g, p, y = rng.normal(size=(4, 5)) * 3, rng.normal(size=(4, 6, 5)) * 3, np.array([0, 3, 1, 4])
    objective = oodscope.create("locoop_reg", lam=0.25, top_k=2)
    regions = nn.Module()
    regions.local_logits, regions.n_classes = nn.Identity(), 5  # a model that scores its regions itself
    objective.adapt(regions, None, (None, None), None)
    assert objective.feature_map_module(regions) == "local_logits"
    total, terms = objective.loss(torch.tensor(g), torch.tensor(y), feature_map=torch.tensor(p))
    expected, n_background = _loss_by_hand(g, p, y, 2, 0.25)
    assert 0 < n_background < 24
    np.testing.assert_allclose(float(total), expected, rtol=1e-10)
    np.testing.assert_allclose(terms["ce"] + 0.25 * terms["ood"], expected, rtol=1e-10)


def test_the_prompt_learner_gives_the_global_and_patch_logits_of_the_learned_prompts(clip, features):
    learner = PromptLearner(clip, CLASSES, n_ctx=4, seed=3)
    assert [name for name, _ in learner.named_parameters()] == ["context"]
    assert list(learner.state_dict()) == ["context"]  # CLIP and the prompt ids stay out of the checkpoint
    seen = {}
    learner.local_logits.register_forward_hook(lambda _m, _i, out: seen.__setitem__("local", out))
    with torch.no_grad():
        logits = learner(torch.from_numpy(features)).double().numpy()
        texts = clip.context_text_forward(learner.prompt_ids, learner.context).double().numpy()
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    rows = features[:, 0].astype(np.float64)
    np.testing.assert_allclose(logits, clip.logit_scale * rows[:, 0] @ texts.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(seen["local"].double().numpy(), clip.logit_scale * rows[:, 1:] @ texts.T,
                               rtol=1e-5, atol=1e-5)
    assert learner.checkpoint_key != PromptLearner(clip, ["pear", "leaf", "sky"], n_ctx=4).checkpoint_key


def test_the_engine_first_step_loss_on_a_fixed_batch_is_the_hand_computation(clip, features, few_shot):
    """One epoch of one step over the whole batch: the engine's recorded loss is Eq. 6 at the initial context,
    computed by hand from the features and the prompts' embeddings (the engine's hook carries the patch logits)."""
    labels = few_shot[1]
    learner = PromptLearner(clip, CLASSES, n_ctx=4, seed=3)
    with torch.no_grad():
        texts = clip.context_text_forward(learner.prompt_ids, learner.context).double().numpy()
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    rows = features[:, 0].astype(np.float64)
    scale = clip.logit_scale
    expected, n_background = _loss_by_hand(scale * rows[:, 0] @ texts.T, scale * rows[:, 1:] @ texts.T, labels,
                                           1, 0.25)
    assert n_background > 0
    context_before = learner.context.detach().clone()
    _, history = finetune(learner, (features, labels), oodscope.create("locoop_reg", top_k=1), epochs=1,
                          batch_size=len(labels), lr=0.01, augmentation=False, copy=False, progress=False)
    np.testing.assert_allclose(history.epochs[0]["loss"], expected, rtol=1e-5)
    assert not torch.equal(learner.context.detach(), context_before)  # the step trained the context


def test_the_detector_is_the_engine_run_with_coops_schedule(clip, few_shot, features):
    settings = dict(n_ctx=4, epochs=3, top_k=1, batch_size=4, seed=1)
    detector = oodscope.create("locoop", model=clip, **settings).fit(CLASSES, *few_shot)
    learner, history = finetune(PromptLearner(clip, CLASSES, n_ctx=4, seed=1), (features, few_shot[1]),
                                oodscope.create("locoop_reg", lam=0.25, top_k=1), epochs=3, lr=0.002,
                                batch_size=4, momentum=0.9, nesterov=False, weight_decay=5e-4, warmup_epochs=1,
                                warmup_lr=1e-5, seed=1, augmentation=False, copy=False, progress=False)
    np.testing.assert_array_equal(detector.context_, learner.context.detach().numpy())
    assert detector.history_ == [epoch["loss"] for epoch in history.epochs]


def test_the_warm_up_epoch_runs_at_its_constant_rate_then_the_cosine(monkeypatch):
    """The engine's generic warm-up: a constant ``warmup_lr`` for the first epochs, then the unchanged cosine."""
    x, y = torch.randn(8, 1, 1, 2).numpy(), np.array([0, 1] * 4)
    rates = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, inputs):
            return self.fc(inputs.flatten(1))

    model = Spy()
    original = torch.optim.SGD.step

    def record(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", record)
    finetune(model, (x, y), "cross_entropy", epochs=3, batch_size=4, lr=0.1, warmup_epochs=1, warmup_lr=1e-5,
             augmentation=False, progress=False)
    total = 6
    cosine = [0.05 * (1 + np.cos(np.pi * s / total)) for s in range(total)]
    np.testing.assert_allclose(rates, [1e-5, 1e-5] + cosine[2:], rtol=1e-12)


# -- the same objective on a convolutional classifier --------------------------------------------------------------
def _images(seed=0, n=48, size=8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, size, size, 3))
    for i in range(n):
        x[i, 2:5, 2:5, y[i]] += 190
    return x.astype(np.uint8), y


TOY = dict(epochs=2, lr=0.05, batch_size=16, augmentation=False, progress=False, preprocess=_prep)


def test_on_a_cnn_the_regions_are_the_map_positions_scored_by_the_head():
    x, y = _images()
    objective = oodscope.create("locoop_reg", top_k=1)
    model = objective.adapt(_cnn(), 3, (x, y), _prep)
    assert objective.feature_map_module(model) == "1" and objective.top_k_ == 1  # the ReLU map before pooling
    fmap = torch.randn(2, 8, 4, 4)
    local = objective.local_logits(fmap).detach().numpy()
    head = model[4]
    expected = fmap.flatten(2).transpose(1, 2).numpy() @ head.weight.detach().numpy().T + head.bias.detach().numpy()
    np.testing.assert_allclose(local, expected, rtol=1e-5, atol=1e-6)
    trained, history = finetune(_cnn(), (x, y), objective, **TOY)
    assert {"ce", "ood", "loss"} <= set(history.epochs[0]) and history.epochs[0]["ood"] < 0
    assert isinstance(trained[4], nn.Linear)  # nothing to deploy: the classifier is unchanged in form


def test_lam_zero_is_plain_cross_entropy_bit_for_bit():
    x, y = _images()
    control, _ = finetune(_cnn(), (x, y), "cross_entropy", **TOY)
    plain, _ = finetune(_cnn(), (x, y), oodscope.create("locoop_reg", lam=0.0, top_k=1), **TOY)
    for a, b in zip(control.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_settings_and_models_are_refused():
    x, y = _images()
    assert default_top_k(1000) == 200 and default_top_k(3) == 1 and default_top_k(10) == 2
    with pytest.raises(ValueError, match="top_k=3 must be smaller"):
        finetune(_cnn(), (x, y), oodscope.create("locoop_reg", top_k=3), **TOY)
    for bad in (dict(lam=-1.0), dict(top_k=0), dict(top_k=1.5), dict(feature_map=""), dict(lam=True)):
        with pytest.raises(ValueError, match="locoop_reg"):
            finetune(_cnn(), (x, y), oodscope.create("locoop_reg", **bad), **TOY)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 3))
    with pytest.raises(ValueError, match="locoop_reg: .*local_logits"):
        finetune(mlp, (x, y), oodscope.create("locoop_reg", top_k=1), **TOY)


# -- the benchmark script -------------------------------------------------------------------------------------------
def test_the_benchmark_runs_zero_and_few_shot_with_cifar100_as_id(tmp_path):
    """``benchmarks/vlm_zero_shot.py --id cifar100`` on a synthetic bench folder with the random tiny CLIP: the
    shots (1 per class) come out of the ID test file, LoCoOp and CLIPN train on them, every set gets a row."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    rng = np.random.default_rng(0)
    root = Path(__file__).resolve().parents[1]

    def write(name, n, labels):
        np.savez(tmp_path / f"{name}.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=np.asarray(labels, dtype=np.int64))

    write("cifar100_test", 300, np.tile(np.arange(100), 3))
    for name in ("cifar10_test", "tin_test", "mnist_test", "textures"):
        write(name, 6, np.full(6, -1))
    command = [sys.executable, "benchmarks/vlm_zero_shot.py", "--model", "tiny", "--data", str(tmp_path), "--id",
               "cifar100", "--detectors", "mcm,locoop,clipn", "--shots", "1", "--param", "locoop.epochs=1",
               "--param", "clipn.epochs=1", "--batch-size", "64"]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ID cifar100 (100 classes): 200 test images, 100 shots (1 per class)" in out.stdout
    for name in ("mcm", "locoop", "clipn"):
        for set_name in ("cifar10_test", "tin_test", "mnist_test", "textures", "mean near", "mean far"):
            assert any(line.startswith(f"{name} ") and set_name in line for line in out.stdout.splitlines())


def test_oodscope_train_fine_tunes_a_cifar_resnet_with_locoop_reg(tmp_path, capsys, tiny_cli_bench):  # noqa: F811
    """``oodscope train --method locoop_reg``: the regions are ``layer3``'s positions scored by ``fc``."""
    from oodscope.cli import main
    from oodscope.results_io import read_results

    bench, weights, _ = tiny_cli_bench
    out = tmp_path / "out"
    assert main(["train", str(bench), "--model", "cifar10_resnet20", "--weights", str(weights), "--method",
                 "locoop_reg", "--epochs", "1", "--max-steps", "2", "--train-batch-size", "8", "--detectors", "msp",
                 "--cache-dir", str(tmp_path / "cache"), "--quiet", "--out", str(out)]) == 0
    meta, records = read_results(out / "results.json")
    assert meta["training"]["objective"] == "locoop_reg" and {"ce", "ood"} <= set(meta["training"]["history"][0])
    assert {r["detector"] for r in records} == {"msp"} and all(0 <= r["auroc"] <= 100 for r in records)


# -- CoOp's augmentation -----------------------------------------------------------------------------------------
def test_resized_crop_boxes_follow_torchvisions_rule_and_the_crop_resamples_the_box():
    import oodscope.training.engine as engine

    top, left, height, width = engine.resized_crop_boxes(4000, 32, 48, torch.Generator().manual_seed(0))
    assert ((top >= 0) & (left >= 0) & (top + height <= 32) & (left + width <= 48)).all()
    share, aspect = (height * width).double() / (32 * 48), width.double() / height.double()
    assert share.min() >= 0.08 - 0.01 and share.max() <= 1.0 and aspect.min() >= 0.7 and aspect.max() <= 1.4
    assert share.max() > 0.8 and share.min() < 0.1  # the range is used, not one box
    # a box that cannot fit in 10 draws (scale > 1 impossible): the centre crop at the clamped ratio
    top, left, height, width = engine.resized_crop_boxes(3, 10, 40, torch.Generator(), scale=(2.0, 3.0))
    assert height.tolist() == [10] * 3 and width.tolist() == [13] * 3 and left.tolist() == [13] * 3
    x = torch.arange(2 * 4 * 6 * 3, dtype=torch.float32).reshape(2, 4, 6, 3)
    boxes = {"whole": (0, 0, 4, 6), "half": (0, 3, 4, 3)}
    for name, (t, l, h, w) in boxes.items():
        engine_boxes = engine.resized_crop_boxes
        try:
            engine.resized_crop_boxes = lambda b, *_: tuple(torch.full((b,), v) for v in (t, l, h, w))
            out = engine.augment_resized_crop(x, torch.Generator().manual_seed(3))
        finally:
            engine.resized_crop_boxes = engine_boxes
        flipped = torch.rand(2, generator=torch.Generator().manual_seed(3)) < 0.5
        for i in range(2):
            expected = x[i]
            if name == "half":  # the right half, stretched 2x along the width: columns 3..5 sampled at half steps
                cols = torch.clamp(torch.arange(6) / 2.0 + 3 - 0.25, 3, 5)
                low, frac = cols.floor().long(), (cols - cols.floor())[None, :, None]
                expected = x[i][:, low] * (1 - frac) + x[i][:, torch.clamp(low + 1, max=5)] * frac
            expected = expected.flip(1) if flipped[i] else expected
            torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-4)


def test_locoop_augment_trains_on_the_engines_resized_crops_and_equals_the_feature_path_without_them(
        clip, few_shot, monkeypatch):
    import oodscope.training.engine as engine

    settings = dict(model=clip, n_ctx=4, epochs=3, top_k=1, batch_size=4, seed=1)
    features = oodscope.create("locoop", **settings).fit(CLASSES, *few_shot)
    calls = []
    monkeypatch.setitem(engine.AUGMENTATIONS, "resized_crop", lambda batch, g: calls.append(len(batch)) or batch)
    identity = oodscope.create("locoop", augment=True, **settings).fit(CLASSES, *few_shot)
    assert sum(calls) == 3 * 12  # every image, every epoch
    np.testing.assert_allclose(identity.context_, features.context_, rtol=1e-4, atol=1e-6)  # the same learner
    monkeypatch.undo()
    augmented = oodscope.create("locoop", augment=True, **settings).fit(CLASSES, *few_shot)
    again = oodscope.create("locoop", augment=True, **settings).fit(CLASSES, *few_shot)
    np.testing.assert_array_equal(augmented.context_, again.context_)  # seeded
    assert not np.allclose(augmented.context_, features.context_, atol=1e-6)  # the crops changed the training
    assert np.isfinite(augmented.score(few_shot[0])).all()
    with pytest.raises(ValueError, match="augment must be True or False"):
        oodscope.create("locoop", augment="yes", **settings).fit(CLASSES, *few_shot)
    with pytest.raises(ValueError, match="augmentation must be True, False or one of"):
        finetune(_cnn(), (np.zeros((4, 8, 8, 3), np.uint8), np.arange(4) % 3), "cross_entropy", augmentation="mixup")
