"""CAE and NSA (image detectors that train a network) on the magnetic-tile data set (MVTec layout).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/imagead_trained_magnetic_tile.py --detector cae \
        [--size 160] [--max-train 200] [--param steps=300] [--out results.jsonl]

Prints image AUROC, pixel AUROC, AUPRO, AUPIMO (percent), fit seconds (training included), ms per test image and
the load average (the 2 CPU cores here are shared). ``--param`` overrides a hyperparameter (repeatable).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.common import magnetic_tile_dir, parse_params
from oodscope.data.mvtec import load_mvtec
from oodscope.imagead import create
from oodscope.imagead.evaluate import run_detector


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=None, help="an MVTec-layout folder (default: the shared magnetic-tile)")
    parser.add_argument("--detector", default="cae")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", default=None, help="append one JSON line with all records to this file")
    args = parser.parse_args()
    params = parse_params(args.param)
    start = time.perf_counter()
    data = load_mvtec(args.root or magnetic_tile_dir(), size=args.size, max_train=args.max_train)
    print(f"torch threads {torch.get_num_threads()}; train {len(data.train)}, test {len(data.test)}, {args.size} px, "
          f"loaded in {time.perf_counter() - start:.1f} s; {args.detector} {params}", flush=True)
    det = create(args.detector, **params)
    run = run_detector(det, data.train, data.test)
    losses = getattr(det, "losses_", None)
    if losses is not None:
        print("loss every 10 % of the steps:", [round(float(v), 4) for v in losses[::max(len(losses) // 10, 1)]])
    f = (lambda v: f"{v:7.2f}" if v is not None else f"{'-':>7}")
    for r in run.records:
        print(f"{r['dataset']:<10} img {r['auroc']:6.2f} px {f(r['pixel_auroc'])} aupro {f(r['aupro'])} "
              f"aupimo {f(r['aupimo'])}")
    r = run.records[-1]
    print(f"{args.detector} fit {r['fit_s']:.1f} s, {r['ms_per_image']:.1f} ms/image, load {os.getloadavg()}")
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps({"detector": args.detector, "params": params, "size": args.size,
                                 "max_train": args.max_train, "load": os.getloadavg()[0],
                                 "records": run.records}) + "\n")


if __name__ == "__main__":
    main()
