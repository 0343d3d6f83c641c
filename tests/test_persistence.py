"""Save and load of every registered detector (all families): bit-identical scores after a load in this process
and in a fresh Python process, plus the refusals (corrupted, foreign, newer or malicious files, unfitted
detectors) and the atomic write. New detectors are covered without being listed (``tests/detector_cases.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import oodscope
from detector_cases import case, detector_names, fitted
from oodscope import NotFittedError
from oodscope.detectors import get
from oodscope.detectors.registry import FAMILIES
from oodscope.persistence import load, save

ALL = detector_names()
TESTS = Path(__file__).resolve().parent
OPTIONAL_PACKAGE = "needs the"  # detectors whose optional package is missing say "needs the X package"


def user_networks(detector) -> dict[str, Any]:
    """The parameters that are networks the user passed (``load`` must be given them again)."""
    from torch import nn

    from oodscope.imagead import Backbone

    return {k: v for k, v in detector.get_params(deep=False).items() if isinstance(v, (nn.Module, Backbone))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(name) -> (case, scores, path)``: each detector fitted, scored and saved once per module."""
    folder = tmp_path_factory.mktemp("saved")
    cache: dict[str, Any] = {}

    def get_saved(name: str):
        if name not in cache:
            try:
                c = fitted(name)
            except ValueError as error:
                if OPTIONAL_PACKAGE in str(error) and "package" in str(error):
                    cache[name] = str(error)
                else:
                    raise
            else:
                scores = c.detector.score(c.test)
                cache[name] = (c, scores, save(c.detector, folder / f"{name}.oods"))
        if isinstance(cache[name], str):
            pytest.skip(cache[name])
        return cache[name]

    return get_saved


def test_every_family_is_covered_and_the_count_is_printed():
    counts = {family: sum(get(name).family == family for name in ALL) for family in FAMILIES}
    print(f"\npersistence suite: {len(ALL)} registered detectors, by family {counts}")
    assert counts["ood"] >= 40 and counts["anomaly"] >= 10 and counts["image"] >= 6


@pytest.mark.parametrize("name", ALL)
def test_round_trip_in_process(name, saved):
    import torch

    c, scores, path = saved(name)
    rng_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    loaded = load(path, **user_networks(c.detector))
    assert torch.equal(torch.random.get_rng_state(), rng_state), "load touched torch's global RNG"
    assert _same(np.random.get_state(), np_state), "load touched numpy's global RNG"
    assert type(loaded) is type(c.detector)
    assert _same(loaded.get_params(deep=False), c.detector.get_params(deep=False))
    assert sorted(k for k in vars(loaded) if k.endswith("_")) == sorted(k for k in vars(c.detector) if k.endswith("_"))
    assert np.array_equal(loaded.score(c.test), scores)
    with zipfile.ZipFile(path) as zf:
        header = json.loads(zf.read("detector.json"))
        assert set(zf.namelist()) <= {"detector.json", "arrays.npz", "torch.pt"}
    assert (header["format"], header["format_version"], header["detector"]) == ("oodscope-detector", 1, name)
    assert header["oodscope_version"] == oodscope.__version__


FRESH = r"""
import json, sys
import numpy as np
from torch import nn
import oodscope
from detector_cases import case
from oodscope.imagead import Backbone

for name, path in json.loads(open(sys.argv[1]).read()).items():
    c = case(name)  # the same test data, and fresh copies of any network the user passed
    networks = {k: v for k, v in c.detector.get_params(deep=False).items() if isinstance(v, (nn.Module, Backbone))}
    np.save(path + ".npy", oodscope.load(path, **networks).score(c.test))
"""


def test_fresh_process_gives_bit_identical_scores(saved, tmp_path):
    """One fresh Python process loads every saved detector and scores the same test data."""
    done, skipped = {}, []
    for name in ALL:
        try:
            done[name] = saved(name)
        except pytest.skip.Exception:
            skipped.append(name)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({name: str(path) for name, (_, _, path) in done.items()}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", FRESH, str(manifest)], cwd=TESTS, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    different = [name for name, (_, scores, path) in done.items()
                 if not np.array_equal(np.load(str(path) + ".npy"), scores)]
    print(f"\nfresh process: {len(done)} detectors loaded and scored, skipped {skipped}")
    assert not different, f"scores differ after a load in a fresh process: {different}"
    assert len(done) + len(skipped) == len(ALL)


