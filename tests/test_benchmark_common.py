"""benchmarks/common.py (the benchmark scripts' shared module) and oodscope.safeio.write_atomic: data root, percent
metrics, markdown tables, parameter parsing, atomic JSON."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from oodscope.safeio import write_atomic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def common():
    """The module loaded from its file (benchmarks/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location("benchmark_common", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_root_is_one_setting(common, monkeypatch, tmp_path):
    monkeypatch.delenv(common.DATA_ENV, raising=False)
    assert common.data_root() == ROOT.parent / "shared" / "data"
    monkeypatch.setenv(common.DATA_ENV, str(tmp_path))
    (tmp_path / "cifar10-bench" / "models").mkdir(parents=True)
    assert common.cifar_bench_dir() == tmp_path / "cifar10-bench"
    with pytest.raises(FileNotFoundError, match="OODSCOPE_BENCH_DATA.*cifar10-bench"):
        common.cifar_weights("cifar10_resnet20")
    with pytest.raises(FileNotFoundError, match="magnetic-tile"):
        common.magnetic_tile_dir()


def test_percent_metrics_match_scikit_learn_side_by_side(common, rng):
    # an independent check of the package's metrics: scikit-learn with OOD as the positive class
    id_scores, ood_scores = rng.normal(size=300), rng.normal(0.8, 1.0, size=200)
    id_scores[:20] = ood_scores[:20]  # ties across the classes
    labels = np.r_[np.zeros(300), np.ones(200)]
    scores = np.r_[id_scores, ood_scores]
    metrics = common.percent_metrics(id_scores, ood_scores)
    assert metrics["auroc"] == pytest.approx(100 * roc_auc_score(labels, scores), abs=1e-10)
    assert metrics["aupr_out"] == pytest.approx(100 * average_precision_score(labels, scores), abs=1e-10)
    assert metrics["aupr_in"] == pytest.approx(100 * average_precision_score(1 - labels, -scores), abs=1e-10)
    assert common.auroc_fpr(id_scores, ood_scores) == (metrics["auroc"], metrics["fpr95"])


def test_fpr95_and_group_means_by_hand(common):
    id_scores = np.arange(1.0, 21.0)  # keep 95 % of ID: threshold 19, so OOD scores <= 19 are accepted
    ood_scores = np.array([0.5, 19.0, 19.5, 30.0])
    assert common.auroc_fpr(id_scores, ood_scores)[1] == pytest.approx(50.0)
    cells = {"near/cifar100": (80.0, 40.0), "near/tin": (90.0, 20.0), "far/mnist": (99.0, 1.0),
             "far/textures": (95.0, 5.0)}
    assert common.group_means(cells) == {"near": (85.0, 30.0), "far": (97.0, 3.0)}
    assert common.pair(common.group_means(cells)["near"]) == "85.00 / 30.00"


def test_markdown_table_formats_and_checks_rows(common):
    table = common.markdown_table(["detector", "AUROC", "note"], [["knn", 91.234, None], ["a|b", float("nan"), 3]])
    assert table.splitlines() == ["| detector | AUROC | note |", "|---|---|---|", "| knn | 91.23 | - |",
                                  "| a\\|b | - | 3 |"]
    with pytest.raises(ValueError, match="row 0 has 2 cells for 3 headers"):
        common.markdown_table(["a", "b", "c"], [[1, 2]])


def test_parse_params_reads_json_values_and_names_bad_items(common):
    assert common.parse_params(["steps=300", "lr=1e-3", "name=resnet", "layers=[1, 2]"]) == {
        "steps": 300, "lr": 1e-3, "name": "resnet", "layers": [1, 2]}
    assert common.parse_params(["patchcore.coreset_ratio=0.01", "patchcore.k=3", "cae.steps=5"], nested=True) == {
        "patchcore": {"coreset_ratio": 0.01, "k": 3}, "cae": {"steps": 5}}
    with pytest.raises(ValueError, match="DETECTOR.NAME=VALUE"):
        common.parse_params(["coreset_ratio=0.01"], nested=True)
    with pytest.raises(ValueError, match="NAME=VALUE"):
        common.parse_params(["steps"])


def test_fmt_params(common):
    assert common.fmt_params({"percentile": 90.0, "variant": "ash-s", "k": 5}) == "percentile=90, variant=ash-s, k=5"
    assert common.fmt_params({}) == "-"


def test_write_json_is_atomic_plain_json_and_flags_non_finite(common, tmp_path):
    path = tmp_path / "deep" / "results.json"
    data = {"auroc": np.float32(0.5), "rows": np.arange(3), "path": tmp_path, "ok": np.bool_(True)}
    assert common.write_json(path, data) == path
    assert json.loads(path.read_text()) == {"auroc": 0.5, "rows": [0, 1, 2], "path": str(tmp_path), "ok": True}
    with pytest.warns(RuntimeWarning, match=r"2 non-finite value\(s\) written as null, first at \$.a\[1\], \$.b"):
        common.write_json(path, {"a": [1.0, float("nan")], "b": np.inf})
    assert json.loads(path.read_text()) == {"a": [1.0, None], "b": None}
    with pytest.raises(TypeError, match=r"\$.x: object is not JSON data"):
        common.write_json(path, {"x": object()})
    assert json.loads(path.read_text()) == {"a": [1.0, None], "b": None}  # a failed write leaves the old file
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # and no temporary file


def test_write_atomic_replaces_whole_files_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    write_atomic(path, "old")
    assert path.read_text() == "old"
    write_atomic(path, b"new bytes")
    assert path.read_bytes() == b"new bytes"

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "never")
    monkeypatch.undo()
    assert path.read_bytes() == b"new bytes"
    assert os.listdir(tmp_path) == ["out.txt"]  # the temporary file is gone
    with pytest.raises(FileNotFoundError, match="folder .* does not exist"):
        write_atomic(tmp_path / "missing" / "x.txt", "text")


# -- the rules of benchmarks/README.md, checked on every script and results file -------------------------------------
SCRIPTS = sorted(path for path in (ROOT / "benchmarks").glob("*.py") if path.name not in ("__init__.py", "common.py"))
DOCUMENTED_HOOKS = {"_fit", "_score"}  # the Detector methods a subclass overrides (README: "Adding a detector")


def test_every_script_and_results_file_is_in_the_benchmarks_readme():
    index = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    missing = [path.name for path in SCRIPTS if f"`{path.name}`" not in index]
    missing += [path.name for path in (ROOT / "benchmarks" / "results").iterdir() if f"`{path.name}`" not in index]
    assert not missing, f"not in benchmarks/README.md: {missing}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_scripts_use_public_names_the_package_metrics_and_no_sys_path(script):
    import ast

    tree = ast.parse(script.read_text(encoding="utf-8"))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("oodscope"):
                problems += [f"imports private {alias.name}" for alias in node.names if alias.name.startswith("_")]
            if node.module.startswith("sklearn.metrics"):
                problems.append("imports sklearn.metrics (use oodscope.metrics)")
        elif isinstance(node, ast.Attribute):
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "os", "sys")
            if private and not on_self and node.attr not in DOCUMENTED_HOOKS:
                problems.append(f"line {node.lineno}: private attribute {node.attr}")
            if node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys":
                problems.append(f"line {node.lineno}: sys.path")
    assert not problems, problems


def test_write_atomic_gives_new_files_the_umask_mode_not_mkstemps_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "report.html", "<p>shared</p>")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert write_atomic(tmp_path / "private.json", b"{}").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)
