"""Scale-out: merged per-shard statistics, sharded nearest neighbours, extraction on Ray Data.

Every sharded or distributed path is checked against the in-memory / local one on the same data: fitted arrays
equal to ~1e-12 relative and scores to 1e-12 (relative to the scores' scale).
"""

from __future__ import annotations

import numpy as np
import pytest

import oodscope
from oodscope import Head, Outputs
from oodscope.detectors.sharded import (CentredMoment, ClassMoments, ClassScatters, WeightedMoments,
                                        fit_from_shards, merge)

from conftest import gaussian_outputs


def split(outputs: Outputs, cuts: list[int]) -> list[Outputs]:
    """``outputs`` cut into consecutive shards at the row indices ``cuts``."""
    bounds = [0, *cuts, len(outputs)]
    return [Outputs(logits=outputs.logits[a:b], features=outputs.features[a:b],
                    labels=None if outputs.labels is None else outputs.labels[a:b], head=outputs.head,
                    name=f"shard {a}:{b}") for a, b in zip(bounds, bounds[1:])]


def assert_scores_equal(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@pytest.fixture
def data(rng):
    train = gaussian_outputs(rng, n=600, dim=12, n_classes=4, name="train")
    test = gaussian_outputs(rng, n=200, dim=12, n_classes=4, shift=0.5, name="test")
    return train, test


# -- merged statistics --------------------------------------------------------------------------------------
def test_class_moments_merge_equals_one_pass(rng):
    x = rng.normal(size=(500, 7)) * 3 + 100.0   # an offset far from 0: sums of x x^T would lose digits here
    y = rng.integers(0, 3, 500)
    whole = ClassMoments.of(x, y)
    # a shard without class 2 (padded on merge), a one-row shard, merged in another grouping
    parts = [ClassMoments.of(x[a:b], y[a:b]) for a, b in [(0, 1), (1, 200), (200, 500)]]
    merged = parts[0].merge(parts[1].merge(parts[2]))
    np.testing.assert_allclose(merged.counts, np.bincount(y))
    np.testing.assert_allclose(merged.means, whole.means, rtol=1e-13)
    np.testing.assert_allclose(merged.scatter, whole.scatter, rtol=1e-11, atol=1e-11 * np.abs(whole.scatter).max())
    # hand check: the pooled scatter is the sum of per-class centred scatters
    by_hand = sum((x[y == c] - x[y == c].mean(0)).T @ (x[y == c] - x[y == c].mean(0)) for c in range(3))
    np.testing.assert_allclose(merged.scatter, by_hand, rtol=1e-11, atol=1e-11 * np.abs(by_hand).max())


def test_class_scatters_centred_and_weighted_merge(rng):
    x, y = rng.normal(size=(300, 5)), rng.integers(0, 3, 300)
    merged = merge(ClassScatters.of(x[a:b], y[a:b]) for a, b in [(0, 50), (50, 300)])
    for c in range(3):
        rows = x[y == c]
        np.testing.assert_allclose(merged.scatters[c], np.cov(rows.T, bias=True) * len(rows), rtol=1e-12)
    centre = rng.normal(size=5)
    moment = merge(CentredMoment.of(x[a:b], centre) for a, b in [(0, 10), (10, 300)])
    np.testing.assert_allclose(moment.scatter, (x - centre).T @ (x - centre), rtol=1e-12)
    weights, means = np.full(2, 0.5), rng.normal(size=(2, 5))
    prec = np.stack([np.eye(5), 2 * np.eye(5)])
    whole = WeightedMoments.of(x, weights, means, prec)
    parts = merge(WeightedMoments.of(x[a:b], weights, means, prec) for a, b in [(0, 120), (120, 300)])
    np.testing.assert_allclose(parts.counts, whole.counts, rtol=1e-13)
    np.testing.assert_allclose(parts.means, whole.means, rtol=1e-12)
    np.testing.assert_allclose(parts.scatters, whole.scatters, rtol=1e-11)
    assert parts.log_likelihood == pytest.approx(whole.log_likelihood, rel=1e-13)


@pytest.mark.parametrize("name, params", [("mahalanobis", {}), ("rmds", {}), ("vim", {"dim": 6}),
                                          ("residual", {"dim": 6}), ("gmm", {}), ("gmm", {"max_iter": 0})])
def test_fit_from_shards_equals_in_memory_fit(data, name, params):
    train, test = data
    whole = oodscope.create(name, **params).fit(train)
    sharded = fit_from_shards(oodscope.create(name, **params), split(train, [100, 101, 350]))
    assert_scores_equal(sharded.score(test), whole.score(test))
    for attr in ("means_", "covariance_", "covariances_", "weights_", "origin_", "alpha_"):
        if hasattr(whole, attr):
            want = np.asarray(getattr(whole, attr))
            np.testing.assert_allclose(getattr(sharded, attr), want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    assert getattr(sharded, "n_iter_", 0) == getattr(whole, "n_iter_", 0)
    assert sharded.input_dims_ == whole.input_dims_ and sharded.input_range_ == whole.input_range_


def test_detectors_fitted_from_shards_save_and_load(data, tmp_path):
    train, test = data
    for name in ("rmds", "gmm", "vim"):
        params = {"dim": 6} if name == "vim" else {}
        fitted = fit_from_shards(oodscope.create(name, **params), split(train, [250]))
        again = oodscope.load(fitted.save(tmp_path / f"{name}.oodscope"))
        np.testing.assert_array_equal(again.score(test), fitted.score(test))


def test_fit_from_shards_refuses_bad_shards(data):
    train, _ = data
    shards = split(train, [300])
    with pytest.raises(ValueError, match="cannot be fitted from shards"):
        fit_from_shards(oodscope.create("knn"), shards)
    with pytest.raises(ValueError, match="sequence"):
        fit_from_shards(oodscope.create("mahalanobis"), iter(shards))
    with pytest.raises(ValueError, match="no shards"):
        fit_from_shards(oodscope.create("mahalanobis"), [])
    other = Outputs(logits=shards[1].logits, features=shards[1].features[:, :10], labels=shards[1].labels)
    with pytest.raises(ValueError, match="per-sample shapes"):
        fit_from_shards(oodscope.create("mahalanobis"), [shards[0], other])
    foreign = Outputs(logits=shards[1].logits, features=shards[1].features, labels=shards[1].labels,
                      head=Head(train.head.W * 2, train.head.b), name="foreign")
    with pytest.raises(ValueError, match="another classifier head"):
        fit_from_shards(oodscope.create("vim", dim=6), [shards[0], foreign])
    nan = Outputs(logits=shards[1].logits, features=np.where(np.arange(12) == 3, np.nan, shards[1].features),
                  labels=shards[1].labels)
    with pytest.raises(ValueError, match="NaN"):
        fit_from_shards(oodscope.create("mahalanobis"), [shards[0], nan])
    only_three = [Outputs(logits=s.logits[s.labels < 3], features=s.features[s.labels < 3],
                          labels=s.labels[s.labels < 3]) for s in shards]
    with pytest.raises(ValueError, match=r"classes \[3\] have no training samples"):
        fit_from_shards(oodscope.create("mahalanobis"), only_three)
    with pytest.raises(ValueError, match="n_components=None"):
        fit_from_shards(oodscope.create("gmm", n_components=2), shards)
    unlabelled = Outputs(features=shards[0].features)
    with pytest.raises(ValueError, match="labels"):
        fit_from_shards(oodscope.create("gmm"), [unlabelled])


# -- sharded nearest neighbours -----------------------------------------------------------------------------
def test_sharded_index_merges_top_k_exactly(rng):
    import faiss

    from oodscope.detectors._sharded_index import sharded_exact_index

    # 2048-d, as a ResNet-50 feature: faiss's float32 BLAS blocks round differently where a block starts
    # elsewhere, so this checks the 1024-row alignment of the shard boundaries, bit for bit
    bank = rng.normal(size=(5000, 2048)).astype(np.float32)
    queries = rng.normal(size=(100, 2048)).astype(np.float32)
    single = faiss.IndexFlatL2(2048)
    single.add(bank)
    want_d, want_i = single.search(queries, 10)
    for n_shards in (1, 2, 3, 4):
        index = sharded_exact_index(bank, n_shards)
        assert index.ntotal == 5000 and index.d == 2048 and len(index.shards) == n_shards
        assert all(shard.ntotal > 0 for shard in index.shards) and all(o % 1024 == 0 for o in index.offsets)
        got_d, got_i = index.search(queries, 10)
        np.testing.assert_array_equal(got_d, want_d)
        np.testing.assert_array_equal(got_i, want_i)   # distinct random distances: no ties, so the same rows
    # a shard smaller than k: its candidates are all it has; more k than rows: faiss's inf / -1 padding
    small = sharded_exact_index(bank[:12], 5)   # under 1024 rows: one non-empty shard
    assert sorted(int(s.ntotal) for s in small.shards) == [0, 0, 0, 0, 12]
    d, i = small.search(queries[:4], 14)
    assert np.isinf(d[:, 12:]).all() and (i[:, 12:] == -1).all() and np.isfinite(d[:, :12]).all()


@pytest.mark.parametrize("name, params", [("knn", {"k": 5}), ("knn_distance", {}),
                                          ("knn_distance", {"method": "mean", "k": 7}), ("dte_np", {}),
                                          ("mean_shifted", {})])
def test_sharded_bank_scores_equal_single_index(rng, name, params):
    train = gaussian_outputs(rng, n=4500, dim=256, n_classes=4, name="train")   # 4 shards of >= 1024 rows
    test = gaussian_outputs(rng, n=300, dim=256, n_classes=4, shift=0.5, name="test")
    want = oodscope.create(name, **params).fit(train).score(test)
    for shards in (2, 4):
        got = oodscope.create(name, shards=shards, **params).fit(train).score(test)
        np.testing.assert_array_equal(got, want)


def test_sharded_knn_saves_and_loads(data, tmp_path):
    train, test = data
    knn = oodscope.create("knn", k=5, shards=3).fit(train)
    again = oodscope.load(knn.save(tmp_path / "knn.oodscope"))
    np.testing.assert_array_equal(again.score(test), knn.score(test))
    assert len(again.index_.shards) == 3


def test_sharded_knn_refuses_bad_parameters(data):
    train, _ = data
    with pytest.raises(ValueError, match="shards must be a positive integer"):
        oodscope.create("knn", shards=0).fit(train)
    with pytest.raises(ValueError, match="needs index='exact'"):
        oodscope.create("knn", shards=2, index="hnsw").fit(train)
    with pytest.raises(ValueError, match="more than the training bank"):
        oodscope.create("knn_distance", k=1, shards=len(train) + 1).fit(train)


# -- extraction on Ray Data ---------------------------------------------------------------------------------
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

from oodscope.extraction import cache  # noqa: E402
import oodscope.extraction.extract as extract_module  # noqa: E402
from oodscope.extraction.ray_engine import RayEngine, as_engine, plan  # noqa: E402

SENTINEL = 1000.0  # an input value marking the row a Flaky model fails on


class Flaky(torch.nn.Module):
    """A small classifier that, while the file ``marker`` exists, fails on the batch holding the sentinel row:
    ``mode="raise"`` raises every time, ``mode="kill"`` removes the marker and kills its own process (the Ray
    actor), once. Every batch it runs is logged as a file in ``calls`` (to count what a rerun recomputes)."""

    cache_ignore = ("marker", "mode", "calls")  # test plumbing: never changes the outputs

    def __init__(self, marker: str = "", mode: str = "raise", calls: str = ""):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 3)
        self.marker, self.mode, self.calls = marker, mode, calls

    def forward(self, x):
        if self.calls:
            open(os.path.join(self.calls, f"{os.getpid()}-{os.urandom(6).hex()}"), "w").close()
        if self.marker and os.path.exists(self.marker) and bool((x == SENTINEL).any()):
            if self.mode == "kill":
                os.unlink(self.marker)
                os._exit(1)
            raise RuntimeError("planted failure")
        return self.fc(self.body(x))


def images(n: int = 500, sentinel_row: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 3, 2, 2)).astype(np.float32)
    if sentinel_row is not None:
        x[sentinel_row, 0, 0, 0] = SENTINEL
    return x, rng.integers(0, 3, n)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'oodscope[ray]')")
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def run_both(tmp_path, model, data, **kw):
    local = oodscope.extract(model, data, name="set", cache_dir=tmp_path / "local", progress=False, **kw)
    on_ray = oodscope.extract(model, data, name="set", cache_dir=tmp_path / "ray", progress=False,
                              engine=RayEngine(workers=2), **kw)
    return local, on_ray