# -- user networks as parameters ---------------------------------------------------------------------------
def test_a_user_backbone_must_be_passed_again(saved):
    c, scores, path = saved("gaussian_ad")
    with pytest.raises(ValueError, match=r"backbone.*pass it again.*backbone="):
        load(path)
    with pytest.raises(ValueError, match="unexpected arguments"):
        load(path, **user_networks(c.detector), other=1)
    fresh = case("gaussian_ad").detector.backbone  # a new Backbone of the same architecture
    assert np.array_equal(load(path, backbone=fresh).score(c.test), scores)


def test_a_plain_module_as_backbone(tmp_path):
    c = case("gaussian_ad")
    c.detector.set_params(backbone=c.detector.backbone.model).fit(c.train)
    path = save(c.detector, tmp_path / "g.oods")
    with pytest.raises(ValueError, match="user-supplied torch nn.Module"):
        load(path)
    loaded = load(path, backbone=case("gaussian_ad").detector.backbone.model)
    assert np.array_equal(loaded.score(c.test), c.detector.score(c.test))


# -- refusals ----------------------------------------------------------------------------------------------
@pytest.fixture
def small_file(tmp_path) -> Path:
    return save(fitted("mahalanobis").detector, tmp_path / "small.oods")


def _rewrite(path: Path, edit=None, extra: dict[str, bytes] | None = None) -> Path:
    """A copy of ``path`` with ``edit(header)`` applied to detector.json and entries replaced by ``extra``."""
    out = path.with_name("edited.oods")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "detector.json" and edit is not None:
                header = json.loads(data)
                edit(header)
                data = json.dumps(header).encode()
            dst.writestr(item, (extra or {}).get(item, data))
    return out


def test_truncated_and_corrupted_files_are_refused(small_file):
    data = small_file.read_bytes()
    truncated = small_file.with_name("truncated.oods")
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.oods.*(truncated|corrupted)"):
        load(truncated)
    with zipfile.ZipFile(small_file) as zf:
        info = zf.getinfo("arrays.npz")
    corrupted = small_file.with_name("corrupted.oods")
    start = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    corrupted.write_bytes(data[:start] + bytes(b ^ 0xFF for b in data[start:start + 64]) + data[start + 64:])
    with pytest.raises(ValueError, match=r"corrupted\.oods.*corrupted"):
        load(corrupted)


def test_foreign_files_are_refused(tmp_path):
    random_bytes = tmp_path / "random.oods"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"random\.oods is not an oodscope detector file"):
        load(random_bytes)
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match=r"foreign\.zip is a zip archive but not an oodscope detector file"):
        load(foreign)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.oods")


def test_a_newer_format_version_is_refused(small_file):
    newer = _rewrite(small_file, lambda h: h.update(format_version=99))
    with pytest.raises(ValueError, match=r"edited\.oods has format_version 99.*reads version 1"):
        load(newer)


def test_an_unknown_detector_name_is_refused(small_file):
    unknown = _rewrite(small_file, lambda h: h.update(detector="no_such_detector"))
    with pytest.raises(ValueError, match=r"edited\.oods.*unknown detector 'no_such_detector'"):
        load(unknown)


OUTSIDE = "refused.*not in the allow-list"


@pytest.mark.parametrize("planted, refusal", [
    ({"$": "object", "class": "subprocess:Popen", "call": True, "args": [["touch", "{marker}"]], "state": None},
     OUTSIDE),
    ({"$": "object", "class": "this:Anything", "state": None}, OUTSIDE),  # importing ``this`` prints the Zen
    ({"$": "object", "class": "sklearnx.evil:Estimator", "state": None}, OUTSIDE),  # a look-alike prefix
    ({"$": "class", "class": "os:system"}, OUTSIDE),
    ({"$": "object", "class": "sklearn.base:np.memmap", "call": True,  # walking out of an allowed module
      "args": ["{marker}", "uint8", "w+", 0, [8]], "state": None}, "not a class defined there"),
    ({"$": "object", "class": "oodscope.detectors.anomaly._base:NeighbourBank", "call": True,  # runs __init__
      "args": [[[0.0]]], "state": None}, "not rebuilt by calling it"),
])
def test_planted_classes_are_refused_without_import_or_call(small_file, tmp_path, planted, refusal):
    marker = tmp_path / "marker"
    node = json.loads(json.dumps(planted).replace("{marker}", str(marker)))
    modules = set(sys.modules)
    bad = _rewrite(small_file, lambda h: h["state"].update(means_=node))
    with pytest.raises(ValueError, match=rf"edited\.oods.*{refusal}"):
        load(bad)
    assert not marker.exists()
    assert not {"this", "sklearnx"} & (set(sys.modules) - modules)


