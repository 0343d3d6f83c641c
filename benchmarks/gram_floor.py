"""How fast can gram's statistics be? ``gram_row_sums`` against a fused one-pass kernel and a bare read of the maps.

Run (the fused kernel needs ``pip install numba``; without it that line is skipped with a message)::

    cd <repo> && PYTHONPATH=. python benchmarks/gram_floor.py > benchmarks/results/gram_floor.log

Issue 24 asks for the sweep with gram to cost at most 1.15x one extraction pass. In ``sweep_speed.py --parts abg``
(``docs/performance.md``) that pass takes about 1.8 s and the other detectors about 0.13-0.25 s of the sweep, so
gram's fit + score would have to fit in roughly 0.02-0.14 s. Gram's statistics are, for ten poles ``p``, the row
sums ``F^p (F^p^T 1)`` of every map, in float64 (a 10th power in float32 keeps 7 digits at best; the tests hold
the scores to 1e-9). This script times, on maps of the sweep's shapes (2,800 samples of ResNet-20's ``relu``,
``layer1`` (16 x 32 x 32), ``layer2`` (32 x 16 x 16) and ``layer3`` (64 x 8 x 8): 126M values, channels-last
float32 as ``extract`` keeps them; synthetic post-ReLU Gaussian values, since the time does not depend on them):

* ``read``: one float64 sum over every map value (the memory traffic floor: any statistic reads the maps once);
* ``gram_row_sums``: oodscope's implementation (torch, chunked, three passes per pole);
* ``fused``: every pole in one pass over the maps, written for this measurement in numba (per spatial position:
  the powers of its ``C`` channels, their column sum, and the row sums accumulated), exact to 1e-12 against
  ``gram_row_sums``.

Each is timed ``--repeats`` times and the fastest run is printed, with the load average.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from oodscope.detectors.gram import gram_row_sums

SHAPES = [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64)]  # (H, W, C) of relu, layer1, layer2, layer3
POLES = tuple(range(1, 11))


def synthetic_maps(n: int, seed: int = 0) -> list[np.ndarray]:
    """Channels-last ``(n, H, W, C)`` float32 post-ReLU maps of the sweep's layer shapes."""
    rng = np.random.default_rng(seed)
    return [np.maximum(rng.standard_normal((n, *shape), dtype=np.float32), 0) for shape in SHAPES]


def fused_kernel():
    """The numba one-pass kernel ``(maps (B, HW, C) float32, pole steps) -> (B, P, C)`` float64, or ``None``."""
    try:
        from numba import njit, prange
    except ImportError:
        return None

    @njit(parallel=True, fastmath=True, cache=False)
    def row_sums(maps, steps):
        n, positions, channels = maps.shape
        out = np.zeros((n, steps.shape[0], channels))
        for b in prange(n):
            x = np.empty(channels)
            power = np.empty(channels)
            acc = np.zeros((steps.shape[0], channels))
            for k in range(positions):
                for i in range(channels):
                    x[i] = maps[b, k, i]
                    power[i] = 1.0
                for j in range(steps.shape[0]):
                    for _ in range(steps[j]):
                        for i in range(channels):
                            power[i] *= x[i]
                    column = 0.0
                    for i in range(channels):
                        column += power[i]
                    for i in range(channels):
                        acc[j, i] += power[i] * column
            out[b] = acc
        return out

    return row_sums


def fastest(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2800)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    maps = synthetic_maps(args.samples)
    flat = [m.reshape(len(m), -1, m.shape[-1]) for m in maps]
    values = sum(m.size for m in maps)
    print(f"{args.samples} samples, {values / 1e6:.0f}M map values, poles {POLES[0]}..{POLES[-1]}; torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    channel_views = [torch.from_numpy(m).permute(0, 3, 1, 2) for m in maps]  # (B, C, H, W), channels-last memory
    reference = [gram_row_sums(v, POLES).numpy() for v in channel_views]
    read = fastest(lambda: [m.sum(dtype=np.float64) for m in maps], args.repeats)
    torch_time = fastest(lambda: [gram_row_sums(v, POLES) for v in channel_views], args.repeats)
    print(f"read (one float64 sum over the maps): {read:.3f} s")
    print(f"gram_row_sums: {torch_time:.3f} s")
    kernel = fused_kernel()
    if kernel is None:
        print("fused: skipped (pip install numba)")
        return
    steps = np.diff(np.concatenate([[0], POLES])).astype(np.int64)
    start = time.perf_counter()
    kernel(flat[-1][:2], steps)
    print(f"fused: compiled in {time.perf_counter() - start:.1f} s (not timed below)")
    fused = [np.sign(s) * np.abs(s) ** (1.0 / np.asarray(POLES))[None, :, None] for s in
             (kernel(f, steps) for f in flat)]
    error = max(float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300))) for a, b in zip(fused, reference))
    fused_time = fastest(lambda: [kernel(f, steps) for f in flat], args.repeats)
    print(f"fused: {fused_time:.3f} s (largest relative difference to gram_row_sums {error:.1e})")
    print(f"gram_row_sums / fused: {torch_time / fused_time:.2f}; fused / read: {fused_time / read:.1f}")


if __name__ == "__main__":
    main()
