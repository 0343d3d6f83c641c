"""Scale-out numbers: the Ray engine's overhead on the CIFAR-10 bench, and a sharded KNN bank.

``extract``: every split of the shared CIFAR-10 bench (ResNet-20) extracted in one run with the local engine
(``torch`` with ``--threads`` threads), then the Ray engine with 1 worker (``--threads`` CPUs) and with 2 workers
(``--threads / 2`` CPUs each), each into a fresh cache directory (so each computes everything), through the
benchmark's own path (:func:`oodscope.runner.extract_benchmark`: one Ray Data execution for all splits). Ray is
started before the timings (a deployment points ``--address`` at a running cluster); its start is printed
apart. Printed: seconds of each, images/s, the ratio Ray / local (goal <= 1.3 at 1 worker), and whether every
split's logits and features are identical to the local engine's.

``knn``: a synthetic bank (``--bank`` rows x ``--dim``, float32, written to a memmap in chunks) fitted into
``knn`` with ``shards`` = 1, 2, 4 (one exact ``IndexFlatL2`` per shard, exact top-k merge): the memory of each
shard's index, the resident memory after the fit, the query throughput for ``--queries`` queries (k = 50), and
whether the scores equal the single index's.

    PYTHONPATH=. python benchmarks/scale_out.py extract --threads 2                  # full bench, 49,993 images
    PYTHONPATH=. python benchmarks/scale_out.py knn --bank 1000000 --dim 2048         # 8 GiB bank
    PYTHONPATH=. python benchmarks/scale_out.py extract --images 2000 --threads 2     # a quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import cifar_bench, cifar_weights


def rss_gib() -> float:
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kib / 1024**2


def extract_part(args: argparse.Namespace) -> None:
    import ray
    import torch

    from oodscope.extraction.ray_engine import OBJECT_STORE_BYTES, RayEngine
    from oodscope.models.cifar_resnet import cifar_preprocess, load_cifar_resnet
    from oodscope.runner import extract_benchmark

    bench = cifar_bench()
    if args.images:
        bench = _subset(bench, args.images)
    n_images = sum(len(split.inputs) for split in bench.datasets().values())
    model = load_cifar_resnet("cifar10_resnet20", cifar_weights("cifar10_resnet20")).eval()
    preprocess = cifar_preprocess("cifar10_resnet20")
    start = time.perf_counter()
    ray.init(address="local", num_cpus=args.threads, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    print(f"ray.init: {time.perf_counter() - start:.1f} s ({args.threads} CPUs)")
    half = max(1.0, args.threads / 2)
    runs = [("local", None), ("ray, 1 worker", RayEngine(workers=1, cpus_per_worker=float(args.threads))),
            ("ray, 2 workers", RayEngine(workers=2, cpus_per_worker=half))]
    seconds, outputs = {}, {}
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        for label, engine in runs:
            options = {} if engine is None else {"engine": engine}
            start = time.perf_counter()
            outputs[label] = extract_benchmark(bench, model, preprocess, cache_dir=Path(work) / label.replace(" ", ""),
                                               batch_size=args.batch_size, progress=False, **options)
            seconds[label] = time.perf_counter() - start
    print(f"{n_images} images, batch {args.batch_size}, {args.threads} threads:")
    for label in seconds:
        same = all(np.array_equal(outputs[label][name].logits, outputs["local"][name].logits)
                   and np.array_equal(outputs[label][name].features, outputs["local"][name].features)
                   for name in outputs["local"])
        print(f"  {label:<15} {seconds[label]:8.1f} s  {n_images / seconds[label]:8.0f} images/s  "
              f"ratio to local {seconds[label] / seconds['local']:.2f}  identical to local: {same}")


def _subset(bench, n: int):
    """The bench with the first ``n`` images of every split (a quick check of the script)."""
    def cut(split):
        return dataclasses.replace(split, inputs=split.inputs[:n],
                                   labels=None if split.labels is None else split.labels[:n])

    return dataclasses.replace(bench, train=cut(bench.train), val=cut(bench.val), test=cut(bench.test),
                               ood={g: {d: cut(s) for d, s in sets.items()} for g, sets in bench.ood.items()},
                               ood_val={d: cut(s) for d, s in bench.ood_val.items()})


def knn_part(args: argparse.Namespace) -> None:
    import oodscope

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.tmp) as work:
        bank = np.lib.format.open_memmap(Path(work) / "bank.npy", mode="w+", dtype=np.float32,
                                         shape=(args.bank, args.dim))
        for start in range(0, args.bank, 65536):
            stop = min(args.bank, start + 65536)
            bank[start:stop] = rng.standard_normal((stop - start, args.dim), dtype=np.float32)
        bank.flush()
        queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
        print(f"bank {args.bank} x {args.dim} float32 ({args.bank * args.dim * 4 / 1024**3:.2f} GiB), "
              f"{args.queries} queries, k={args.k}; resident before fits {rss_gib():.2f} GiB")
        reference = None
        for shards in args.shards:
            start = time.perf_counter()
            knn = oodscope.create("knn", k=args.k, shards=shards).fit(bank)
            fit = time.perf_counter() - start
            sizes = ([int(s.ntotal) for s in knn.index_.shards] if shards > 1 else [int(knn.index_.ntotal)])
            resident = rss_gib()
            start = time.perf_counter()
            scores = knn.score(queries)
            search = time.perf_counter() - start
            same = True if reference is None else bool(np.array_equal(scores, reference))
            reference = scores if reference is None else reference
            print(f"  shards={shards}: fit {fit:6.1f} s; per shard {max(sizes)} rows = "
                  f"{max(sizes) * args.dim * 4 / 1024**3:.2f} GiB; resident {resident:.2f} GiB; "
                  f"{args.queries / search:8.1f} queries/s; scores identical to shards=1: {same}")
            del knn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    ext = sub.add_parser("extract", help="Ray engine overhead on the shared CIFAR-10 bench")
    ext.add_argument("--images", type=int, default=0, help="first N images of each split (0: all)")
    ext.add_argument("--threads", type=int, default=2)
    ext.add_argument("--batch-size", type=int, default=256)
    knn = sub.add_parser("knn", help="sharded KNN bank: memory per shard and query throughput")
    knn.add_argument("--bank", type=int, default=1_000_000)
    knn.add_argument("--dim", type=int, default=2048)
    knn.add_argument("--queries", type=int, default=1000)
    knn.add_argument("--k", type=int, default=50)
    knn.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    knn.add_argument("--tmp", default=os.environ.get("TMPDIR", "/tmp"), help="where the bank's memmap goes")
    args = parser.parse_args()
    extract_part(args) if args.part == "extract" else knn_part(args)


if __name__ == "__main__":
    main()
