"""Evaluation protocols (failure detection, OOD unit tests, scaled inputs, density metrics): hand-computed metrics
and CLI runs."""

from __future__ import annotations

import numpy as np
import pytest

from oodscope.cli import main
from oodscope.protocols import parse
from oodscope.protocols.failure import failure_metrics
from oodscope.protocols.unit_tests import TESTS, make_test
from oodscope.results_io import read_results


def test_failure_metrics_hand_computed():
    # accept order by score: 0.1 (ok), 0.2 (ok), 0.8 (OOD), 0.9 (misclassified): risks 0, 0, 1/3, 2/4
    values = failure_metrics(np.array([0.1, 0.2, 0.9]), np.array([0, 0, 1]), np.array([0.8]))
    assert values["auroc"] == pytest.approx(100.0)
    assert values["aurc"] == pytest.approx(100 * (0 + 0 + 1 / 3 + 1 / 2) / 4)
    assert values["eaurc"] == pytest.approx(0.0)  # the perfect ranking is the oracle's
    assert values["reject_share"] == pytest.approx(50.0)
    # swap: the misclassified sample is accepted first -> risks 1, 1/2, 1/3 (0.2 ok), 2/4
    worse = failure_metrics(np.array([0.1, 0.2, 0.05]), np.array([0, 0, 1]), np.array([0.8]))
    assert worse["aurc"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert worse["auroc"] == pytest.approx(50.0)  # pairs: (0.05 vs 0.1, 0.2) lose, (0.8 vs both) win
    with pytest.raises(ValueError, match="accept and samples to reject"):
        failure_metrics(np.array([0.1]), np.array([1]), np.array([0.5]))


def test_unit_test_sets_are_what_they_say():
    rng = np.random.default_rng(0)
    id_images = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    for name in TESTS:
        images = make_test(name, id_images, 7, seed=1)
        assert images.shape == (7, 16, 16, 3) and images.dtype == np.uint8, name
        np.testing.assert_array_equal(images, make_test(name, id_images, 7, seed=1))  # seeded
    constant = make_test("constant", id_images, 7)
    assert (constant == constant[:, :1, :1]).all()
    assert set(np.unique(make_test("rademacher", id_images, 7))) == {0, 255}
    inverted = make_test("inverted_id", id_images, 7).reshape(7, -1)
    assert all(any((255 - row == im.ravel()).all() for im in id_images) for row in inverted)
    shuffled = make_test("shuffled_patches_id", id_images, 7)
    assert all(any(np.array_equal(np.sort(s.ravel()), np.sort(im.ravel())) for im in id_images) for s in shuffled)
    assert not any(np.array_equal(s, im) for s in shuffled for im in id_images)
    assert len(np.unique(make_test("blobs", id_images, 1).reshape(-1, 3), axis=0)) <= 2  # two colours
    with pytest.raises(ValueError, match="unknown protocol"):
        parse("failure,nope")


def test_bench_runs_failure_and_scaling_protocols_on_digits(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--detectors", "msp,energy,mahalanobis", "--protocol", "failure,scaling", "--quiet",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "failure detection" in printed and "inputs scaled by alpha" in printed
    _, records = read_results(out / "results.json")
    failure = [r for r in records if r.get("setting") == "failure"]
    assert {r["detector"] for r in failure} == {"msp", "energy", "mahalanobis"}
    assert all(0 <= r["aurc"] <= 100 and 0 <= r["eaurc"] <= r["aurc"] for r in failure)
    scaling = {(r["detector"], r["alpha"]): r for r in records if r.get("setting") == "scaling"}
    assert scaling[("msp", 1.0)]["auroc"] == pytest.approx(50.0)  # the clean images against themselves
    # far from the data a ReLU net is confident: MSP accepts the scaled inputs, Mahalanobis flags them all
    assert scaling[("msp", 1000.0)]["auroc"] < 5 and scaling[("msp", 1000.0)]["flagged"] < 1
    assert scaling[("mahalanobis", 1000.0)]["auroc"] > 99 and scaling[("mahalanobis", 1000.0)]["flagged"] > 99
    assert main(["bench", "--protocol", "unit-tests", "--detectors", "msp", "--quiet", "--out", str(out)]) == 2
    assert "uint8" in capsys.readouterr().err  # digits are not uint8 RGB images


def test_density_metrics_hand_computed():
    from oodscope.protocols.density import mean_pairwise_js, true_label_confidence

    p, q = np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]])
    # m = (0.75, 0.25): KL(p||m) = log(4/3), KL(q||m) = 0.5 log(2/3) + 0.5 log 2; JS = their mean
    expected = 0.5 * np.log(4 / 3) + 0.5 * (0.5 * np.log(2 / 3) + 0.5 * np.log(2))
    assert mean_pairwise_js([p, q])[0] == pytest.approx(expected, rel=1e-12)
    assert mean_pairwise_js([p, p, p])[0] == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_js([p, q, q])[0] == pytest.approx(2 * expected / 3, rel=1e-12)  # pairs (p,q) twice, (q,q)
    with pytest.raises(ValueError, match="two models"):
        mean_pairwise_js([p])
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    np.testing.assert_allclose(true_label_confidence(logits, np.array([1, 2])), [0.2, 0.8], rtol=1e-12)


def test_boundary_distance_is_exact_for_a_linear_model():
    import torch

    from oodscope.protocols.density import boundary_distance

    rng = np.random.default_rng(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 4).double()
    x, y = rng.normal(size=(30, 5)), rng.integers(0, 4, 30)
    W, b = model.weight.detach().numpy(), model.bias.detach().numpy()
    logits = x @ W.T + b
    others = np.where(np.eye(4, dtype=bool)[y], -np.inf, logits).argmax(axis=1)
    exact = (logits[np.arange(30), y] - logits[np.arange(30), others]) / np.linalg.norm(W[y] - W[others], axis=1)
    model.float()
    got = boundary_distance(model, x.astype(np.float32), y, preprocess=None, batch_size=7)
    np.testing.assert_allclose(got, exact, rtol=1e-4)
    assert (got[logits.argmax(axis=1) != y] < 0).all()  # misclassified: on the wrong side of the boundary
    raw = boundary_distance(model, x.astype(np.float32) * 255, y, preprocess=lambda t: t / 255, scale=255)
    np.testing.assert_allclose(raw, exact, rtol=1e-4)  # in units of the raw input / scale


def test_bench_runs_the_density_protocol_with_an_ensemble(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--detectors", "msp,knn", "--protocol", "density", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "density, tails and outliers" in printed and "no --ensemble" in printed
    _, records = read_results(out / "results.json")
    density = [r for r in records if r.get("setting") == "density"]
    pairs = {r["metric_pair"]: r["spearman"] for r in density if r.get("metric_pair")}
    assert pairs["boundary~confidence"] > 0.5  # the paper's finding: the metrics agree
    msp = {r["metric"]: r["spearman"] for r in density if r.get("detector") == "msp"}
    assert msp["confidence"] < -0.8 and set(msp) == {"confidence", "boundary"}
    assert main(["bench", "--protocol", "density", "--ensemble", "no_such_model", "--quiet", "--out",
                 str(out)]) == 2
