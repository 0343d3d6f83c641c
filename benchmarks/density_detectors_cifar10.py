"""Closing-note table for the suite II density detectors on the CIFAR-10 bench (ResNet-20 / ResNet-56).

    PYTHONPATH=. python benchmarks/suite2_density_table.py --models resnet20,resnet56
    PYTHONPATH=. python benchmarks/suite2_density_table.py --models resnet20 --detectors heat --heat-iter 200

Prints, per model, a markdown table: AUROC / FPR@95 (percent, ID positive) for every OOD set, the near and far
means, and the fit and score time (score = ID test + the four OOD sets). Features come from the shared extraction
cache (``--cache-dir``); a model not cached yet is extracted once (ResNet-56: several minutes on 2 cores).
Defaults are the papers' (no tuning on this benchmark); ``mahalanobis`` is the plain baseline for reference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import oodscope  # noqa: E402
from oodscope.data.spec import load_benchmark_dir  # noqa: E402
from oodscope.models.zoo import load_model  # noqa: E402
from oodscope.runner import extract_benchmark  # noqa: E402

BENCH = "../shared/data/cifar10-bench"
DETECTORS = "mahalanobis,wdiscood,conjnorm,igeood,igeood_features,relation_graph,heat"
SETS = [("near", "cifar100"), ("near", "tin"), ("far", "mnist"), ("far", "textures")]


def table(model_name: str, detectors: list[str], cache_dir: str, heat_iter: int | None) -> None:
    bench = load_benchmark_dir(BENCH)
    model, pre = load_model(f"cifar10_{model_name}", f"{BENCH}/models/cifar10_{model_name}.pth")
    start = time.perf_counter()
    out = extract_benchmark(bench, model, pre, cache_dir=cache_dir, progress=False)
    for name, o in out.items():
        o.name = name
    print(f"\n### {model_name} (features {out['train'].features.shape[1]}-d; outputs loaded in "
          f"{time.perf_counter() - start:.1f} s)\n")
    head = " | ".join(f"{d} AUROC/FPR" for _, d in SETS)
    print(f"| detector | {head} | near AUROC/FPR | far AUROC/FPR | fit [s] | score [s] |")
    print("|---" * (len(SETS) + 5) + "|")
    ood = {g: {d: out[f"{g}/{d}"] for gg, d in SETS if gg == g} for g in ("near", "far")}
    for name in detectors:
        params = {"n_iter": heat_iter} if name == "heat" and heat_iter else {}
        det = oodscope.create(name, **params)
        t0 = time.perf_counter()
        det.fit(out["train"])
        fit_s = time.perf_counter() - t0
        res = oodscope.evaluate({name: det}, out["test"], ood)
        by_set = {r["dataset"]: r for r in res.records}
        means = {r["group"]: r for r in res.group_means()}
        cells = [f"{by_set[d]['auroc']:.2f} / {by_set[d]['fpr95']:.2f}" for _, d in SETS]
        cells += [f"{means[g]['auroc']:.2f} / {means[g]['fpr95']:.2f}" for g in ("near", "far")]
        print(f"| {name} | " + " | ".join(cells) + f" | {fit_s:.2f} | {res.seconds[name]:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--detectors", default=DETECTORS)
    parser.add_argument("--cache-dir", default=os.environ.get("OODSCOPE_CACHE"))
    parser.add_argument("--heat-iter", type=int, default=None, help="HEAT training updates (default: its own)")
    args = parser.parse_args()
    for model_name in args.models.split(","):
        table(model_name.strip(), [d.strip() for d in args.detectors.split(",")], args.cache_dir, args.heat_iter)


if __name__ == "__main__":
    main()
