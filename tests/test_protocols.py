"""Evaluation protocols (failure detection, OOD unit tests, scaled inputs, density metrics): hand-computed metrics
and CLI runs."""

from __future__ import annotations

import numpy as np
import pytest

from oodscope.cli import main
from oodscope.protocols import parse
from oodscope.metrics import failure_metrics
from oodscope.protocols.unit_tests import TESTS, make_test
from oodscope.results_io import read_results
from test_report_html import cell, images_of, table_rows


@pytest.fixture
def tiny_resnet_bench(tmp_path, rng):
    """A tiny 32 x 32 benchmark folder and randomly initialised ResNet-20 weights (seed 0) for protocol runs."""
    import torch

    from oodscope.models.cifar_resnet import build_cifar_resnet
    from test_bench import _write_bench

    bench = _write_bench(tmp_path / "bench", rng, n_train=80, n_test=40)
    torch.manual_seed(0)
    torch.save(build_cifar_resnet("cifar10_resnet20").state_dict(), tmp_path / "w.pth")
    return bench, tmp_path / "w.pth"


def _bench(bench, weights, tmp_path, *extra: str) -> list:
    """``oodscope bench`` on the tiny bench (no cache, quiet); the records of results.json (report.html beside it
    in ``tmp_path / "out"``)."""
    out = tmp_path / "out"
    assert main(["bench", str(bench), "--model", "cifar10_resnet20", "--weights", str(weights), "--quiet",
                 "--no-cache", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *extra]) == 0
    return read_results(out / "results.json")[1]


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
    from oodscope.metrics import mean_pairwise_js, true_label_confidence

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
    html = (out / "report.html").read_text()
    assert table_rows(html, "protocol-density-table") == [[r["detector"], r["metric"], cell(r["spearman"])]
                                                          for r in density if r.get("metric")]
    assert len(table_rows(html, "protocol-density-table-pairs")) == len(pairs) == 1
    assert main(["bench", "--protocol", "density", "--ensemble", "no_such_model", "--quiet", "--out",
                 str(out)]) == 2


def test_noisy_labels_hand_checked():
    from oodscope.protocols.label_noise import noisy_labels

    labels = np.repeat(np.arange(10), 50)
    sym = noisy_labels(labels, 10, "symmetric", 0.2, seed=0)
    assert (sym != labels).sum() == 100  # exactly round(0.2 N), never to the true class
    assert np.array_equal(sym, noisy_labels(labels, 10, "symmetric", 0.2, seed=0))  # seeded
    flips = np.bincount(sym[sym != labels], minlength=10)
    assert flips.min() > 0  # spread over the other classes
    dep = noisy_labels(labels, 10, "class-dependent", 0.4, seed=0, cifar10=True)
    moved = {(int(a), int(b)) for a, b in zip(labels[dep != labels], dep[dep != labels])}
    assert moved == {(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)}  # truck->car, bird->plane, deer->horse, cat<->dog
    assert all((dep[labels == c] != c).sum() == 20 for c in (9, 2, 4, 3, 5))  # 40 % of each source class
    ring = noisy_labels(np.repeat(np.arange(3), 10), 3, "class-dependent", 0.5, seed=1)
    assert {(int(a), int(b)) for a, b in zip(np.repeat(np.arange(3), 10)[ring != np.repeat(np.arange(3), 10)],
                                             ring[ring != np.repeat(np.arange(3), 10)])} == {(0, 1), (1, 2), (2, 0)}
    assert np.array_equal(noisy_labels(labels, 10, "symmetric", 0.0), labels)
    for bad, message in (({"rate": 1.0}, "rate"), ({"rate": -0.1}, "rate"), ({"kind": "pairs"}, "kind")):
        with pytest.raises(ValueError, match=message):
            noisy_labels(labels, 10, **{"kind": "symmetric", "rate": 0.2, **bad})
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        noisy_labels(labels, 5, "symmetric", 0.2)