def test_ray_engine_equals_local_and_writes_the_same_entry(ray_cluster, tmp_path, monkeypatch):
    x, y = images()
    model = Flaky()
    local, on_ray = run_both(tmp_path, model, (x, y), batch_size=32, checkpoint_every=3, layers=["body.1"])
    for part in ("logits", "features", "labels"):
        np.testing.assert_array_equal(getattr(on_ray, part), getattr(local, part))
    np.testing.assert_array_equal(on_ray.layers["body.1"], local.layers["body.1"])
    np.testing.assert_array_equal(on_ray.head.W, local.head.W)
    for name in ("vim", "knn", "mahalanobis"):
        want = oodscope.create(name).fit(local).score(local)
        np.testing.assert_array_equal(oodscope.create(name).fit(on_ray).score(on_ray), want)
    # one entry, same file name, no chunks left; the local engine reads it without running the model
    entries = sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert entries == sorted(p.name for p in (tmp_path / "local").iterdir()) and len(entries) == 1
    monkeypatch.setattr(extract_module, "_run", lambda *a, **k: pytest.fail("the model ran on a cache hit"))
    again = oodscope.extract(model, (x, y), name="set", cache_dir=tmp_path / "ray", progress=False,
                             batch_size=32, checkpoint_every=3, layers=["body.1"])
    np.testing.assert_array_equal(again.features, local.features)


