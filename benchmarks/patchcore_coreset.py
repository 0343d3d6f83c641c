"""PatchCore's greedy coreset: the batched exact selection against the plain loop it replaced, in one run.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/patchcore_coreset.py                      # full: ~90 min
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/patchcore_coreset.py --n 40000 --max-train 40 \
        --legacy-steps 300 --check-steps 100                                                    # quick: ~1 min

Two banks, PatchCore's defaults (``coreset_ratio`` 0.1, 128-d random projection, seed 0):

* ``synthetic``: ``--n`` (default 522,928 = 667 images x 28 x 28 patches, the size of the magnetic-tile bank at
  224 px) x 1024 float32 rows, Gaussian clusters on a 32-dimensional subspace plus isotropic noise;
* ``magnetic-tile``: the real bank, PatchCore's own patch features of ``--max-train`` training images of
  ``../shared/data/magnetic-tile`` at ``--size`` px (default: all 667 at 224 px, the ``oodscope ad`` default).

For each it times ``oodscope.imagead.coreset.greedy_coreset`` and the loop it replaced (``legacy_greedy_coreset``
below: one full float32 matrix-vector pass per selected patch), prints both, their ratio, and

* ``plain==new``: the new indices equal those of the plain loop with the same distances for the first
  ``--check-steps`` picks (the exactness that ``tests/test_coreset.py`` proves on small data, here at scale);
* ``legacy agree``: how many leading picks the legacy loop shares with the new one. They share the algorithm but
  not the round-off: the legacy loop took ``|x|^2 - 2 x.c + |c|^2`` from a BLAS matrix-vector product, whose
  per-row rounding depends on the kernel's blocking and cancels badly far from the origin, so near-ties can go
  the other way (then the selections differ from that pick on); it also did not exclude selected patches.

``--legacy-steps S`` times the legacy loop on its first ``S`` picks only and scales the time to the coreset size
(each of its steps is the same full pass; printed as ``extrapolated``); 0 runs it to the end. ``--scores``
(magnetic-tile, full legacy run only) also scores the test images with both memory banks and prints the image
AUROCs and the largest relative score difference.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from benchmarks.common import magnetic_tile_dir
from oodscope.imagead.coreset import greedy_coreset, project

MAGNETIC_TILE_PATCHES = 667 * 28 * 28


def legacy_greedy_coreset(features: np.ndarray, n_select: int, projection_dim: int | None = 128, seed: int = 0,
                          max_steps: int | None = None) -> np.ndarray:
    """The selection PatchCore used before (oodscope 2026-12-02): one full pass per pick, BLAS distances."""
    x = project(features, projection_dim, seed)
    n_select = int(min(max(n_select, 1), len(x)))
    steps = n_select if not max_steps else min(max_steps, n_select)
    squared = (x * x).sum(1)
    selected = np.empty(steps, dtype=np.int64)
    selected[0] = np.random.default_rng(seed).integers(len(x))
    nearest = torch.full((len(x),), float("inf"))
    for i in range(1, steps):
        c = x[selected[i - 1]]
        torch.minimum(nearest, squared - 2 * (x @ c) + squared[selected[i - 1]], out=nearest)
        selected[i] = int(torch.argmax(nearest))
    return selected


def plain_greedy(features: np.ndarray, steps: int, projection_dim: int | None, seed: int) -> np.ndarray:
    """The plain loop with the new distances (elementwise float32), the first ``steps`` picks."""
    x = project(features, projection_dim, seed)
    nearest = torch.full((len(x),), float("inf"))
    chosen = [int(np.random.default_rng(seed).integers(len(x)))]
    for _ in range(steps - 1):
        nearest = torch.minimum(nearest, ((x - x[chosen[-1]]) ** 2).sum(1))
        nearest[chosen[-1]] = -float("inf")
        chosen.append(int(torch.argmax(nearest)))
    return np.array(chosen)


def synthetic_bank(n: int, dim: int = 1024, latent: int = 32, n_clusters: int = 2000, seed: int = 0) -> np.ndarray:
    """Gaussian clusters of varied spread on a ``latent``-dimensional subspace, plus isotropic noise (float32)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, n_clusters, n)
    centres = rng.normal(scale=3.0, size=(n_clusters, latent)).astype(np.float32)
    spread = rng.uniform(0.2, 1.5, n_clusters).astype(np.float32)
    z = centres[label] + spread[label, None] * rng.standard_normal((n, latent), dtype=np.float32)
    basis = rng.normal(size=(latent, dim)).astype(np.float32) / np.sqrt(latent)
    bank = z @ basis
    bank += 0.05 * rng.standard_normal(bank.shape, dtype=np.float32)
    return bank


