"""The fine-tuning engine and the first training objectives: hand-computed losses, toy effects, determinism,
resuming, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import oodscope
from oodscope.training import augment, finetune
from oodscope.training.engine import CHECKPOINT

# -- the losses on fixed tensors, computed by hand -------------------------------------------------------------
LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
LABELS = torch.tensor([0, 1])
OUT = torch.tensor([[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])


def _ce(rows, labels):
    return float(np.mean([math.log(sum(math.exp(v) for v in r)) - r[y] for r, y in zip(rows, labels)]))


def _lse(row):
    return math.log(sum(math.exp(v) for v in row))


def test_cross_entropy_and_oe_losses_hand_computed():
    rows, outs = LOGITS.tolist(), OUT.tolist()
    ce = _ce(rows, [0, 1])
    total, terms = oodscope.create("cross_entropy").loss(LOGITS, LABELS)
    assert float(total) == pytest.approx(ce) and terms["ce"] == pytest.approx(ce)
    uniform = np.mean([np.mean([_lse(r) - v for v in r]) for r in outs])  # mean_c -log softmax_c
    total, terms = oodscope.create("oe").loss(LOGITS, LABELS, OUT)
    assert terms["oe"] == pytest.approx(uniform) and float(total) == pytest.approx(ce + 0.5 * uniform)
    assert terms["oe"] > math.log(3) - 1e-12  # the uniform outlier row attains the minimum log(C)


def test_energy_loss_hand_computed():
    rows, outs = LOGITS.tolist(), OUT.tolist()
    m_in, m_out = -1.0, 2.0  # margins where both hinges are active on these tensors
    e_in = [-_lse(r) for r in rows]
    e_out = [-_lse(r) for r in outs]
    hinge = np.mean([max(0.0, e - m_in) ** 2 for e in e_in]) + np.mean([max(0.0, m_out - e) ** 2 for e in e_out])
    total, terms = oodscope.create("energy_oe", m_in=m_in, m_out=m_out, lam=0.1).loss(LOGITS, LABELS, OUT)
    assert terms["energy"] == pytest.approx(hinge) and hinge > 0
    assert float(total) == pytest.approx(_ce(rows, [0, 1]) + 0.1 * hinge)
    # with the paper's margins (-25, -7) these small logits only pay the outlier hinge
    _, terms = oodscope.create("energy_oe").loss(LOGITS, LABELS, OUT)
    assert terms["energy"] == pytest.approx(np.mean([max(0.0, -7 - e) ** 2 for e in e_out]) + np.mean(
        [max(0.0, e + 25) ** 2 for e in e_in]))


def test_logitnorm_loss_hand_computed():
    rows = LOGITS.tolist()
    tau = 0.04
    scaled = [[v / ((math.sqrt(sum(u * u for u in r)) + 1e-7) * tau) for v in r] for r in rows]
    total, _ = oodscope.create("logitnorm").loss(LOGITS.double(), LABELS)
    assert float(total) == pytest.approx(_ce(scaled, [0, 1]), rel=1e-6)
    # invariant to the logits' scale: growing the norm cannot lower it
    scaled_up = oodscope.create("logitnorm").loss(10 * LOGITS.double(), LABELS)[0]
    assert float(scaled_up) == pytest.approx(float(total), rel=1e-5)


def test_mixoe_loss_and_mixing_hand_computed():
    rows, mixed = LOGITS.tolist(), OUT.tolist()
    lam, n = 0.3, 3
    targets = [[lam * (c == y) + (1 - lam) / n for c in range(n)] for y in (0, 1)]
    soft = np.mean([sum(-t * (v - _lse(r)) for t, v in zip(tt, r)) for tt, r in zip(targets, mixed)])
    total, terms = oodscope.create("mixoe", beta=2.0).loss(LOGITS, LABELS, OUT, lam=lam)
    assert terms["mixed"] == pytest.approx(soft) and float(total) == pytest.approx(_ce(rows, [0, 1]) + 2.0 * soft)
    x = torch.full((2, 8, 8, 3), 200, dtype=torch.uint8)
    x_out = torch.zeros((4, 8, 8, 3), dtype=torch.uint8)
    inputs, context = oodscope.create("mixoe").batch(x, x_out, torch.Generator().manual_seed(0))
    assert inputs.shape == (4, 8, 8, 3) and torch.equal(inputs[:2], x.float())
    assert torch.allclose(inputs[2:], torch.full((2, 8, 8, 3), 200.0 * context["lam"]))  # mixup of 200 and 0
    inputs, context = oodscope.create("mixoe", mix="cutmix").batch(x, x_out, torch.Generator().manual_seed(3))
    pasted = (inputs[2:, :, :, 0] == 0).float().mean()
    assert context["lam"] == pytest.approx(1.0 - float(pasted))  # lambda = the ID share of the pixels
    with pytest.raises(ValueError, match="mix must be"):
        oodscope.create("mixoe", mix="fmix").check_params()


def test_objectives_are_one_family_of_the_registry():
    assert {"cross_entropy", "oe", "energy_oe", "logitnorm", "mixoe"} <= set(oodscope.available(family="training"))
    assert oodscope.detectors.get("oe").family == "training"
    with pytest.raises(ValueError, match="m_in must be below m_out"):
        oodscope.create("energy_oe", m_in=0.0, m_out=-1.0).check_params()


# -- the engine on a 2-D toy problem ---------------------------------------------------------------------------
def _toy(seed=0, n=400):
    """Three 2-D Gaussian classes as (N, 2, 1, 1) "images"; outliers uniform over a wide box."""
    rng = np.random.default_rng(seed)
    centres = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    y = rng.integers(0, 3, n)
    x = (centres[y] + 0.7 * rng.normal(size=(n, 2))).astype(np.float32)
    outliers = rng.uniform(-8, 8, (2000, 2)).astype(np.float32)
    far = np.abs(outliers[:, None, :] - centres[None]).max(axis=2).min(axis=1) > 2.5
    return x[:, :, None, None], y, outliers[far][:, :, None, None]


def _mlp(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))


TOY = dict(epochs=6, lr=0.05, batch_size=32, augmentation=False, progress=False, weight_decay=0.0)


def _msp(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).softmax(1).max(1).values.numpy()


def test_oe_lowers_the_outliers_max_softmax_against_the_control():
    x, y, outliers = _toy()
    control, _ = finetune(_mlp(), (x, y), "cross_entropy", **TOY)
    exposed, history = finetune(_mlp(), (x, y), "oe", outliers=outliers, **TOY)
    _, _, test_outliers = _toy(seed=1)
    assert _msp(exposed, test_outliers).mean() < _msp(control, test_outliers).mean() - 0.2
    accuracy = (exposed(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert accuracy > 0.95  # the ID task is kept
    assert len(history.epochs) == 6 and history.epochs[-1]["oe"] < history.epochs[0]["oe"]


def test_mixoe_lowers_the_outliers_max_softmax_against_the_control():
    x, y, outliers = _toy()
    control, _ = finetune(_mlp(), (x, y), "cross_entropy", **TOY)
    mixed, _ = finetune(_mlp(), (x, y), oodscope.create("mixoe", beta=5.0), outliers=outliers, **TOY)
    _, _, test_outliers = _toy(seed=1)
    assert _msp(mixed, test_outliers).mean() < _msp(control, test_outliers).mean() - 0.1
    assert (mixed(torch.from_numpy(x)).argmax(1).numpy() == y).mean() > 0.95


def test_energy_oe_separates_the_energies():
    x, y, outliers = _toy()
    model, _ = finetune(_mlp(), (x, y), oodscope.create("energy_oe", m_in=-8.0, m_out=-2.0), outliers=outliers,
                        **TOY)
    _, _, test_outliers = _toy(seed=1)
    with torch.no_grad():
        e_in = -model(torch.from_numpy(x)).logsumexp(1).numpy()
        e_out = -model(torch.from_numpy(test_outliers)).logsumexp(1).numpy()
    assert np.median(e_in) < -6 and np.median(e_out) > np.median(e_in) + 3


def test_same_seed_same_weights_and_the_callers_model_is_untouched():
    x, y, outliers = _toy()
    original = _mlp()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    rng_state = torch.random.get_rng_state()
    a, _ = finetune(original, (x, y), "oe", outliers=outliers, **TOY)
    b, _ = finetune(original, (x, y), "oe", outliers=outliers, **TOY)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in before)
    assert all(torch.equal(original.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    c, _ = finetune(original, (x, y), "oe", outliers=outliers, **{**TOY, "seed": 1})
    assert not torch.equal(a.state_dict()["1.weight"], c.state_dict()["1.weight"])


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    x, y, outliers = _toy()
    full, _ = finetune(_mlp(), (x, y), "oe", outliers=outliers, **TOY)
    from oodscope.training.objectives.oe import OutlierExposure

    original_loss, calls = OutlierExposure.loss, {"n": 0}

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 3 * 13 + 5:  # in the 4th epoch (13 steps an epoch)
            raise KeyboardInterrupt
        return original_loss(self, *args)

    monkeypatch.setattr(OutlierExposure, "loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        finetune(_mlp(), (x, y), "oe", outliers=outliers, checkpoint_dir=tmp_path, **TOY)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["epoch"] == 3
    monkeypatch.setattr(OutlierExposure, "loss", original_loss)
    resumed, history = finetune(_mlp(), (x, y), "oe", outliers=outliers, checkpoint_dir=tmp_path, **TOY)
    assert all(torch.equal(full.state_dict()[k], resumed.state_dict()[k]) for k in full.state_dict())
    assert len(history.epochs) == 6
    with pytest.raises(ValueError, match=r"objective 'oe .*', not 'energy_oe"):
        finetune(_mlp(), (x, y), "energy_oe", outliers=outliers, checkpoint_dir=tmp_path, **TOY)
    other = nn.Sequential(nn.Flatten(), nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="was written for model"):
        finetune(other, (x, y), "oe", outliers=outliers, checkpoint_dir=tmp_path, **TOY)


def test_a_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    x, y, _ = _toy()
    x = x * 1e4
    with pytest.raises(FloatingPointError, match="loss is .* at epoch"):
        finetune(_mlp(), (x, y), "cross_entropy", **{**TOY, "lr": 1e6, "epochs": 4}, checkpoint_dir=tmp_path)


def test_bad_input_is_refused_before_any_training_step(monkeypatch):
    x, y, outliers = _toy()
    from oodscope.training.objectives.oe import OutlierExposure

    monkeypatch.setattr(OutlierExposure, "loss", lambda *a: pytest.fail("a training step ran"))
    cases = [
        (dict(objective="oe"), "needs auxiliary outliers"),
        (dict(objective="oe", outliers=outliers[:0]), "non-empty batch of images"),
        (dict(objective="oe", outliers=np.zeros((5, 2, 2, 1), np.float32)), "outlier images are"),
        (dict(objective="oe", outliers=x.copy()), "are ID training images"),
        (dict(objective="cross_entropy", outliers=outliers), "uses no outliers"),
        (dict(objective="msp"), "must be a training objective"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            finetune(_mlp(), (x, y), kwargs.pop("objective"), **kwargs, **TOY)
    with pytest.raises(ValueError, match="have no labels"):
        finetune(_mlp(), x, "oe", outliers=outliers, **TOY)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        finetune(_mlp(), (x, np.r_[y[:-1], 7]), "oe", outliers=outliers, **TOY)
    with pytest.raises(ValueError, match="augmentation works on channels-last"):
        finetune(_mlp(), (np.zeros((8, 3, 4, 4), np.float32), y[:8]), "cross_entropy",
                 **{**TOY, "augmentation": True})


def test_augment_is_a_padded_crop_and_a_flip():
    batch = torch.arange(2 * 4 * 4 * 1, dtype=torch.float32).reshape(2, 4, 4, 1) + 1
    out = augment(batch, torch.Generator().manual_seed(0), padding=1)
    padded = torch.nn.functional.pad(batch, (0, 0, 1, 1, 1, 1))
    for i in range(2):
        windows = [padded[i, r:r + 4, c:c + 4] for r in range(3) for c in range(3)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(1)) for w in windows)


def test_the_fine_tuned_model_goes_back_through_extract_with_a_new_cache_key(tmp_path):
    x, y, outliers = _toy()
    model = _mlp()
    tuned, _ = finetune(model, (x, y), "oe", outliers=outliers, **TOY)
    before = oodscope.extract(model, (x, y), cache_dir=tmp_path, progress=False)
    after = oodscope.extract(tuned, (x, y), cache_dir=tmp_path, progress=False)
    assert not np.allclose(before.logits, after.logits)
    msp = oodscope.create("msp").fit(after)
    assert np.isfinite(msp.score(after)).all()


# -- the CLI: fine-tune a benchmark's model, then benchmark it --------------------------------------------------
from oodscope.cli import main  # noqa: E402
from oodscope.results_io import read_results  # noqa: E402

@pytest.fixture
def tiny_cli_bench(tmp_path):
    """A tiny benchmark folder, random ResNet-20 weights and 64 random outlier images."""
    from test_bench import _write_bench

    from oodscope.models.cifar_resnet import build_cifar_resnet

    bench = _write_bench(tmp_path / "bench", np.random.default_rng(0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weights = tmp_path / "r20.pth"
        torch.save(build_cifar_resnet("cifar10_resnet20").state_dict(), weights)
    outliers = tmp_path / "aux.npz"
    np.savez(outliers, images=np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    return bench, weights, outliers


def test_train_cli_fine_tunes_writes_weights_and_bench_results(tmp_path, capsys, tiny_cli_bench):
    bench, weights, outliers = tiny_cli_bench
    out = tmp_path / "out"
    args = ["train", str(bench), "--model", "cifar10_resnet20", "--weights", str(weights), "--method", "oe",
            "--outliers", str(outliers), "--epochs", "1", "--max-steps", "2", "--train-batch-size", "8",
            "--detectors", "msp,energy", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fine-tuned with oe: 1 epochs" in printed and "ID accuracy" in printed
    state = torch.load(out / "finetuned.pth", weights_only=True)
    original = torch.load(weights, weights_only=True)
    assert state.keys() == original.keys() and not torch.equal(state["fc.weight"], original["fc.weight"])
    meta, records = read_results(out / "results.json")
    assert meta["training"]["objective"] == "oe" and len(meta["training"]["history"]) == 1
    assert meta["model"] == "cifar10_resnet20+oe" and {r["detector"] for r in records} == {"msp", "energy"}
    assert main(args[:8] + ["--method", "oe", "--out", str(tmp_path / "x")]) == 2
    assert "needs --outliers" in capsys.readouterr().err
    assert main(args[:8] + ["--method", "msp", "--out", str(tmp_path / "x")]) == 2
    assert "not a training objective" in capsys.readouterr().err


def test_train_bench_compares_methods_with_the_control(tmp_path, capsys, tiny_cli_bench):
    bench, weights, outliers = tiny_cli_bench
    out = tmp_path / "out"
    args = ["train-bench", str(bench), "--model", "cifar10_resnet20", "--weights", str(weights), "--methods",
            "oe,logitnorm", "--outliers", str(outliers), "--epochs", "1", "--max-steps", "1", "--train-batch-size",
            "8", "--seeds", "0,1", "--detectors", "msp,energy", "--groups", "near,far",
            "--cache-dir", str(tmp_path / "cache"), "--quiet", "--out", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "cross_entropy" in table and "oe" in table and "±" in table
    meta, rows = read_results(out / "results.json")
    _, summary = read_results(out / "results.json", table="summary")
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for s in (0, 1) for m in ("cross_entropy", "oe",
                                                                                          "logitnorm")]
    assert [s["method"] for s in summary] == ["cross_entropy", "oe", "logitnorm"] and summary[0]["seeds"] == 2
    oe = [r["msp near auroc"] for r in rows if r["method"] == "oe"]
    assert summary[1]["msp near auroc"] == pytest.approx(np.mean(oe))
    assert summary[1]["msp near auroc_std"] == pytest.approx(np.std(oe))