@pytest.mark.slow
def test_ray_run_resumes_without_recomputing_finished_shards(ray_cluster, tmp_path):
    x, y = images(sentinel_row=450)  # batch 14 of 16 (batch_size 32), in the last shard (batches 14-15)
    marker, calls = tmp_path / "fail", tmp_path / "calls"
    marker.touch()
    calls.mkdir()
    model = Flaky(str(marker), "raise", str(calls))
    with pytest.raises(Exception, match="planted failure"):
        oodscope.extract(model, (x, y), name="set", cache_dir=tmp_path / "c", progress=False, batch_size=32,
                         checkpoint_every=2, engine=RayEngine(workers=2))
    parts = sorted(p.name for p in (tmp_path / "c").glob("*.part*"))
    assert 0 < len(parts) < 8 and not any(p.endswith("part000014") for p in parts)
    finished_batches = 2 * len(parts)
    marker.unlink()
    for f in calls.iterdir():
        f.unlink()
    resumed = oodscope.extract(model, (x, y), name="set", cache_dir=tmp_path / "c", progress=False, batch_size=32,
                               checkpoint_every=2, engine=RayEngine(workers=2))
    assert len(list(calls.iterdir())) == 16 - finished_batches   # only the missing shards ran
    local = oodscope.extract(Flaky(), (x, y), name="set", cache_dir=tmp_path / "l", progress=False, batch_size=32)
    np.testing.assert_array_equal(resumed.features, local.features)
    assert not list((tmp_path / "c").glob("*.part*"))