def magnetic_tile_bank(root: str, size: int, max_train: int | None):
    """PatchCore's patch-feature bank of the magnetic-tile training images, recorded from a real fit's call."""
    from oodscope.data.mvtec import load_mvtec
    from oodscope.imagead import create
    from oodscope.imagead import patchcore as module

    data = load_mvtec(root, size=size, max_train=max_train)
    seen = {}

    def recording(features, n_select, *args, **kwargs):
        seen["bank"], seen["n_select"] = features, n_select
        start = time.perf_counter()
        picks = greedy_coreset(features, n_select, *args, **kwargs)
        seen["new_s"], seen["picks"] = time.perf_counter() - start, picks
        return picks

    module.greedy_coreset, original = recording, module.greedy_coreset
    try:
        start = time.perf_counter()
        detector = create("patchcore").fit(data.train)
        print(f"magnetic-tile: {len(data.train)} train images at {size} px, PatchCore fit "
              f"{time.perf_counter() - start:.1f} s of which coreset {seen['new_s']:.1f} s", flush=True)
    finally:
        module.greedy_coreset = original
    return seen, detector, data


def compare(name: str, bank: np.ndarray, n_select: int, args, new: np.ndarray | None = None,
            new_s: float | None = None) -> np.ndarray | None:
    """Time both selections on ``bank`` and print one result line; the legacy indices if it ran to the end."""
    print(f"{name}: bank {bank.shape[0]:,} x {bank.shape[1]}, coreset {n_select:,}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    if new is None:
        start = time.perf_counter()
        new = greedy_coreset(bank, n_select)
        new_s = time.perf_counter() - start
    check = min(args.check_steps, n_select)
    plain_ok = bool(np.array_equal(plain_greedy(bank, check, 128, 0), new[:check])) if check else None
    start = time.perf_counter()
    legacy = legacy_greedy_coreset(bank, n_select, max_steps=args.legacy_steps or None)
    legacy_s = time.perf_counter() - start
    full = len(legacy) == n_select
    if not full:
        legacy_s *= (n_select - 1) / max(len(legacy) - 1, 1)
    diverge = np.flatnonzero(legacy != new[:len(legacy)])
    agree = int(diverge[0]) if len(diverge) else len(legacy)
    print(f"{name}: new {new_s:8.1f} s   legacy {legacy_s:8.1f} s ({'measured' if full else 'extrapolated from '}"
          f"{'' if full else f'{len(legacy)} picks'})   legacy / new {legacy_s / new_s:6.1f}x   "
          f"plain==new (first {check}) {plain_ok}   legacy agree {agree:,} of {len(legacy):,} picks; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    return legacy if full else None


def score_with_legacy_bank(detector, bank: np.ndarray, legacy: np.ndarray, data) -> None:
    """Image scores from the new coreset and from the legacy one on the same test images."""
    import copy

    from oodscope.detectors.knn import exact_index
    from oodscope.metrics import auroc

    other = copy.copy(detector)
    other.memory_bank_ = np.ascontiguousarray(bank[legacy], dtype=np.float32)
    other.index_ = exact_index(other.memory_bank_)
    new_scores, old_scores = detector.score(data.test), other.score(data.test)
    rel = np.max(np.abs(new_scores - old_scores) / np.abs(old_scores))
    labels = data.test.labels
    print(f"image AUROC new {100 * auroc(new_scores[labels == 0], new_scores[labels == 1]):.2f}, legacy "
          f"{100 * auroc(old_scores[labels == 0], old_scores[labels == 1]):.2f}; max relative score difference "
          f"{rel:.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--banks", default="synthetic,magnetic-tile")
    parser.add_argument("--n", type=int, default=MAGNETIC_TILE_PATCHES, help="synthetic bank rows")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset ratio (PatchCore's default 0.1)")
    parser.add_argument("--root", default=None, help="MVTec-layout folder (default: the data root's magnetic-tile)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--max-train", type=int, default=None, help="magnetic-tile training images (default all)")
    parser.add_argument("--legacy-steps", type=int, default=0, help="time the legacy loop on this many picks only")
    parser.add_argument("--check-steps", type=int, default=200, help="picks compared with the plain loop")
    parser.add_argument("--scores", action="store_true", help="score magnetic-tile with both coresets")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average at start "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    banks = args.banks.split(",")
    if "synthetic" in banks:
        start = time.perf_counter()
        bank = synthetic_bank(args.n)
        print(f"synthetic bank made in {time.perf_counter() - start:.1f} s", flush=True)
        compare("synthetic", bank, int(np.ceil(args.ratio * len(bank))), args)
        del bank
    if "magnetic-tile" in banks:
        seen, detector, data = magnetic_tile_bank(args.root or magnetic_tile_dir(), args.size, args.max_train)
        legacy = compare("magnetic-tile", seen["bank"], seen["n_select"], args, seen["picks"], seen["new_s"])
        if args.scores and legacy is not None:
            score_with_legacy_bank(detector, seen["bank"], legacy, data)


if __name__ == "__main__":
    main()
