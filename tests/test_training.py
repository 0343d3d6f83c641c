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
    with pytest.raises(ValueError, match="was written for data"):  # the same images with other labels
        finetune(_mlp(), (x, np.roll(y, 1)), "oe", outliers=outliers, checkpoint_dir=tmp_path, **TOY)


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


@pytest.mark.parametrize("method", ["dos", "mos"])
def test_train_cli_runs_the_objectives_that_change_the_head_and_adds_their_own_score(method, tmp_path, capsys,
                                                                                      tiny_cli_bench):
    bench, weights, outliers = tiny_cli_bench
    out = tmp_path / "out"
    args = ["train", str(bench), "--model", "cifar10_resnet20", "--weights", str(weights), "--method", method,
            "--epochs", "1", "--max-steps", "2", "--train-batch-size", "8", "--detectors", "msp",
            "--cache-dir", str(tmp_path / "cache"), "--quiet", "--out", str(out)]
    assert main(args + (["--outliers", str(outliers)] if method == "dos" else [])) == 0
    own = oodscope.create(method).score
    _, records = read_results(out / "results.json")
    assert {r["detector"] for r in records} == {"msp", own}
    assert all(0 <= r["auroc"] <= 100 for r in records)


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


# -- objectives that change the network: DOS, MOS, AbeT, ISH ---------------------------------------------------
def _auroc(scores_in, scores_out):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))], np.r_[scores_in, scores_out])


def _own_scores(objective, model, x, y, test_out):
    """The objective's own detector fitted on the ID rows and scored on ID and outlier rows, via extract."""
    detector = objective.score_detector()
    options = dict(use_cache=False, progress=False, layers=detector.layer_names())
    detector.fit(oodscope.extract(model, (x, y), **options))
    return (detector.score(oodscope.extract(model, x, **options)),
            detector.score(oodscope.extract(model, test_out, **options)))


