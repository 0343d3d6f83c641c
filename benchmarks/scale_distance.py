"""Fit and score time of the distance/density detectors: CIFAR-10 bench (ResNet-20) and a synthetic 1M x 2048 bank.

    PYTHONPATH=. python benchmarks/scale_distance.py cifar            # cached ResNet-20 features
    PYTHONPATH=. python benchmarks/scale_distance.py synthetic        # 1M x 2048 float32 bank on disk (np.memmap)
    PYTHONPATH=. python benchmarks/scale_distance.py synthetic --n 200000 --queries 500   # smaller

The synthetic bank (100 classes, float32, 8 GiB) is written in chunks to ``--bank`` as a memmap (never a
float64 copy: that would be 16 GiB) and handed to the registered detectors as it is; every detector reads it in
row chunks (float64 statistics per chunk for the Gaussian family, float32 chunks into faiss for kNN). Each
detector gets a freshly opened memmap, so the file pages one detector touched are unmapped before the next.
Per detector it prints fit and score time and the peak resident memory, polled every 0.1 s: ``anon`` is memory
the process allocated (statistics, the faiss index), ``rss`` adds the pages of the memory-mapped bank file
that were resident (page cache the kernel can drop at any time). ``--delete`` removes the bank file at the end.

The Gaussian fits are compared with ``xtx64``, a bare ``X^T X`` over the same bank in the same run (one float64
``dsyrk`` per float32 chunk, the cost the fits cannot avoid; ``xtx32`` is the float32 ``ssyrk`` pass): the
``fit/xtx64`` column is the ratio. ``gmm0`` is ``gmm`` with ``max_iter=0`` (class-conditional, as pytorch-ood's
``GMM``); ViM gets a random linear head and the bank's logits under it.

Default synthetic detectors: ``mahalanobis``, ``rmds``, ``knn`` (exact, ``faiss.IndexFlatL2``) and ``knn_ivf``
(``IndexIVFFlat``, ``--nlist`` cells, default ``sqrt(N)`` = 1000 here to keep the k-means training affordable on
2 cores; the detector's own default is faiss's ``4 sqrt(N)``). Others can be named with ``--detectors``
(``wdiscood``, ``conjnorm``, ``igeood_features``); ``relation_graph`` and ``heat`` are not meant for this size.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import threading
import time

import numpy as np

import oodscope
from benchmarks.common import cifar_outputs
from oodscope import Outputs
from oodscope.metrics import auroc

CHUNK_ELEMENTS = 1 << 25  # float64 entries per row chunk of the bare X^T X pass (256 MiB, the fits' own budget)


def rows_per_chunk(dim: int) -> int:
    """Rows per chunk of the bare second-moment pass, at least 256."""
    return max(256, CHUNK_ELEMENTS // max(int(dim), 1))


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def row(name, fit_s, score_s, n_scored, note=""):
    print(f"{name:<18}{fit_s:>10.2f}{score_s:>10.2f}{n_scored:>10d}  {note}", flush=True)


def header(title):
    print(f"\n{title}\n{'detector':<18}{'fit [s]':>10}{'score [s]':>10}{'scored':>10}", flush=True)


CIFAR_DETECTORS = ("mahalanobis", "rmds", "knn", "knn_ivf", "gmm", "nnguide", "wdiscood", "conjnorm", "igeood",
                   "igeood_features", "relation_graph")


def cifar(cache_dir: str, model_name: str = "cifar10_resnet20", detectors=CIFAR_DETECTORS) -> None:
    out, _, _ = cifar_outputs(model_name, cache_dir)
    scored = [out[k] for k in ("test", "near/cifar100", "near/tin", "far/mnist", "far/textures")]
    n_scored = sum(len(o) for o in scored)
    header(f"CIFAR-10 bench, {model_name} features {out['train'].features.shape} (fit on train, score test + 4 OOD); "
           f"load average {os.getloadavg()}")
    for name in detectors:
        det = oodscope.create("knn", index="ivf") if name == "knn_ivf" else oodscope.create(name)
        fit_s = timed(lambda: det.fit(out["train"]))[1]
        _, score_s = timed(lambda: [det.score(o) for o in scored])
        row(name, fit_s, score_s, n_scored)
    print(f"load average {os.getloadavg()}")


def sample(means: np.ndarray, labels: np.ndarray, rng) -> np.ndarray:
    """Post-ReLU-like features of the given classes: ``max(mu_y + 2 e, 0)``, ``e ~ N(0, I)`` (float32)."""
    return np.maximum(means[labels] + 2.0 * rng.standard_normal((len(labels), means.shape[1]), dtype=np.float32), 0.0)


def make_bank(path: str, n: int, dim: int, n_classes: int, seed: int = 0):
    """Labels, class means and a float32 memmap bank of :func:`sample` rows (written in 32k-row chunks)."""
    labels = np.random.default_rng(seed).integers(0, n_classes, n)
    rng = np.random.default_rng(seed + 1)
    means = rng.normal(size=(n_classes, dim)).astype(np.float32)
    if not (os.path.exists(path) and os.path.getsize(path) == n * dim * 4):
        bank = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, dim))
        for start in range(0, n, 32768):
            bank[start:start + 32768] = sample(means, labels[start:start + 32768], rng)
        bank.flush()
        del bank
    return labels, means


class PeakMemory:
    """Peak VmRSS and RssAnon of this process while the block runs (polled from /proc/self/status)."""

    def __enter__(self):
        self.rss = self.anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while True:
            fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
            self.rss = max(self.rss, int(fields["VmRSS"].split()[0]) * 1024)
            self.anon = max(self.anon, int(fields["RssAnon"].split()[0]) * 1024)
            if self._stop.wait(0.1):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def bare_second_moment(bank: np.ndarray, dtype) -> None:
    """The reference the Gaussian fits are measured against: ``X^T X`` over the bank's row chunks, one BLAS
    ``syrk`` per chunk, accumulated in ``dtype`` (float64: what the fits need; float32: the cheapest pass)."""
    from scipy.linalg.blas import dsyrk, ssyrk

    syrk = dsyrk if dtype == np.float64 else ssyrk
    dim = bank.shape[1]
    accumulator = np.zeros((dim, dim), dtype=dtype, order="F")
    for start in range(0, len(bank), rows_per_chunk(dim)):
        block = np.asarray(bank[start:start + rows_per_chunk(dim)], dtype=dtype)
        accumulator = syrk(1.0, block.T, beta=1.0, c=accumulator, trans=0, lower=0, overwrite_c=True)
    return accumulator


BARE = {"xtx64": np.float64, "xtx32": np.float32}
GAUSSIAN = ("mahalanobis", "rmds", "vim", "gmm0")


def head_and_logits(bank: np.ndarray, n_classes: int) -> tuple:
    """A random linear head ``(C, D)`` and the bank's logits under it (float32, chunked), for ViM."""
    rng = np.random.default_rng(3)
    W = (rng.standard_normal((n_classes, bank.shape[1])) / np.sqrt(bank.shape[1])).astype(np.float32)
    b = rng.standard_normal(n_classes).astype(np.float32)
    logits = np.empty((len(bank), n_classes), np.float32)
    for start in range(0, len(bank), 65536):
        logits[start:start + 65536] = np.asarray(bank[start:start + 65536]) @ W.T + b
    return oodscope.Head(W, b), logits