def test_bench_runs_the_label_noise_protocol_on_a_tiny_bench(tiny_resnet_bench, tmp_path, monkeypatch, capsys):
    from oodscope.protocols import label_noise

    monkeypatch.setattr(label_noise, "SCHEDULE", {"epochs": 1, "max_steps": 2, "lr": 0.01, "batch_size": 32})
    monkeypatch.setattr(label_noise, "N_IMAGES", 16)
    records = _bench(*tiny_resnet_bench, tmp_path, "--detectors", "msp,mahalanobis", "--protocol", "label-noise")
    assert "label noise" in capsys.readouterr().out
    noise = [r for r in records if r.get("setting") == "label-noise"]
    assert {r["dataset"] for r in noise} == {"clean", "symmetric 20%", "symmetric 40%", "class-dependent 20%",
                                             "class-dependent 40%"}
    shares = {r["dataset"]: r["noisy_share"] for r in noise}
    assert shares["clean"] == 0 and shares["symmetric 40%"] == pytest.approx(100 * round(0.4 * 80) / 80)
    clean = [r for r in noise if r["dataset"] == "clean"]
    assert all(r["delta_near"] == 0 and r["delta_far"] == 0 for r in clean)
    assert all(0 <= r["auroc_near"] <= 100 for r in noise)
    assert len(list((tmp_path / "cache" / "label-noise").iterdir())) == 5  # one resumable checkpoint per setting
    rows = table_rows((tmp_path / "out" / "report.html").read_text(), "protocol-label-noise-table")
    assert [row[:4] for row in rows] == [[r["detector"], r["dataset"], cell(r["noisy_share"]), cell(r["id_accuracy"])]
                                         for r in noise]


def test_oscr_hand_computed():
    from oodscope.metrics import oscr, oscr_curve

    # accept the lowest OOD scores first: 0.1 (known, right), 0.2 (known, wrong), 0.3 (unknown), 0.5 (known,
    # right), 0.6 (unknown): CCR 1/3 while FPR goes 0 -> 0.5, then 2/3 while FPR goes 0.5 -> 1: area 1/6 + 1/3
    known, correct, unknown = np.array([0.1, 0.2, 0.5]), np.array([True, False, True]), np.array([0.3, 0.6])
    fpr, ccr = oscr_curve(known, correct, unknown)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(ccr, [0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert oscr(known, correct, unknown) == pytest.approx(0.5)
    assert oscr(known, np.ones(3, bool), np.array([1.0, 2.0])) == pytest.approx(1.0)  # perfect: = accuracy
    assert oscr(np.zeros(3), correct, np.zeros(2)) == pytest.approx(2 / 3 / 2)  # all tied: one trapezoid
    with pytest.raises(ValueError, match="unknown"):
        oscr(known, correct, np.array([]))


def test_bench_runs_the_open_set_protocol_on_a_tiny_bench(tiny_resnet_bench, tmp_path, monkeypatch, capsys):
    from oodscope.protocols import open_set

    monkeypatch.setattr(open_set, "SCHEDULE", {"epochs": 1, "max_steps": 2, "lr": 0.05, "batch_size": 32})
    records = _bench(*tiny_resnet_bench, tmp_path, "--detectors", "msp,mahalanobis", "--protocol", "open-set")
    assert "open-set recognition" in capsys.readouterr().out
    osr = [r for r in records if r.get("setting") == "open-set"]
    assert len(osr) == 10 and {r["dataset"] for r in osr} == {f"split {i}" for i in range(5)}
    for r in osr:
        assert len(r["known"]) == 6 and sorted(r["known"] + r["unknown"]) == list(range(10))
        assert 0 <= r["oscr"] <= r["accuracy"] + 1e-9  # OSCR never exceeds the closed-set accuracy
    rows = table_rows((tmp_path / "out" / "report.html").read_text(), "protocol-open-set-table")
    assert [row[4:6] for row in rows] == [[cell(r["auroc"]), cell(r["oscr"])] for r in osr]
    assert open_set.class_splits(10, cifar10=True)[0] == (0, 6, 4, 9, 1, 7)
    with pytest.raises(ValueError, match="at least 3"):
        open_set.class_splits(2, cifar10=False)


def test_a_fresh_classifier_forgets_the_weights_and_gets_a_k_way_head():
    import torch

    from oodscope.models.cifar_resnet import build_cifar_resnet
    from oodscope.protocols.open_set import fresh_classifier

    torch.manual_seed(0)
    model = build_cifar_resnet("cifar10_resnet20")
    fresh = fresh_classifier(model, 6, seed=1)
    assert fresh.fc.out_features == 6 and model.fc.out_features == 10  # the original is untouched
    assert not torch.equal(fresh.conv1.weight, model.conv1.weight)
    again = fresh_classifier(model, 6, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), again.state_dict().values()))


