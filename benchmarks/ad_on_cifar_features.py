"""Anomaly detectors on OOD features: CIFAR-10 ResNet-20 penultimate features (cached) as tabular input.

    PYTHONPATH=. python benchmarks/ad_on_cifar_features.py [--train-subsample 50000]

Fits each detector on the ID training features (columns constant on train dropped), scores the ID test split and
every OOD split, prints AUROC per OOD set (ID = negative, OOD = positive) and the seconds per detector. LOF and
OC-SVM scale quadratically and are fitted on a random subsample of ``--small-subsample`` training rows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cifar_bench_dir
from oodscope import create
from oodscope.data.spec import load_benchmark_dir
from oodscope.metrics import auroc
from oodscope.models.zoo import load_model
from oodscope.runner import extract_benchmark

DETECTORS = ["knn_distance", "mahalanobis_ad", "dte_np", "iforest", "rp_depth", "mean_shifted", "lof", "ocsvm"]
SMALL = {"lof", "ocsvm"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=None, help="the CIFAR-10 bench folder (default: benchmarks/common.py's)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--small-subsample", type=int, default=5000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.root) if args.root else cifar_bench_dir()
    bench = load_benchmark_dir(root)
    model, pre = load_model("cifar10_resnet20", str(root / "models" / "cifar10_resnet20.pth"))
    outputs = extract_benchmark(bench, model, pre, cache_dir=args.cache_dir, progress=False)
    train = outputs["train"].features.astype(np.float64)
    keep = np.ptp(train, axis=0) > 0
    print(f"train {train.shape}, dropped {int((~keep).sum())} constant columns")
    train = train[:, keep]
    test = outputs["test"].features[:, keep]
    ood = {k: v.features[:, keep] for k, v in outputs.items() if "/" in k and not k.startswith("ood_val")}
    rng = np.random.default_rng(0)
    small = train[rng.choice(len(train), min(args.small_subsample, len(train)), replace=False)]
    names = list(ood)
    print(f"{'detector':<16}" + "".join(f"{n:>15}" for n in names) + f"{'mean':>9}{'seconds':>9}")
    for name in args.detectors.split(","):
        start = time.perf_counter()
        detector = create(name).fit(small if name in SMALL else train)
        id_scores = detector.score(test)
        values = [100 * auroc(id_scores, detector.score(ood[n])) for n in names]
        seconds = time.perf_counter() - start
        print(f"{name:<16}" + "".join(f"{v:>15.2f}" for v in values) + f"{np.mean(values):>9.2f}{seconds:>9.1f}",
              flush=True)


if __name__ == "__main__":
    main()