def synthetic(path: str, n: int, dim: int, n_classes: int, n_queries: int, k: int, nlist: int,
              only: list[str], delete: bool) -> None:
    start = time.perf_counter()
    (labels, means), make_s = timed(lambda: make_bank(path, n, dim, n_classes))
    print(f"synthetic bank {n} x {dim} float32 on disk ({n * dim * 4 / 2**30:.1f} GiB) at {path}, {n_classes} classes, "
          f"written/opened in {make_s:.0f} s; chunk {rows_per_chunk(dim)} rows; load average {os.getloadavg()}",
          flush=True)
    # queries: half fresh samples of the bank's classes (ID), half samples of unseen classes (OOD)
    rng = np.random.default_rng(2)
    near = sample(means, rng.integers(0, n_classes, n_queries // 2), rng)
    unseen = rng.normal(size=(n_classes, dim)).astype(np.float32)
    far = sample(unseen, rng.integers(0, n_classes, n_queries - len(near)), rng)
    queries = np.concatenate([near, far])
    print(f"\nsynthetic {n} x {dim} bank, {n_queries} queries (half new samples of the bank's classes, half of unseen classes)\n"
          f"{'detector':<18}{'fit [s]':>10}{'score [s]':>10}{'scored':>8}{'anon GiB':>10}{'rss GiB':>9}"
          f"{'AUROC':>7}{'fit/xtx64':>10}  load average", flush=True)
    n_near = len(near)
    head = logits = None
    if "vim" in only:
        head, logits = head_and_logits(np.memmap(path, dtype=np.float32, mode="r", shape=(n, dim)), n_classes)
        query_logits = queries @ head.W.T + head.b
    bare_s = None
    for name in only:
        gc.collect()
        bank = np.memmap(path, dtype=np.float32, mode="r", shape=(n, dim))
        if name in BARE:
            with PeakMemory() as peak:
                fit_s = timed(lambda: bare_second_moment(bank, BARE[name]))[1]
            bare_s = fit_s if name == "xtx64" else bare_s
            print(f"{name:<18}{fit_s:>10.1f}{'':>10}{'':>8}{peak.anon / 2**30:>10.2f}{peak.rss / 2**30:>9.2f}"
                  f"{'':>7}{'':>10}  {os.getloadavg()}", flush=True)
            del bank
            continue
        train = Outputs(features=bank, labels=labels, head=head, logits=logits if name == "vim" else None,
                        name="bank")
        query = Outputs(features=queries, head=head, logits=query_logits) if name == "vim" else queries
        if name == "knn_ivf":
            det = oodscope.create("knn", k=k, index="ivf", nlist=nlist)
        elif name == "knn":
            det = oodscope.create("knn", k=k)
        elif name == "gmm0":
            det = oodscope.create("gmm", max_iter=0)  # the class-conditional fit (pytorch-ood's GMM); EM is not for this size
        else:
            det = oodscope.create(name)
        with PeakMemory() as peak:   # (fit returns the detector: keep no reference, or its state outlives del)
            fit_s = timed(lambda: det.fit(train))[1]
            scores, score_s = timed(lambda: det.score(query))
        ratio = f"{fit_s / bare_s:>10.2f}" if bare_s and name in GAUSSIAN else f"{'':>10}"
        print(f"{name:<18}{fit_s:>10.1f}{score_s:>10.2f}{n_queries:>8d}{peak.anon / 2**30:>10.2f}"
              f"{peak.rss / 2**30:>9.2f}{auroc(scores[:n_near], scores[n_near:]):>7.3f}{ratio}  {os.getloadavg()}", flush=True)
        del det, train, bank
    print(f"process peak RSS (ru_maxrss, includes mapped bank pages): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; total {time.perf_counter() - start:.0f} s")
    if delete:
        os.remove(path)
        print(f"deleted {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["cifar", "synthetic"])
    parser.add_argument("--cache-dir", default=os.environ.get("OODSCOPE_CACHE"))
    parser.add_argument("--model", default="cifar10_resnet20", help="cifar mode: zoo model with cached outputs")
    parser.add_argument("--bank", default="/tmp/oodscope_scale_bank.f32")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--detectors", default=None,
                        help="comma-separated; default: mahalanobis,rmds,knn,knn_ivf (synthetic), CIFAR_DETECTORS (cifar)")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells for knn_ivf (default sqrt(N))")
    parser.add_argument("--delete", action="store_true", help="remove the bank file afterwards")
    args = parser.parse_args()
    if args.what == "cifar":
        cifar(args.cache_dir, args.model, args.detectors.split(",") if args.detectors else CIFAR_DETECTORS)
    else:
        synthetic(args.bank, args.n, args.dim, args.classes, args.queries, args.k,
                  args.nlist or int(np.sqrt(args.n)), (args.detectors or "mahalanobis,rmds,knn,knn_ivf").split(","),
                  args.delete)


if __name__ == "__main__":
    main()