def test_rank_correlations_hand_computed():
    from oodscope.metrics import rank_correlations
    from oodscope.protocols.correlation import correlations

    assert rank_correlations([1, 2, 3, 4], [10, 20, 30, 40])["spearman"] == pytest.approx(1.0)
    inverse = rank_correlations([1, 2, 3, 4], [4, 3, 2, 1])
    assert inverse["spearman"] == pytest.approx(-1.0) and inverse["kendall"] == pytest.approx(-1.0)
    # one swapped pair of 4: Kendall (5 concordant - 1 discordant) / 6, Spearman 1 - 6 * 2 / (4 * 15)
    swapped = rank_correlations([1, 2, 3, 4], [1, 3, 2, 4])
    assert swapped["kendall"] == pytest.approx(4 / 6) and swapped["spearman"] == pytest.approx(0.8)
    rows = [{"id_accuracy": a, "msp near auroc": b} for a, b in ((90, 80), (91, 70), (92, 60))]
    (record,) = correlations(rows, ["msp"], ["near"])
    assert record["spearman"] == pytest.approx(-1.0) and record["n"] == 3
    assert np.isnan(rank_correlations([90, 90, 90], [1, 2, 3])["spearman"])  # undefined, not an error
    with pytest.raises(ValueError, match="--ensemble"):
        rank_correlations([1, 2], [3, 4])


def test_evaluate_results_report_failure_detection(rng):
    import oodscope
    from oodscope.protocols.failure import failure_metrics

    logits = rng.normal(size=(200, 3)) * 3
    labels = np.where(rng.random(200) < 0.8, logits.argmax(1), (logits.argmax(1) + 1) % 3)  # 20 % wrong
    test = oodscope.Outputs(logits=logits, labels=labels, name="test")
    ood = oodscope.Outputs(logits=rng.normal(size=(100, 3)), name="noise")
    results = oodscope.evaluate(["msp", "energy"], test, {"far": {"noise": ood}}, train=test)
    (msp, energy) = results.failure()
    errors = (logits.argmax(1) != labels).astype(float)
    expected = failure_metrics(results.scores["msp"]["test"], errors, results.scores["msp"]["noise"])
    assert msp["detector"] == "msp" and msp["aurc"] == pytest.approx(expected["aurc"])
    assert msp["reject_share"] == pytest.approx(100 * (errors.sum() + 100) / 300)
    unlabelled = oodscope.evaluate(["msp"], oodscope.Outputs(logits=logits, name="t"), {"far": {"noise": ood}},
                                   train=test)
    with pytest.raises(ValueError, match="class labels"):
        unlabelled.failure()


def test_the_correlation_protocol_fits_each_models_own_detectors(tiny_resnet_bench, tmp_path, capsys):
    import torch

    import oodscope
    from oodscope.data.spec import load_benchmark_dir
    from oodscope.models.cifar_resnet import build_cifar_resnet
    from oodscope.models.zoo import load_model
    from oodscope.training.compare import evaluate_model

    bench_dir, first = tiny_resnet_bench
    paths = [first]
    for seed in (1, 2):  # same architecture, other weights: a detector fitted on one would score the others
        torch.manual_seed(seed)
        paths.append(tmp_path / f"w{seed}.pth")
        torch.save(build_cifar_resnet("cifar10_resnet20").state_dict(), paths[-1])
    records = _bench(bench_dir, first, tmp_path, "--detectors", "knn_distance,mahalanobis", "--protocol",
                     "correlation", "--ensemble", f"cifar10_resnet20={paths[1]},cifar10_resnet20={paths[2]}")
    assert "ID accuracy vs OOD AUROC" in capsys.readouterr().out
    rows = [r for r in records if r.get("setting") == "correlation-models"]
    assert len(rows) == 3 and len([r for r in records if r.get("setting") == "correlation"]) == 2 * 2
    model, preprocess = load_model("cifar10_resnet20", paths[2])
    expected = evaluate_model(model, preprocess, load_benchmark_dir(bench_dir),
                              detectors=[oodscope.create("knn_distance")], per_set=2000)
    assert rows[2]["knn_distance near auroc"] == pytest.approx(expected["knn_distance near auroc"], abs=1e-9)
    html = (tmp_path / "out" / "report.html").read_text()
    table = [r for r in records if r.get("setting") == "correlation"]
    assert [row[3] for row in table_rows(html, "protocol-correlation-table")] == [cell(r["spearman"]) for r in table]
    assert len(table_rows(html, "protocol-correlation-table-models")) == 3
    (svg,) = images_of(html[html.index('id="protocol-correlation"'):html.index('id="detectors"')], r"svg\+xml")
    assert svg.count(b"<circle") == 3 * 2 * 2  # models x detectors x groups: ID accuracy vs AUROC