@pytest.mark.slow
def test_ray_worker_killed_mid_run_finishes(ray_cluster, tmp_path):
    x, y = images(sentinel_row=200)
    marker = tmp_path / "kill"
    marker.touch()
    model = Flaky(str(marker), "kill")
    on_ray = oodscope.extract(model, (x, y), name="set", cache_dir=tmp_path / "c", progress=False, batch_size=32,
                              checkpoint_every=2, engine=RayEngine(workers=2))
    assert not marker.exists()   # the actor did die once
    local = oodscope.extract(Flaky(), (x, y), name="set", cache_dir=tmp_path / "l", progress=False, batch_size=32)
    np.testing.assert_array_equal(on_ray.logits, local.logits)
    np.testing.assert_array_equal(on_ray.labels, local.labels)


@pytest.mark.slow
def test_ray_refuses_a_shard_of_another_model(ray_cluster, tmp_path):
    x, y = images()
    model = Flaky()
    entry = oodscope.extract(model, (x, y), name="set", cache_dir=tmp_path, progress=False, batch_size=32)
    path = next(tmp_path.glob("*.npz"))
    path.unlink()
    foreign = {"logits": np.zeros((64, 3), np.float32), "features": np.zeros((64, 16), np.float32),
               "labels": y[:64]}
    assert cache.save_chunk(path, "another model's key", foreign, 0, 2, 32)
    with pytest.warns(UserWarning, match="written for another model"):
        on_ray = oodscope.extract(model, (x, y), name="set", cache_dir=tmp_path, progress=False, batch_size=32,
                                  checkpoint_every=2, engine=RayEngine(workers=2))
    np.testing.assert_array_equal(on_ray.features, entry.features)