def test_dos_loss_hand_computed():
    joint = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.5, 1.5, 0.0, -2.0]])  # K = 3 classes + the absent class
    outlier = torch.tensor([[0.0, 0.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    rows = joint.tolist()
    ce = _ce(rows, [0, 1])
    absent = np.mean([_lse(r) - r[3] for r in outlier.tolist()])
    total, terms = oodscope.create("dos", beta=2.0).loss(joint, LABELS, outlier)
    assert terms["ce"] == pytest.approx(ce) and terms["absent"] == pytest.approx(absent)
    assert float(total) == pytest.approx(ce + 2.0 * absent)


def test_dos_selection_takes_the_most_id_like_outlier_of_each_cluster():
    from oodscope.training.objectives.dos import diverse_selection

    # three tight clusters in feature direction (at any length: features are L2-normalised first)
    directions = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    features = np.repeat(directions, 4, axis=0) * np.tile([1.0, 2.0, 5.0, 9.0], 3)[:, None]
    features += 1e-3 * np.random.default_rng(0).normal(size=features.shape)
    absent = np.array([0.9, 0.2, 0.5, 0.7, 0.3, 0.8, 0.1, 0.95, 0.6, 0.6, 0.4, 0.05])
    assert diverse_selection(features, absent, 3, seed=0).tolist() == [1, 6, 11]  # argmin of each block of 4


def test_dos_learns_an_absent_class_that_flags_outliers():
    x, y, outliers = _toy()
    _, _, test_out = _toy(seed=1)
    control, _ = finetune(_mlp(), (x, y), "cross_entropy", **TOY)
    objective = oodscope.create("dos")
    model, history = finetune(_mlp(), (x, y), objective, outliers=outliers, **TOY)
    assert (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean() > 0.95  # K logits, the ID task kept
    assert model(torch.from_numpy(x)).shape == (len(x), 3)
    s_in, s_out = _own_scores(objective, model, x, y, test_out)
    assert np.median(s_in) < 0.1 and np.median(s_out) > 0.9  # p_(K+1): absent-class probability
    assert _auroc(s_in, s_out) > 0.95 > _auroc(-_msp(control, x), -_msp(control, test_out)) + 0.3
    assert history.epochs[-1]["absent"] < history.epochs[0]["absent"]


def test_mos_head_loss_prediction_and_others_score_hand_computed():
    from oodscope.training.heads import group_softmax_head

    groups = np.array([0, 0, 1])  # group 0: classes 0, 1 (+ others); group 1: class 2 (+ others)
    linear = nn.Linear(2, 3)
    head = group_softmax_head(linear, groups)
    with torch.no_grad():
        head.groups.weight.copy_(torch.tensor([[0.1, 0.0], [1.0, 0.0], [0.0, 1.0], [0.3, 0.3], [-1.0, 2.0]]))
        head.groups.bias.copy_(torch.tensor([0.0, 0.5, -0.5, 0.2, 0.0]))
    x = torch.tensor([[2.0, 1.0], [-1.0, 3.0]])
    z = (x @ head.groups.weight.T + head.groups.bias).tolist()  # columns: [o0, c0, c1 | o1, c2]
    g0 = [[v - _lse(r[:3]) for v in r[:3]] for r in z]
    g1 = [[v - _lse(r[3:]) for v in r[3:]] for r in z]
    objective = oodscope.create("mos", groups=(0, 0, 1))
    objective.adapt(nn.Sequential(nn.Linear(2, 3)), 3, (None, None), None)
    labels = torch.tensor([1, 2])  # sample 0: class 1 (group 0, column 2), sample 1: class 2 (group 1, column 1)
    expected = -np.mean([g0[0][2] + g1[0][0], g0[1][0] + g1[1][1]])
    head.joint = True
    total, _ = objective.loss(head(x), labels)
    assert float(total) == pytest.approx(expected, rel=1e-6)
    head.deploy()
    logits = head(x)
    np.testing.assert_allclose(logits.detach().numpy(), [[g0[i][1], g0[i][2], g1[i][1]] for i in range(2)],
                               rtol=1e-5, atol=1e-6)
    seen = {}
    head.others_probability.register_forward_hook(lambda _m, _i, out: seen.__setitem__("p", out.detach()))
    head(x)
    np.testing.assert_allclose(seen["p"].numpy(), np.exp([[g0[i][0], g1[i][0]] for i in range(2)]), rtol=1e-5)
    from oodscope import Outputs

    outputs = Outputs(logits=logits.detach().numpy(), layers={"fc.others_probability": seen["p"].numpy()})
    mos = oodscope.create("min_others").fit(outputs).score(outputs)
    np.testing.assert_allclose(mos, np.exp([min(g0[i][0], g1[i][0]) for i in range(2)]), rtol=1e-5)


def test_mos_groups_from_k_means_on_class_means_and_bad_groups_refused():
    from oodscope.training.objectives.mos import kmeans_groups

    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 0.1], [5.0, -0.1], [0.1, 5.0], [-0.1, 5.0], [0.0, 4.0]])
    labels = np.repeat(np.arange(5), 20)
    features = centres[labels] + 0.01 * rng.normal(size=(100, 2))
    assert kmeans_groups(features, labels, 5, 2).tolist() == [0, 0, 1, 1, 1]
    x, y, _ = _toy()
    with pytest.raises(ValueError, match="one group per class"):
        finetune(_mlp(), (x, y), oodscope.create("mos", groups=(0, 1)), **TOY)
    with pytest.raises(ValueError, match="n_groups"):
        finetune(_mlp(), (x, y), oodscope.create("mos", n_groups=3), **TOY)


def test_mos_fine_tuning_claims_id_rows_by_their_group():
    x, y, _ = _toy()
    _, _, test_out = _toy(seed=1)
    objective = oodscope.create("mos", n_groups=2)
    model, _ = finetune(_mlp(), (x, y), objective, **TOY)
    assert sorted(np.bincount(objective.groups_).tolist()) == [1, 2]  # k-means on the three class means
    assert (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean() > 0.95
    s_in, _ = _own_scores(objective, model, x, y, test_out)
    assert np.median(s_in) < 0.05  # every ID row is claimed by its group: a small minimum others probability


def test_abet_head_and_ablated_energy_hand_computed():
    from oodscope.training.heads import learned_temperature_head

    linear = nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]))
    head = learned_temperature_head(linear).eval()
    with torch.no_grad():
        head.temperature_logit.weight.copy_(torch.tensor([[0.5, -0.5]]))
        head.temperature_logit.bias.fill_(0.1)
    x = torch.tensor([[3.0, 4.0]])
    t = 1 / (1 + math.exp(-(0.5 * 3 - 0.5 * 4 + 0.1) / math.sqrt(1 + 1e-5)))  # BN in eval: running mean 0, var 1
    cosines = [3 / 5, 4 / 5, -7 / (5 * math.sqrt(2))]
    np.testing.assert_allclose(head(x).detach().numpy()[0], [c / t for c in cosines], rtol=1e-5)
    ablated = _lse([c / t for c in cosines])  # AbeT's ID confidence; oodscope's energy is its negative
    from oodscope import Outputs

    energy = oodscope.create("energy").fit(Outputs(logits=head(x).detach().numpy())).score(
        Outputs(logits=head(x).detach().numpy()))
    assert energy[0] == pytest.approx(-ablated, rel=1e-5)


