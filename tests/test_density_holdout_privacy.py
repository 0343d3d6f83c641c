"""The density protocol's holdout-retraining and DP-training privacy metrics (Carlini et al. 2019) and the DP-SGD
they use (oodscope.training.dpsgd): divergences, clipping and noise, per-sample gradients and the accountant by
hand, a planted atypical example, and CLI runs on a tiny benchmark."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oodscope.cli import main
from oodscope.protocols import density
from oodscope.protocols.density import chosen_metrics, holdout_split, strongest_private_level, symmetric_kl
from oodscope.results_io import read_results
from oodscope.training.dpsgd import clip_and_noise, dp_epsilon, per_sample_gradients, train_dp_linear


def test_symmetric_kl_hand_computed():
    before = np.log(np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
    after = np.log(np.array([[0.9, 0.1], [0.9, 0.1], [0.8, 0.2]])) + 3.0  # a shift of the logits changes nothing
    kl_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    # (0.2, 0.8) vs (0.8, 0.2): each direction is 0.2 log(1/4) + 0.8 log 4 = 0.6 log 4
    expected = [kl_pq + kl_qp, 0.0, 1.2 * math.log(4)]
    np.testing.assert_allclose(symmetric_kl(before, after), expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(symmetric_kl(after, before), expected, rtol=1e-12, atol=1e-15)  # symmetric
    with pytest.raises(ValueError, match="one shape"):
        symmetric_kl(before, after[:2])
    with pytest.raises(ValueError, match="NaN or inf"):
        symmetric_kl(before, np.where(after > 2, np.nan, after))


def test_holdout_split_is_seeded_disjoint_and_complete():
    measured, held_out = holdout_split(11, seed=3)
    assert len(measured) == 6 and len(held_out) == 5 and not set(measured) & set(held_out)
    assert sorted(np.concatenate([measured, held_out]).tolist()) == list(range(11))
    assert all(np.array_equal(a, b) for a, b in zip((measured, held_out), holdout_split(11, seed=3)))
    assert not np.array_equal(measured, holdout_split(11, seed=4)[0])
    with pytest.raises(ValueError, match="at least 2"):
        holdout_split(1, seed=0)


def test_holdout_retraining_moves_a_planted_atypical_example_most():
    import torch

    from oodscope.training import finetune

    rng = np.random.default_rng(0)

    def blobs(n):  # two classes of 4-pixel images, pixel values around -1 (class 0) or +1 (class 1)
        labels = rng.integers(0, 2, n)
        x = (2.0 * labels - 1)[:, None] + 0.3 * rng.normal(size=(n, 4))
        return x.reshape(n, 1, 2, 2).astype(np.float32), labels

    measured_x, measured_y = blobs(40)
    measured_x[0], measured_y[0] = -0.3, 1  # planted: on class 0's side of the boundary, labelled 1
    held_x, held_y = blobs(200)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    model, _ = finetune(net, (measured_x, measured_y), "cross_entropy", epochs=200, lr=0.1, batch_size=40,
                        schedule="constant", augmentation=False, progress=False)  # fits (memorises) the plant
    with torch.no_grad():
        before = model(torch.from_numpy(measured_x)).numpy()
    assert before[0].argmax() == 1
    tuned, history = density.holdout_retrain(model, held_x, held_y, None, progress=False,
                                             schedule={"epochs": 5, "max_steps": None, "lr": 0.1,
                                                       "batch_size": 32})
    with torch.no_grad():
        after = tuned(torch.from_numpy(measured_x)).numpy()
    change = symmetric_kl(before, after)
    assert len(history.seconds) == 5
    assert change.argmax() == 0 and change[0] > 10 * np.median(change[1:])  # the plant moves most


def test_clip_and_noise_hand_checked():
    import torch

    grads = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [-6.0, 8.0]], dtype=torch.float64)
    # norms 5, 0.5, 0, 10; clipped to C = 1: (0.6, 0.8), (0.3, 0.4) unchanged, (0, 0), (-0.6, 0.8)
    clipped = torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0], [-0.6, 0.8]], dtype=torch.float64)
    np.testing.assert_allclose(clip_and_noise(grads, 1.0, 0.0).numpy(), clipped.mean(0).numpy(), rtol=1e-12)
    for row in grads:
        assert float(clip_and_noise(row[None], 1.0, 0.0).norm()) <= 1.0 + 1e-12
    # with noise, C = 2: rows scaled by min(1, C / norm) = 0.4, 1, 1, 0.2, summed, plus sigma C z, over L = 8
    z = torch.randn(2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    noisy = clip_and_noise(grads, 2.0, 1.5, torch.Generator().manual_seed(3), denominator=8)
    scale = torch.tensor([[0.4], [1.0], [1.0], [0.2]], dtype=torch.float64)
    np.testing.assert_allclose(noisy.numpy(), (((grads * scale).sum(0) + 1.5 * 2.0 * z) / 8).numpy(), rtol=1e-12)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([clip_and_noise(grads, 1.0, 2.0, generator, denominator=4) for _ in range(4000)])
    assert float((draws - clipped.mean(0)).std()) == pytest.approx(2.0 * 1.0 / 4, rel=0.05)  # sigma C / L
    for kwargs, message in (({"max_norm": 0.0}, "max_norm"), ({"noise_multiplier": -1.0}, "noise_multiplier")):
        with pytest.raises(ValueError, match=message):
            clip_and_noise(grads, **{"max_norm": 1.0, "noise_multiplier": 0.0, **kwargs})
    with pytest.raises(ValueError, match="gradient rows"):
        clip_and_noise(grads[0], 1.0, 0.0)
    with pytest.raises(ValueError, match="denominator"):
        clip_and_noise(grads[:0], 1.0, 1.0)


def test_per_sample_gradients_equal_the_softmax_regression_formula():
    import torch

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 4).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2])
    rows = per_sample_gradients(layer, x, y)
    # d CE / d logits = softmax - onehot; dW = that outer x, db = that; rows: W (4 x 3) flattened, then b
    delta = torch.softmax(layer(x), dim=1).detach() - torch.nn.functional.one_hot(y, 4).double()
    expected = torch.cat([(delta[:, :, None] * x[:, None, :]).flatten(1), delta], dim=1)
    np.testing.assert_allclose(rows.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_of_a_network_equal_one_backward_pass_per_sample():
    import torch

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(6, 5), torch.tensor([0, 2, 1, 1, 0, 2])
    rows = per_sample_gradients(net, x, y)
    for i in range(6):
        loss = torch.nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1])
        expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(net.parameters()))])
        np.testing.assert_allclose(rows[i].numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")  # opacus' hooks on inputs without grad
def test_per_sample_gradients_equal_opacus_grad_samples():
    pytest.importorskip("opacus")
    import torch
    from opacus import GradSampleModule

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(7, 5), torch.tensor([0, 2, 1, 1, 0, 2, 2])
    ours = per_sample_gradients(net, x, y)
    wrapped = GradSampleModule(net, loss_reduction="sum")  # hooks on net: one gradient per sample and parameter
    torch.nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
    theirs = torch.cat([p.grad_sample.flatten(1) for p in net.parameters()], dim=1)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-7)


def test_train_dp_linear_is_seeded_and_noise_costs_accuracy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    features = np.eye(3)[labels] * 2 + 0.8 * rng.normal(size=(600, 3))

    def accuracy(head):
        import torch

        with torch.no_grad():
            return float(np.mean(head(torch.as_tensor(features, dtype=torch.float32)).argmax(1).numpy() == labels))

    quiet = train_dp_linear(features, labels, 3, 0.5, lot_size=60, epochs=3, progress=False)
    again = train_dp_linear(features, labels, 3, 0.5, lot_size=60, epochs=3, progress=False)
    assert np.array_equal(quiet.weight.detach().numpy(), again.weight.detach().numpy())  # seeded
    loud = [accuracy(train_dp_linear(features, labels, 3, 500.0, lot_size=60, epochs=3, seed=s, progress=False))
            for s in range(3)]
    assert accuracy(quiet) > 0.85 and np.mean(loud) < accuracy(quiet) - 0.2
    with pytest.raises(ValueError, match="NaN"):
        train_dp_linear(np.full((4, 2), np.nan), np.zeros(4, int), 2, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        train_dp_linear(features[:4, :2], np.array([0, 1, 2, 0]), 2, 1.0)
    with pytest.raises(ValueError, match="lot_size"):
        train_dp_linear(features, labels, 3, 1.0, lot_size=0)


def test_dp_epsilon_lies_between_the_exact_gaussian_mechanism_and_the_classical_rdp_bound():
    pytest.importorskip("opacus")
    from scipy.optimize import brentq
    from scipy.stats import norm

    from oodscope.training.dpsgd import RDP_ORDERS

    sigma, delta = 2.0, 1e-5
    got = dp_epsilon(sigma, 1.0, 1, delta)  # one full-batch step: the Gaussian mechanism, sensitivity 1
    # Balle & Wang 2018, Theorem 8: the exact epsilon solves
    # delta = Phi(1 / (2 sigma) - eps sigma) - e^eps Phi(-1 / (2 sigma) - eps sigma)
    exact = brentq(lambda e: norm.cdf(0.5 / sigma - e * sigma) - math.exp(e) * norm.cdf(-0.5 / sigma - e * sigma)
                   - delta, 1e-6, 50)
    # Mironov 2017, Proposition 3 with the Gaussian's RDP alpha / (2 sigma^2)
    classical = min(a / (2 * sigma ** 2) + math.log(1 / delta) / (a - 1) for a in RDP_ORDERS)
    assert exact <= got <= classical
    assert dp_epsilon(4.0, 0.02, 500, delta) < dp_epsilon(1.0, 0.02, 500, delta)  # more noise: more private
    assert dp_epsilon(1.0, 0.02, 50, delta) < dp_epsilon(1.0, 0.02, 500, delta)  # more steps: less private
    assert dp_epsilon(0.0, 0.02, 50, delta) == math.inf
    with pytest.raises(ValueError, match="sample_rate"):
        dp_epsilon(1.0, 0.0, 10, delta)


def test_strongest_private_level_hand_computed():
    # levels sigma 1, 2, 4; 2 models each; examples: always right, right up to sigma 2, right in 1 of 2 models at
    # sigma 1 only, right only at sigma 4 (not monotone: the largest passing level counts)
    correct = np.array([[[1, 1, 1, 0], [1, 1, 0, 0]],
                        [[1, 1, 0, 0], [1, 1, 0, 0]],
                        [[1, 0, 0, 1], [1, 0, 0, 1]]], dtype=bool)
    np.testing.assert_array_equal(strongest_private_level(correct, (1.0, 2.0, 4.0)), [4.0, 2.0, 0.0, 4.0])
    np.testing.assert_array_equal(strongest_private_level(correct, (1.0, 2.0, 4.0), share=0.5), [4.0, 2.0, 1.0, 4.0])
    with pytest.raises(ValueError, match="levels, models, N"):
        strongest_private_level(correct[:2], (1.0, 2.0, 4.0))


def test_density_metrics_option_is_checked():
    assert chosen_metrics(None, ensemble=False) == ("confidence", "boundary")
    assert chosen_metrics(None, ensemble=True) == ("confidence", "boundary", "agreement")
    assert chosen_metrics("holdout, privacy,holdout", ensemble=False) == ("holdout", "privacy")
    with pytest.raises(ValueError, match="choose from confidence, boundary, agreement, holdout, privacy"):
        chosen_metrics("confidence,memorisation", ensemble=False)
    with pytest.raises(ValueError, match="--ensemble"):
        chosen_metrics("agreement", ensemble=False)


@pytest.fixture
def tiny_resnet_bench(tmp_path, rng):
    """A tiny 32 x 32 benchmark folder (80 train images) and randomly initialised ResNet-20 weights (seed 0)."""
    import torch

    from oodscope.models.cifar_resnet import build_cifar_resnet
    from test_bench import _write_bench

    bench = _write_bench(tmp_path / "bench", rng, n_train=80, n_test=40)
    torch.manual_seed(0)
    torch.save(build_cifar_resnet("cifar10_resnet20").state_dict(), tmp_path / "w.pth")
    return bench, tmp_path / "w.pth"


def _bench(bench, weights, tmp_path, *extra: str) -> int:
    return main(["bench", str(bench), "--model", "cifar10_resnet20", "--weights", str(weights), "--quiet",
                 "--no-cache", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), *extra])


def test_bench_runs_holdout_and_privacy_metrics_on_a_tiny_bench(tiny_resnet_bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(density, "HOLDOUT_SCHEDULE", {"epochs": 1, "max_steps": 2, "lr": 0.01, "batch_size": 16})
    monkeypatch.setattr(density, "PRIVACY", {**density.PRIVACY, "noise_multipliers": (0.5, 4.0), "models": 2,
                                             "epochs": 1, "lot_size": 16})
    monkeypatch.setattr(density, "N_IMAGES", 16)
    assert _bench(*tiny_resnet_bench, tmp_path, "--detectors", "msp,knn", "--protocol", "density",
                  "--density-metrics", "confidence,holdout,privacy") == 0
    printed = capsys.readouterr().out
    assert "holdout: fine-tuned on the held-out 40 of 80" in printed and "privacy: DP-SGD" in printed
    records = [r for r in read_results(tmp_path / "out" / "results.json")[1] if r.get("setting") == "density"]
    assert {r["metric_pair"] for r in records if r.get("metric_pair")} == {
        "confidence~holdout", "confidence~privacy", "holdout~privacy"}
    assert {(r["detector"], r["metric"]) for r in records if r.get("metric")} == {
        (d, m) for d in ("msp", "knn") for m in ("confidence", "holdout", "privacy")}
    first = records[0]
    assert first["n_train"] == 16 and first["privacy_noise_multipliers"] == [0.5, 4.0]
    assert len(first["privacy_train_accuracy"]) == 2 and all(0 <= a <= 100 for a in first["privacy_train_accuracy"])
    if first["privacy_epsilons"] is not None:
        assert first["privacy_epsilons"][0] > first["privacy_epsilons"][1] > 0
    assert all(np.isnan(r["spearman"]) or -1 <= r["spearman"] <= 1 for r in records)
    assert len(list((tmp_path / "cache" / "density").glob("*-holdout-seed0/finetune.pt"))) == 1  # resumable
    assert _bench(*tiny_resnet_bench, tmp_path, "--protocol", "density", "--density-metrics", "nope") == 2
    assert "choose from" in capsys.readouterr().err
    assert _bench(*tiny_resnet_bench, tmp_path, "--protocol", "density", "--density-metrics", "agreement") == 2
    assert "--ensemble" in capsys.readouterr().err