def test_ray_engine_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="engine must be"):
        as_engine("spark")
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        as_engine(RayEngine(workers=0))
    with pytest.raises(ValueError, match="gpus_per_worker must be"):
        as_engine(RayEngine(gpus_per_worker=-1))
    assert plan(100, 32, 2) == [(0, 2), (2, 2)] and plan(129, 32, 2) == [(0, 2), (2, 2), (4, 1)]
    x, y = images(64)
    with pytest.raises(ValueError, match="needs gpus_per_worker > 0"):
        oodscope.extract(Flaky(), (x, y), cache_dir=tmp_path, progress=False, device="cuda", engine="ray")
    monkeypatch.setitem(sys.modules, "ray", None)   # as if Ray were not installed
    with pytest.raises(ImportError, match=r"pip install 'oodscope\[ray\]'"):
        oodscope.extract(Flaky(), (x, y), cache_dir=tmp_path, progress=False, engine="ray")


def test_extract_many_runs_every_set_in_one_ray_execution(ray_cluster, tmp_path, monkeypatch):
    from oodscope.extraction import ray_engine

    x, y = images(300)
    mapped = np.lib.format.open_memmap(tmp_path / "b.npy", mode="w+", dtype=np.float32, shape=(100, 3, 2, 2))
    mapped[:] = x[200:]
    sets = {"a": (x[:200], y[:200]), "b": mapped}   # labelled arrays, and an unlabelled memory map
    calls = []
    real = ray_engine.run_many
    monkeypatch.setattr(ray_engine, "run_many", lambda engine, model, jobs: calls.append(len(jobs))
                        or real(engine, model, jobs))
    model = Flaky()
    on_ray = extract_module.extract_many(model, sets, cache_dir=tmp_path / "r", progress=False, batch_size=32,
                                         engine=RayEngine(workers=2))
    assert calls == [2]
    local = extract_module.extract_many(model, sets, cache_dir=tmp_path / "l", progress=False, batch_size=32)
    for name in sets:
        np.testing.assert_array_equal(on_ray[name].features, local[name].features)
    assert on_ray["b"].labels is None and on_ray["a"].labels.tolist() == y[:200].tolist()