def test_the_protocol_metrics_live_in_oodscope_metrics():
    import oodscope.metrics as metrics
    from oodscope.protocols import correlation, density, failure

    assert failure.failure_metrics is metrics.failure_metrics and correlation.rank_correlations is \
        metrics.rank_correlations  # one implementation, importable from both places
    for name in ("spearman", "true_label_confidence", "mean_pairwise_js", "symmetric_kl", "strongest_private_level"):
        assert getattr(density, name) is getattr(metrics, name), name
        assert getattr(metrics, name).__doc__, name
    scores, errors, ood = np.array([0.1, 0.2, 0.9, 0.4]), np.array([0, 0, 1, 0]), np.array([0.8, 0.3])
    assert metrics.failure_metrics(scores, errors, ood) == failure.failure_metrics(scores, errors, ood)
    assert metrics.failure_metrics(scores, errors, ood)["reject_share"] == pytest.approx(50.0)
    assert metrics.rank_correlations([1, 2, 3], [3, 1, 2]) == correlation.rank_correlations([1, 2, 3], [3, 1, 2])
    assert metrics.spearman([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5) == density.spearman([1, 2, 3], [3, 1, 2])


def test_the_unit_tests_section_shows_each_tests_share_of_passing_detectors(tiny_resnet_bench, tmp_path,
                                                                             monkeypatch):
    from oodscope.protocols import unit_tests

    monkeypatch.setattr(unit_tests, "N_IMAGES", 16)
    records = _bench(*tiny_resnet_bench, tmp_path, "--detectors", "msp,mahalanobis", "--protocol", "unit-tests")
    tests = [r for r in records if r.get("setting") == "unit-tests"]
    assert len(tests) == 2 * len(TESTS)
    html = (tmp_path / "out" / "report.html").read_text()
    share = {row[0]: row[1] for row in table_rows(html, "protocol-unit-tests-table-share")}
    for name in TESTS:
        passed = [r["auroc"] >= 90 for r in tests if r["dataset"] == name]
        assert share[name] == cell(100 * sum(passed) / 2)
    assert [row[:3] for row in table_rows(html, "protocol-unit-tests-table")] == [
        [r["detector"], r["dataset"], cell(r["auroc"])] for r in tests]


def test_the_python_example_of_the_protocols_page_runs(tmp_path, monkeypatch):
    """docs/protocols.md's Python block as written, on the digits bench (the cache in a temporary folder)."""
    import re
    from pathlib import Path

    monkeypatch.setenv("OODSCOPE_CACHE", str(tmp_path))
    page = (Path(__file__).resolve().parents[1] / "docs" / "protocols.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "protocols.run" in b]
    namespace: dict = {}
    exec(block, namespace)
    failure = {r["detector"]: r for r in namespace["failure"]}
    assert set(failure) == {"msp", "energy", "knn"} and all(50 < r["auroc"] <= 100 for r in failure.values())
    scaling = {(r["detector"], r["alpha"]): r["auroc"] for r in namespace["records"]}
    assert scaling[("msp", 1.0)] == 50.0  # alpha = 1: the scaled set is the ID test set itself


def test_training_protocols_refuse_unlabelled_training_data_and_a_model_without_a_linear_head():
    from types import SimpleNamespace

    import torch

    from oodscope import protocols

    labelled = SimpleNamespace(inputs=np.zeros((4, 8, 8, 3), np.uint8), labels=np.array([0, 1, 2, 0]))
    unlabelled = SimpleNamespace(inputs=labelled.inputs, labels=np.array([0, -1, 2, 0]))
    linear_model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))
    conv_model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def context(train, model):
        bench = SimpleNamespace(name="tiny", train=train, test=labelled, ood={})
        return protocols.Context(bench, model, None, {}, None)

    with pytest.raises(ValueError, match="needs the ID training labels"):
        protocols.run("label-noise", context(unlabelled, linear_model))
    with pytest.raises(ValueError, match="last layer must be nn.Linear"):
        protocols.run("label-noise", context(labelled, conv_model))
    with pytest.raises(ValueError, match="needs class labels on the ID train and test sets"):
        protocols.run("open-set", context(unlabelled, linear_model))
    with pytest.raises(ValueError, match="last layer must be nn.Linear"):
        protocols.run("open-set", context(labelled, conv_model))
