"""Side-by-side check of oodscope's AUPRO and AUPIMO against anomalib's implementations on the same maps.

    PYTHONPATH=. python benchmarks/imagead_metrics_vs_anomalib.py [maps.npz [EVERY]]

Without an argument it draws synthetic anomaly maps (smooth noise, blob-shaped defects with partly overlapping
scores); with ``maps.npz`` (arrays ``maps`` (N, H, W) and ``masks`` (N, H, W)) it compares on real maps, e.g.
PatchCore's on magnetic-tile saved by ``imagead_magnetic_tile.py --save-maps FILE`` (``EVERY``: keep every
k-th image, to bound anomalib's run time). anomalib is only a reference
here; it is not a dependency of oodscope.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from scipy import ndimage

from oodscope.metrics import pixel as P


def synthetic(seed: int = 0, n_normal: int = 40, n_anomalous: int = 24, size: int = 128):
    rng = np.random.default_rng(seed)
    n = n_normal + n_anomalous
    maps = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 3, 3))
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n_normal, n):
        for _ in range(rng.integers(1, 3)):  # one or two blobs per anomalous image
            cy, cx, r = rng.integers(15, size - 15), rng.integers(15, size - 15), rng.integers(4, 14)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        maps[i] += rng.uniform(0.0, 0.6) * ndimage.gaussian_filter(masks[i].astype(float), 2) * 3
    return maps, masks


def main() -> None:
    if len(sys.argv) > 1:
        data = np.load(sys.argv[1])
        every = int(sys.argv[2]) if len(sys.argv) > 2 else 1
        maps, masks = data["maps"][::every].astype(np.float64), data["masks"][::every].astype(bool)
        cases = [("file " + sys.argv[1], maps, masks)]
    else:
        cases = [(f"synthetic seed {s}", *synthetic(s)) for s in range(3)]
    from anomalib.metrics.aupro import _AUPRO  # anomalib (the independent reference) names its metric so
    from anomalib.metrics.pimo.functional import aupimo_scores

    for label, maps, masks in cases:
        t = time.perf_counter()
        ours_pro = P.aupro(maps, masks)
        ours_pimo = P.aupimo(maps, masks)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        metric = _AUPRO(fpr_limit=0.3)
        metric.update(torch.from_numpy(maps).float(), torch.from_numpy(masks).int())
        ref_pro = float(metric.compute())
        *_, aucs, _ = aupimo_scores(torch.from_numpy(maps), torch.from_numpy(masks))
        ref_pimo = aucs.numpy()
        ref_pimo = ref_pimo[~np.isnan(ref_pimo)]
        t_ref = time.perf_counter() - t
        print(f"{label}: {len(maps)} maps {maps.shape[1]}x{maps.shape[2]}")
        print(f"  AUPRO@0.3  oodscope {ours_pro:.5f}  anomalib {ref_pro:.5f}  |diff| {abs(ours_pro - ref_pro):.2e}")
        print(f"  AUPIMO     oodscope mean {ours_pimo.mean():.5f}  anomalib mean {ref_pimo.mean():.5f}  "
              f"max |diff| per image {np.max(np.abs(ours_pimo - ref_pimo)):.2e}")
        print(f"  time: oodscope {t_ours:.2f} s, anomalib {t_ref:.2f} s")


if __name__ == "__main__":
    main()
