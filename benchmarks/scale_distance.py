"""Fit and score time of the distance/density detectors: CIFAR-10 bench (ResNet-20) and a synthetic 1M x 2048 bank.

    PYTHONPATH=. python benchmarks/scale_distance.py cifar            # cached ResNet-20 features
    PYTHONPATH=. python benchmarks/scale_distance.py synthetic        # 1M x 2048 float32 bank on disk (np.memmap)
    PYTHONPATH=. python benchmarks/scale_distance.py synthetic --n 200000 --queries 500   # smaller

The synthetic bank (100 classes, float32, 8 GiB) is written once to ``--bank`` as a memmap and read in chunks,
so the class statistics never hold a float64 copy of it. What runs at that size:

* class-conditional statistics for Mahalanobis / WDiscOOD (chunked float64 scatter, one product per chunk),
  then their scores (chunked). The registered ``mahalanobis`` detector converts the whole bank to float64
  (16 GiB) in ``fit``, so here its fitted state is built from :func:`class_stats` and its own ``whitening`` /
  ``min_squared_distance`` functions;
* ``conjnorm`` (importance-sampled partition over the full bank), ``igeood_features``;
* exact kNN (k = 50, L2-normalised): brute force with ``faiss.knn`` over bank chunks, merged top-k, for
  ``--queries`` queries (the registered ``knn`` detector would copy the 8 GiB bank into a faiss index);
* not run at that size: ``relation_graph`` (keeps a normalised float32 copy of the bank and scores against all of
  it) and ``heat`` (trains networks; CPU schedule timed in ``suite2_density_table.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import oodscope  # noqa: E402
from oodscope import Outputs  # noqa: E402
from oodscope.detectors._classstats import class_stats, rows_per_chunk  # noqa: E402
from oodscope.detectors.mahalanobis import min_squared_distance, whitening  # noqa: E402


BENCH = "../shared/data/cifar10-bench"     # relative to the repository root


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def row(name, fit_s, score_s, n_scored, note=""):
    print(f"{name:<18}{fit_s:>10.2f}{score_s:>10.2f}{n_scored:>10d}  {note}", flush=True)


def header(title):
    print(f"\n{title}\n{'detector':<18}{'fit [s]':>10}{'score [s]':>10}{'scored':>10}", flush=True)


def cifar(cache_dir: str) -> None:
    from oodscope.data.spec import load_benchmark_dir
    from oodscope.models.zoo import load_model
    from oodscope.runner import extract_benchmark

    bench = load_benchmark_dir(BENCH)
    model, pre = load_model("cifar10_resnet20", f"{BENCH}/models/cifar10_resnet20.pth")
    out = extract_benchmark(bench, model, pre, cache_dir=cache_dir, progress=False)
    scored = [out[k] for k in ("test", "near/cifar100", "near/tin", "far/mnist", "far/textures")]
    n_scored = sum(len(o) for o in scored)
    header(f"CIFAR-10 bench, ResNet-20 features {out['train'].features.shape} (fit on train, score test + 4 OOD)")
    for name in ("mahalanobis", "knn", "wdiscood", "conjnorm", "igeood", "igeood_features", "relation_graph"):
        det = oodscope.create(name)
        _, fit_s = timed(lambda: det.fit(out["train"]))
        _, score_s = timed(lambda: [det.score(o) for o in scored])
        row(name, fit_s, score_s, n_scored)


def make_bank(path: str, n: int, dim: int, n_classes: int, seed: int = 0):
    labels = np.random.default_rng(seed).integers(0, n_classes, n)
    if os.path.exists(path) and os.path.getsize(path) == n * dim * 4:
        return np.memmap(path, dtype=np.float32, mode="r", shape=(n, dim)), labels
    rng = np.random.default_rng(seed + 1)
    means = rng.normal(size=(n_classes, dim)).astype(np.float32)
    bank = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, dim))
    for start in range(0, n, 32768):
        stop = min(n, start + 32768)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        bank[start:stop] = np.maximum(means[labels[start:stop]] + 2.0 * block, 0.0)   # post-ReLU-like
    bank.flush()
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n, dim)), labels


def exact_knn_chunked(bank, queries: np.ndarray, k: int, chunk: int = 131072) -> np.ndarray:
    """Distance to the k-th nearest L2-normalised bank row, streaming the bank through faiss.knn."""
    import faiss

    q = np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True), dtype=np.float32)
    best = np.full((len(q), k), np.inf, dtype=np.float32)
    for start in range(0, len(bank), chunk):
        block = np.asarray(bank[start:start + chunk], dtype=np.float32)
        block = np.ascontiguousarray(block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12))
        dist, _ = faiss.knn(q, block, min(k, len(block)))
        best = np.sort(np.concatenate([best, dist], axis=1), axis=1)[:, :k]
    return np.sqrt(np.maximum(best[:, -1], 0.0))


def synthetic(path: str, n: int, dim: int, n_classes: int, n_queries: int, k: int, only: set[str]) -> None:
    (bank, labels), make_s = timed(lambda: make_bank(path, n, dim, n_classes))
    print(f"synthetic bank {bank.shape} float32 on disk ({bank.nbytes / 2**30:.1f} GiB), {n_classes} classes, "
          f"made/opened in {make_s:.1f} s; chunk {rows_per_chunk(dim)} rows", flush=True)
    queries = np.asarray(bank[:n_queries], dtype=np.float32) + np.random.default_rng(2).normal(
        size=(n_queries, dim)).astype(np.float32)
    header(f"synthetic {n} x {dim} bank, {n_queries} queries")

    # Mahalanobis from chunked class statistics (the detector's own whitening and chunked scoring)
    def fit_maha():  # noqa: E306
        stats = class_stats(bank, labels, n_classes, "mahalanobis")
        whitener = whitening(stats.within)
        return whitener, stats.means @ whitener
    if "mahalanobis" in only:
        (whitener, wmeans), fit_s = timed(fit_maha)
        _, score_s = timed(lambda: min_squared_distance(queries, whitener, wmeans))
        row("mahalanobis*", fit_s, score_s, n_queries, "chunked class_stats + mahalanobis.whitening/min_squared_distance")

    train = Outputs(features=bank, labels=labels, name="bank")
    test = Outputs(features=queries, name="queries")
    for name in [d for d in ("wdiscood", "conjnorm", "igeood_features") if d in only]:
        det = oodscope.create(name)
        _, fit_s = timed(lambda: det.fit(train))
        _, score_s = timed(lambda: det.score(test))
        row(name, fit_s, score_s, n_queries)
    if "knn" not in only:
        return
    _, knn_s = timed(lambda: exact_knn_chunked(bank, queries, k))
    row(f"knn (k={k})", 0.0, knn_s, n_queries, "exact, faiss.knn streamed over 128k-row bank chunks")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["cifar", "synthetic"])
    parser.add_argument("--cache-dir", default=os.environ.get("OODSCOPE_CACHE"))
    parser.add_argument("--bank", default="/tmp/oodscope_scale_bank.f32")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--detectors", default="mahalanobis,wdiscood,conjnorm,igeood_features,knn")
    parser.add_argument("--k", type=int, default=50)
    args = parser.parse_args()
    if args.what == "cifar":
        cifar(args.cache_dir)
    else:
        synthetic(args.bank, args.n, args.dim, args.classes, args.queries, args.k, set(args.detectors.split(",")))


if __name__ == "__main__":
    main()
