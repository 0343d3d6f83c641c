"""Extraction overhead: ``oodscope.extract`` against a bare ``torch.inference_mode()`` loop, and a cache hit.

On the same model (the shared CIFAR-10 ResNet-20), the same uint8 images, batch size and threads, measured in one
run, interleaved: (a) a bare loop (preprocess, forward, a hook for the penultimate features, copy to numpy), (b) ``extract``
writing the cache (first run; chunked checkpoints on), (c) ``extract`` reading it (cache hit). Printed: the
seconds of each and the ratios (b)/(a) (goal <= 1.05) and (a)/(c) (goal >= 20). Each is the best of ``--repeats``.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/extraction_overhead.py --images 10000
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch

import oodscope
from benchmarks.common import cifar_bench, cifar_weights
from oodscope.models.cifar_resnet import cifar_preprocess, load_cifar_resnet


def bare_loop(model, preprocess, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    features: list[np.ndarray] = []
    handle = model.fc.register_forward_hook(lambda _m, inp, _o: features.append(inp[0].flatten(1).numpy()))
    logits = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = preprocess(torch.from_numpy(images[start:start + batch_size]))
                logits.append(model(x).float().numpy())
    finally:
        handle.remove()
    return np.concatenate(logits), np.concatenate(features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bench = cifar_bench()
    images = bench.train.inputs[:args.images]
    model = load_cifar_resnet("cifar10_resnet20", cifar_weights("cifar10_resnet20")).eval()
    preprocess = cifar_preprocess("cifar10_resnet20")
    bares, plains, writes, hits = [], [], [], []

    def run_bare():
        nonlocal logits, features
        start = time.perf_counter()
        logits, features = bare_loop(model, preprocess, images, args.batch_size)
        bares.append(time.perf_counter() - start)

    def run_plain():
        start = time.perf_counter()
        oodscope.extract(model, images, preprocess=preprocess, batch_size=args.batch_size, use_cache=False,
                         progress=False, device="cpu")
        plains.append(time.perf_counter() - start)

    def run_cached():
        nonlocal first, again
        folder = tempfile.mkdtemp(prefix="oodscope-overhead-")
        try:
            options = dict(preprocess=preprocess, batch_size=args.batch_size, cache_dir=folder, progress=False,
                           device="cpu")
            start = time.perf_counter()
            first = oodscope.extract(model, images, name="overhead", **options)
            writes.append(time.perf_counter() - start)
            start = time.perf_counter()
            again = oodscope.extract(model, images, name="overhead", **options)
            hits.append(time.perf_counter() - start)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    logits = features = first = again = None
    runs = [run_bare, run_plain, run_cached]
    for repeat in range(args.repeats):  # interleaved, the order rotated each repeat: drifts and warm-up hit all alike
        for run in runs[repeat % 3:] + runs[:repeat % 3]:
            run()
    print("per repeat (s): bare " + " ".join(f"{t:.2f}" for t in bares) + "; writes the cache "
          + " ".join(f"{t:.2f}" for t in writes))
    paired = sorted(w / b for w, b in zip(writes, bares))
    print(f"extract / bare loop per repeat: median {paired[len(paired) // 2]:.3f}, range {paired[0]:.3f}-{paired[-1]:.3f}")
    bare_s = min(bares)
    assert np.array_equal(first.logits, logits) and np.array_equal(first.features, features)
    assert np.array_equal(again.logits, logits)
    write_s, hit_s = min(writes), min(hits)
    print(f"images {len(images)}, batch {args.batch_size}, threads {torch.get_num_threads()}, "
          f"load average at the end {os.getloadavg()[0]:.2f}")
    print(f"bare inference_mode loop {bare_s:.2f} s; extract without cache {min(plains):.2f} s; extract (writes the "
          f"cache) {write_s:.2f} s; cache hit {hit_s:.3f} s")
    print(f"extract / bare loop: {write_s / bare_s:.3f} (goal <= 1.05); bare loop / cache hit: {bare_s / hit_s:.1f} "
          "(goal >= 20); outputs identical to the bare loop's")


if __name__ == "__main__":
    main()
