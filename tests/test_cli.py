import json

import pytest

from oodscope.cli import main


def test_bench_default_runs_offline_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "detector" in printed and "ID accuracy" in printed
    records = json.loads((out / "results.json").read_text())
    assert all(set(r) == {"detector", "dataset", "group", "auroc", "fpr95", "aupr_in", "aupr_out"} for r in records)
    assert (out / "results.csv").read_text().startswith("detector,dataset,group,auroc,fpr95,aupr_in,aupr_out")
    assert (out / "score_distributions.png").read_bytes()[:4] == b"\x89PNG"
    means = {(r["detector"], r["group"]): r["auroc"] for r in records if r["dataset"] == "mean"}
    assert {g for _, g in means} == {"near", "far", "covariate"}
    # real detectors separate real OOD data
    assert all(means[(d, "near")] > 80 for d in ("msp", "energy", "knn"))
    # as on real benchmarks, a feature-space method beats MSP on at least one group
    assert any(means[(d, g)] > means[("msp", g)] for d in ("vim", "knn", "mahalanobis") for g in ("near", "far"))
    # the second run reads the extraction cache and gives identical numbers
    assert main(["bench", "--out", str(out / "again"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    assert json.loads((out / "again" / "results.json").read_text()) == records


def test_detectors_command_lists_each_detector(capsys):
    assert main(["detectors"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    vim = next(line for line in lines if line.split()[0] == "vim")
    assert "features,head,logits" in vim and "alpha" in vim
    assert {line.split()[0] for line in lines} >= {"msp", "maxlogit", "energy", "mahalanobis", "knn", "vim"}


def test_bench_errors_are_clear(capsys):
    assert main(["bench", "nosuchbench"]) == 2
    assert "unknown benchmark 'nosuchbench'" in capsys.readouterr().err
    assert main(["bench", "--detectors", "msp,vimm"]) == 2
    assert "did you mean vim" in capsys.readouterr().err