def test_state_names_must_be_fitted_attributes(small_file):
    bad = _rewrite(small_file, lambda h: h["state"].update(__class__={"$": "class", "class": "builtins:int"}))
    with pytest.raises(ValueError, match="not the name of a fitted attribute"):
        load(bad)


def test_pickled_payloads_are_refused(small_file, tmp_path):
    import io

    import torch

    buffer = io.BytesIO()
    np.savez(buffer, a0=np.array([print], dtype=object))  # an object array is stored as a pickle
    with pytest.raises(ValueError, match="corrupted"):
        load(_rewrite(small_file, extra={"arrays.npz": buffer.getvalue()}))
    buffer = io.BytesIO()
    torch.save({"modules": {}, "tensors": {"t0": Path("x")}}, buffer)  # a pickled non-tensor object
    with zipfile.ZipFile(small_file, "a") as zf:
        zf.writestr("torch.pt", buffer.getvalue())
    with pytest.raises(ValueError, match="corrupted"):
        load(small_file)


def test_an_unfitted_detector_is_not_saved(tmp_path):
    with pytest.raises(NotFittedError, match="not fitted"):
        save(oodscope.create("mahalanobis"), tmp_path / "unfitted.oods")
    assert list(tmp_path.iterdir()) == []


def test_unsavable_state_and_parameters_are_refused_naming_them(tmp_path):
    import threading

    detector = fitted("knn").detector
    detector.lock_ = threading.Lock()
    with pytest.raises(ValueError, match="cannot save lock_"):
        save(detector, tmp_path / "x.oods")
    del detector.lock_
    name = next(iter(detector.get_params()))
    setattr(detector, name, lambda x: x)
    with pytest.raises(ValueError, match=f"cannot save parameter '{name}'"):
        save(detector, tmp_path / "x.oods")
    assert list(tmp_path.iterdir()) == []


def test_the_write_is_atomic(tmp_path, monkeypatch):
    detector = fitted("mahalanobis").detector
    path = detector.save(tmp_path / "m.oods")
    assert [p.name for p in tmp_path.iterdir()] == ["m.oods"]
    before = path.read_bytes()
    detector.means_ = detector.means_ + 1.0

    def fail(fd):
        assert [p.name for p in tmp_path.iterdir() if p.name != "m.oods"], "no temporary file in the same folder"
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)  # the write fails after the whole file went to the temporary file
    with pytest.raises(OSError, match="disk full"):
        save(detector, path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.oods"] and path.read_bytes() == before
    monkeypatch.undo()
    assert np.array_equal(oodscope.load(save(detector, path)).means_, detector.means_)


def test_nested_and_container_state_round_trips(tmp_path):
    """Tuples, non-string keys, sets, numpy scalars and transposed arrays come back as they were."""
    detector = fitted("mahalanobis").detector
    value = {1: (np.float32(1.5), "a"), (2, "b"): {frozenset({3})}, "t": np.ones((3, 2)).T, "n": float("nan"),
             "x": 0.1 + 0.2, "big": 2 ** 80, "bytes": b"\x00\xff", "dt": np.dtype([("a", "<i4"), ("b", "<f8")])}
    detector.extra_ = value
    loaded = load(save(detector, tmp_path / "m.oods")).extra_
    assert list(loaded) == list(value) and type(loaded[1]) is tuple and type(loaded[1][0]) is np.float32
    assert loaded[(2, "b")] == {frozenset({3})} and np.isnan(loaded["n"]) and loaded["x"] == 0.1 + 0.2
    assert loaded["t"].strides == value["t"].strides and np.array_equal(loaded["t"], value["t"])
    assert loaded["big"] == 2 ** 80 and loaded["bytes"] == b"\x00\xff" and loaded["dt"] == value["dt"]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a is b or type(a) is type(b) and a == b
