import pytest

import oodscope
from oodscope.cli import main
from oodscope.results_io import read_results


def test_bench_default_runs_offline_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "detector" in printed and "ID accuracy" in printed
    # a degenerate result is never shown without a word: ash_s is inverted on the digits bench
    assert "note: ash_s: inverted on near" in printed
    # and temperature scaling, whose calibration set is all correct, keeps T = 1 with a note (no collapse)
    assert "temperature: every calibration sample is classified correctly" in printed
    assert "degenerate-notes" in (out / "report.html").read_text() and "ash_s: inverted" in (
        out / "report.html").read_text()
    meta, records = read_results(out / "results.json")
    assert all(set(r) == {"detector", "dataset", "group", "auroc", "fpr95", "aupr_in", "aupr_out"} for r in records)
    assert (out / "results.csv").read_text().startswith("detector,dataset,group,auroc,fpr95,aupr_in,aupr_out")
    assert not (out / "score_distributions.png").exists()  # the report holds the histograms, drawn once
    means = {(r["detector"], r["group"]): r["auroc"] for r in records if r["dataset"] == "mean"}
    assert {g for _, g in means} == {"near", "far", "covariate"}
    assert all(means[("temperature", g)] == means[("msp", g)] for g in ("near", "far", "covariate"))  # T = 1
    # real detectors separate real OOD data
    assert all(means[(d, "near")] > 80 for d in ("msp", "energy", "knn"))
    # as on real benchmarks, a feature-space method beats MSP on at least one group
    assert any(means[(d, g)] > means[("msp", g)] for d in ("vim", "knn", "mahalanobis") for g in ("near", "far"))
    # the second run reads the extraction cache and gives identical numbers
    assert main(["bench", "--out", str(out / "again"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    assert read_results(out / "again" / "results.json")[1] == records


def test_detectors_command_lists_each_detector(capsys):
    assert main(["detectors"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    vim = next(line for line in lines if line.split()[0] == "vim")
    assert vim.split()[1:3] == ["ood", "features,head,logits"] and "CVPR 2022" in vim
    names = {line.split()[0] for line in lines[1:-1]}
    assert names == set(oodscope.available()) and lines[-1].startswith(f"{len(names)} registered: ")
    n_image = sum(line.split()[1] == "image" for line in lines[1:-1])
    assert n_image >= 12 and f"{n_image} image" in lines[-1]  # the summary counts what the listing shows
    assert "training" in lines[-1] and "vlm" in lines[-1]
    assert {"patchcore", "efficientad", "msp", "iforest"} <= names  # every family, image detectors included
    assert not any("``" in line or ":class:" in line for line in lines)  # no raw reST markup
    # columns are aligned: the needs column starts at the same offset on every row
    assert len({line.index(line.split()[2], len(line.split()[0]) + 2) for line in lines[1:-1]}) == 1


def test_detectors_command_filters_by_family(capsys):
    assert main(["detectors", "--family", "anomaly"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = {line.split()[0] for line in lines[1:-1]}
    assert names == set(oodscope.available(family="anomaly")) and "iforest" in names and "msp" not in names
    assert all(line.split()[1] == "anomaly" for line in lines[1:-1])
    assert main(["detectors", "--family", "image"]) == 0
    image = {line.split()[0] for line in capsys.readouterr().out.strip().splitlines()[1:-1]}
    assert image == {"cae", "efficientad", "gaussian_ad", "gaussian_ad_npca", "nsa", "patchcore", "winclip",
                     "winclip_plus", "anomalyclip", "clip_ad", "clip_ad_plus", "filo", "filo_trained"}


def test_bench_errors_are_clear(capsys):
    assert main(["bench", "nosuchbench"]) == 2
    assert "unknown benchmark 'nosuchbench'" in capsys.readouterr().err
    assert main(["bench", "--detectors", "msp,vimm"]) == 2
    assert "did you mean vim" in capsys.readouterr().err


def test_tune_on_validation_sets_best_grid_params_in_place(make_outputs):
    import oodscope
    from oodscope.runner import tune_on_validation

    outputs = {"train": make_outputs(name="train"), "val": make_outputs(n=200, name="val"),
               "ood_val/shifted": make_outputs(n=200, shift=1.5, name="ood_val")}
    detectors = {"knn": oodscope.create("knn"), "energy": oodscope.create("energy"), "msp": oodscope.create("msp")}
    tuned = tune_on_validation(detectors, outputs, ["shifted"])
    reference = oodscope.tune("knn", None, outputs["val"], {"shifted": outputs["ood_val/shifted"]},
                              train=outputs["train"])
    assert tuned["knn"] == reference.best_params and detectors["knn"].k == reference.best_params["k"]
    assert "msp" not in tuned  # no grid: defaults kept
    assert not hasattr(detectors["knn"], "input_dims_")  # still unfitted: evaluate fits it on train
    with pytest.raises(ValueError, match=r"\[ood.val\]"):
        tune_on_validation(detectors, outputs, [])


def test_bench_tune_needs_ood_val(capsys, tmp_path):
    assert main(["bench", "--tune", "--detectors", "knn", "--cache-dir", str(tmp_path), "--quiet",
                 "--out", str(tmp_path / "o")]) == 2
    assert "[ood.val]" in capsys.readouterr().err


def test_degenerate_notes_name_collapsed_and_inverted_scores():
    import numpy as np

    from oodscope.evaluation import Results

    rng = np.random.default_rng(0)
    scores = {"collapsed": {"id": np.repeat([0.0, 1.0], 50), "ood": np.ones(40)},
              "inverted": {"id": rng.normal(1.0, 0.1, 100), "ood": rng.normal(0.0, 0.1, 40)},
              "fine": {"id": rng.normal(0.0, 0.1, 100), "ood": rng.normal(1.0, 0.1, 40)}}
    records = [{"detector": d, "dataset": "ood", "group": "near", "auroc": a, "fpr95": 0.0, "aupr_in": 0.0,
                "aupr_out": 0.0} for d, a in (("collapsed", 70.0), ("inverted", 0.0), ("fine", 100.0))]
    results = Results(records=records, id_accuracy=None, seconds={}, scores=scores, groups={"near": ["ood"]})
    notes = results.degenerate_notes()
    assert len(notes) == 2
    assert notes[0].startswith("collapsed: its scores on id take only 2 distinct values over 100 samples")
    assert notes[1].startswith("inverted: inverted on near (mean AUROC 0.00 < 50")
