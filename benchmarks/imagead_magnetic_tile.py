"""Image anomaly detection on the magnetic-tile data set (MVTec layout): image AUROC, pixel AUROC, AUPRO, AUPIMO, fit time,
per-image latency for every image detector, plus a global 1-NN on pooled features as the baseline PatchCore
should beat.

    PYTHONPATH=. python benchmarks/imagead_magnetic_tile.py [--size 160] [--max-train 200] [--detectors ...]
    PYTHONPATH=. python benchmarks/imagead_magnetic_tile.py --detectors efficientad --no-baseline \
        --param efficientad.train_steps=250     # EfficientAD trains networks: minutes, see its docstring

All detectors share one memoizing backbone (the network runs once per layer set), so the fit/latency columns of
the detectors after the first measure their own work on cached features; ``--fresh`` gives each its own backbone
(honest end-to-end latency, slower). Timings depend on the machine's load (2 shared CPU cores here).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import magnetic_tile_dir, parse_params, write_json
from oodscope.data.mvtec import load_mvtec
from oodscope.imagead import Backbone, create
from oodscope.imagead.evaluate import ad_records, run_detector


def global_knn(backbone: Backbone, train, test, layer: str = "head"):
    """Global 1-NN on spatially averaged ``layer`` features (L2), the baseline of the issue."""
    from oodscope.detectors.knn import exact_index, kth_neighbour_distance

    def pooled(images):
        return np.concatenate([f[layer].mean(dim=(2, 3)).numpy() for _, f in backbone.batches(images, [layer])])

    start = time.perf_counter()
    index = exact_index(pooled(train.images))
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = kth_neighbour_distance(index, pooled(test.images), 1)
    return scores, fit_s, 1000 * (time.perf_counter() - start) / len(test)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=None, help="an MVTec-layout folder (default: the shared magnetic-tile)")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--detectors", default="gaussian_ad,gaussian_ad_npca,patchcore")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore's coreset ratio (paper: 0.1)")
    parser.add_argument("--out", default="bench-magnetic-tile.json")
    parser.add_argument("--save-maps", default=None, help="npz file for PatchCore's maps and the masks")
    parser.add_argument("--param", action="append", default=[], metavar="DET.NAME=VALUE",
                        help="detector hyperparameter, e.g. efficientad.train_steps=250 (repeatable)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the global 1-NN baseline")
    args = parser.parse_args()
    params = parse_params(args.param, nested=True)
    print(f"torch threads {torch.get_num_threads()}", flush=True)
    start = time.perf_counter()
    data = load_mvtec(args.root or magnetic_tile_dir(), size=args.size, max_train=args.max_train)
    print(f"loaded train {len(data.train)}, test {len(data.test)} at {args.size} px in "
          f"{time.perf_counter() - start:.1f} s; notes: {data.notes}", flush=True)
    shared = Backbone(memoize=True)
    records = []
    if not args.no_baseline:
        scores, fit_s, ms = global_knn(shared, data.train, data.test)
        records += ad_records("global_1nn_head", data.test, scores, None, fit_s, ms)
        print(records[-1], flush=True)
    for name in args.detectors.split(","):
        extra = {"coreset_ratio": args.coreset_ratio} if name == "patchcore" else {}
        extra.update(params.get(name, {}))
        det = create(name, backbone=Backbone() if args.fresh else shared, **extra)
        run = run_detector(det, data.train, data.test)
        records += run.records
        if args.save_maps and name == "patchcore":
            np.savez_compressed(args.save_maps, maps=run.maps.astype(np.float32), masks=data.test.masks,
                                labels=data.test.labels)
        row = run.records[-1]
        print(name, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    write_json(args.out, records)
    print(f"{'detector':<20}{'imgAUROC':>9}{'pxAUROC':>9}{'AUPRO':>8}{'AUPIMO':>8}{'fit s':>8}{'ms/img':>8}")
    for r in records:
        if r["dataset"] == "all":
            f = (lambda v: f"{v:>8.2f}" if v is not None else f"{'-':>8}")
            print(f"{r['detector']:<20}{r['auroc']:>9.2f} {f(r['pixel_auroc'])}{f(r['aupro'])}{f(r['aupimo'])}"
                  f"{r['fit_s']:>8.1f}{r['ms_per_image']:>8.1f}")


if __name__ == "__main__":
    main()