def test_abet_learned_temperature_separates_outliers_where_the_control_does_not():
    x, y, _ = _toy()
    _, _, test_out = _toy(seed=1)
    control, _ = finetune(_mlp(), (x, y), "cross_entropy", **TOY)
    objective = oodscope.create("abet")
    model, _ = finetune(_mlp(), (x, y), objective, **TOY)
    assert (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean() > 0.95
    with pytest.warns(UserWarning, match="does not produce the model's logits"):
        s_in, s_out = _own_scores(objective, model, x, y, test_out)
    with torch.no_grad():
        c_in = -control(torch.from_numpy(x)).logsumexp(1).numpy()
        c_out = -control(torch.from_numpy(test_out)).logsumexp(1).numpy()
    assert _auroc(s_in, s_out) > _auroc(c_in, c_out) + 0.3  # far outliers: ReLU logits grow, cosine ones cannot


def test_ish_shapes_only_the_head_weight_gradient_hand_computed():
    from oodscope.training.heads import ish_linear, shaped_activations

    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 5.0, 1.0]])
    shaped = shaped_activations(a, 0.5)  # keep the top 2 of 4, times exp(s1 / s2)
    np.testing.assert_allclose(shaped.numpy(), [[0, 0, 3 * math.exp(10 / 7), 4 * math.exp(10 / 7)],
                                                [0, 0, 5 * math.exp(1.0), 1 * math.exp(1.0)]], rtol=1e-6)
    linear = nn.Linear(4, 3)
    head = ish_linear(linear, 0.5).train()
    x = a.clone().requires_grad_(True)
    out = head(x)
    np.testing.assert_allclose(out.detach().numpy(), linear(a).detach().numpy(), rtol=1e-6)  # forward unchanged
    grad = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, 1.0]])
    out.backward(grad)
    np.testing.assert_allclose(head.weight.grad.numpy(), (grad.T @ shaped).numpy(), rtol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), (grad @ linear.weight).detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(head.bias.grad.numpy(), grad.sum(0).numpy(), rtol=1e-6)


def test_ish_fine_tunes_and_deploys_a_plain_linear_head():
    x, y, _ = _toy()
    model, _ = finetune(_mlp(), (x, y), oodscope.create("ish", percentile=0.5), **TOY)
    assert type(model[3]) is nn.Linear  # the deployed model carries no training-only head
    assert (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean() > 0.95
    control, _ = finetune(_mlp(), (x, y), "cross_entropy", **TOY)
    assert not torch.equal(model[3].weight, control[3].weight)  # the shaped gradient changed the head's updates
    with pytest.raises(ValueError, match="percentile"):
        finetune(_mlp(), (x, y), oodscope.create("ish", percentile=85), **TOY)


def test_probability_layer_detectors_refuse_what_is_not_a_probability():
    from oodscope import Outputs

    train = Outputs(logits=np.zeros((4, 3)), layers={"fc.absent_probability": np.full((4, 1), 0.1)})
    detector = oodscope.create("absent_class").fit(train)
    assert detector.score(train).tolist() == [0.1] * 4
    bad = Outputs(logits=np.zeros((4, 3)), layers={"fc.absent_probability": np.full((4, 1), 3.0)})
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        detector.score(bad)
    with pytest.raises(ValueError, match="layers"):
        oodscope.create("min_others").fit(train)
