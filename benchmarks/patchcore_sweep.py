"""PatchCore on ../shared/data/magnetic-tile: the paper's settings against the variants that were tried.

    PYTHONPATH=. python benchmarks/patchcore_sweep.py --size 224 [--crop 224 --size 256] \
        --variants paper,mean_agg,... [--max-train 200]

Each variant is one PatchCore configuration (see ``VARIANTS``); all share one memoizing backbone, so the fit and
latency columns after the first variant of a layer set leave out the network pass. Prints image AUROC, pixel
AUROC, AUPRO, AUPIMO (percent), fit seconds and ms per test image, and the load average at the end of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from oodscope.data.mvtec import load_mvtec
from oodscope.imagead import Backbone, create
from oodscope.imagead.evaluate import run_detector

ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "magnetic-tile"
VARIANTS = {
    # the paper / reference code: stride-8 and stride-16 stage ends, unfold + adaptive pooling to 1024, 10 %
    "paper": {},
    "paper_1pct": {"coreset_ratio": 0.01},
    # 3x3 average pooling + concatenation of raw channels (anomalib's aggregation; this module before the fix)
    "mean_agg": {"aggregation": "mean"},
    "layers_s2_s3": {"layers": ["stage2", "stage3"]},
    "layers_s3_s4": {"layers": ["stage3", "stage4"]},
    "layers_s4_s5": {"layers": ["stage4", "stage5"]},
    "layers_s3_s4_s5": {"layers": ["stage3", "stage4", "stage5"]},
    "layers_s5_s6": {"layers": ["stage5", "stage6"]},
    "full_bank": {"coreset_ratio": 1.0},

}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=str(ROOT))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--variants", default="paper,mean_agg")
    parser.add_argument("--out", default=None, help="append one JSON line per variant to this file")
    args = parser.parse_args()
    start = time.perf_counter()
    data = load_mvtec(args.root, size=args.size, crop=args.crop, max_train=args.max_train)
    side = args.crop or args.size
    print(f"torch threads {torch.get_num_threads()}; train {len(data.train)}, test {len(data.test)}, "
          f"{args.size} px" + (f" -> crop {args.crop}" if args.crop else "") +
          f", loaded in {time.perf_counter() - start:.1f} s", flush=True)
    shared = Backbone(memoize=True)
    for name in args.variants.split(","):
        params = VARIANTS[name]
        run = run_detector(create("patchcore", backbone=shared, **params), data.train, data.test)
        r = run.records[-1]
        f = (lambda v: f"{v:7.2f}" if v is not None else f"{'-':>7}")
        line = (f"{name:<18}{side:>5}px img {r['auroc']:6.2f} px {f(r['pixel_auroc'])} aupro {f(r['aupro'])} "
                f"aupimo {f(r['aupimo'])} fit {r['fit_s']:7.1f}s {r['ms_per_image']:7.1f}ms/img "
                f"load {os.getloadavg()[0]:.2f}")
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps({"variant": name, "params": params, "size": args.size, "crop": args.crop,
                                     "max_train": args.max_train, "load": os.getloadavg()[0], **r}) + "\n")


if __name__ == "__main__":
    main()