def test_bench_cli_engine_options(capsys):
    from oodscope.cli import main

    assert main(["bench", "--detectors", "msp", "--address", "auto", "--quiet"]) == 2   # needs --engine ray
    assert "--address and --gpus-per-worker need --engine ray" in capsys.readouterr().err
    assert main(["bench", "--detectors", "msp", "--engine", "ray", "--workers", "0", "--quiet"]) == 2
    assert "workers must be a positive integer" in capsys.readouterr().err


class TokenModel(torch.nn.Module):
    """A model of keyword inputs (``input_ids``, ``attention_mask``), as text classifiers take them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(20, 8)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask[..., None].float()
        return self.fc((self.embedding(input_ids) * mask).sum(1) / mask.sum(1))


@pytest.mark.slow
def test_ray_engine_takes_dict_inputs(ray_cluster, tmp_path):
    rng = np.random.default_rng(0)
    data = {"input_ids": rng.integers(0, 20, (300, 7)), "attention_mask": (rng.random((300, 7)) < 0.8) | (
        np.arange(7) == 0)}
    data["attention_mask"] = data["attention_mask"].astype(np.int64)
    local, on_ray = run_both(tmp_path, TokenModel(), (data, rng.integers(0, 3, 300)), batch_size=32)
    np.testing.assert_array_equal(on_ray.logits, local.logits)
    np.testing.assert_array_equal(on_ray.features, local.features)
    np.testing.assert_array_equal(on_ray.labels, local.labels)


@pytest.mark.slow
def test_bench_on_a_separately_started_ray_cluster_equals_local(tmp_path):
    """``oodscope bench --engine ray --address HOST:PORT`` against a cluster started apart with ``ray start --head``
    (the deployment path: the driver is not part of the cluster): the same records and bit-identical cache entries
    as the local engine. Slow (the head's start and drain, the actors' imports: about a minute)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'oodscope[ray]')")
    import json
    import shutil
    import socket
    import subprocess
    import tempfile
    import time

    bin_dir = os.path.dirname(sys.executable)
    ray_cli, oodscope_cli = (shutil.which(name, path=bin_dir) or shutil.which(name) for name in ("ray", "oodscope"))
    with socket.socket() as probe:  # a free port for the head's GCS
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # one torch thread on both sides: the actors run with cpus_per_worker (1) threads, and a float32 forward pass
    # with another thread count rounds differently (measured: 80 % of the logits differ, by up to 6e-6)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    ray_dir = tempfile.mkdtemp(prefix="oodray-")  # short: Ray's socket paths must fit in 107 bytes
    # --block keeps the head in this child process, so terminating it stops this cluster and no other
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--object-store-memory=300000000",
                             f"--temp-dir={ray_dir}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline, log = time.monotonic() + 120, []
        while time.monotonic() < deadline and head.poll() is None:
            log.append(head.stdout.readline())
            if "Ray runtime started" in log[-1]:
                break
        else:
            pytest.fail("ray start --head did not start:\n" + "".join(log)[-2000:])
        runs = {}
        for engine, extra in (("ray", ["--engine", "ray", "--address", f"127.0.0.1:{port}", "--workers", "2"]),
                              ("local", [])):
            cmd = [oodscope_cli, "bench", "--detectors", "msp,energy,knn_distance,mahalanobis",
                   "--cache-dir", str(tmp_path / f"cache_{engine}"), "--out", str(tmp_path / engine), "--quiet",
                   *extra]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            runs[engine] = json.loads((tmp_path / engine / "results.json").read_text())["records"]
    finally:
        head.terminate()
        head.wait(timeout=90)
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert runs["ray"] == runs["local"] and len(runs["local"]) > 0
    entries = sorted(p.name for p in (tmp_path / "cache_local").glob("*.npz"))
    assert entries == sorted(p.name for p in (tmp_path / "cache_ray").glob("*.npz")) and entries
    for name in entries:
        with np.load(tmp_path / "cache_local" / name, allow_pickle=False) as a, \
                np.load(tmp_path / "cache_ray" / name, allow_pickle=False) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])
