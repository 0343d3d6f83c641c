"""Density detectors (WDiscOOD, ConjNorm, IGEOOD, Neural Relation Graph, HEAT) on the CIFAR-10 bench (ResNet-20 /
ResNet-56).

    PYTHONPATH=. python benchmarks/density_detectors_cifar10.py --models resnet20,resnet56
    PYTHONPATH=. python benchmarks/density_detectors_cifar10.py --models resnet56 \
        --json benchmarks/results/density_detectors_resnet56.json > benchmarks/results/density_detectors_resnet56.log
    PYTHONPATH=. python benchmarks/density_detectors_cifar10.py --models resnet56 --detectors heat --heat-iter 200 \
        --json benchmarks/results/density_detectors_resnet56_heat.json \
        > benchmarks/results/density_detectors_resnet56_heat.log

Prints, per model, a markdown table: AUROC / FPR@95 (percent, ID positive) for every OOD set, the near and far
means, and the fit and score time (score = ID test + the four OOD sets). Features come from the shared extraction
cache (``--cache-dir``); a model not cached yet is extracted once (ResNet-56: several minutes on 2 cores).
``--json`` also writes the rows (atomically, after every row) in the format of ``distance_detectors_cifar10.py``, whose
``--merge`` prints both scripts' rows as one table (``benchmarks/results/distance_density_cifar10.md``).
Defaults are the papers' (no tuning on this benchmark); ``mahalanobis`` is the plain baseline for reference.
"""

from __future__ import annotations

import argparse
import os
import time

import oodscope
from benchmarks.common import cifar_outputs, write_json

DETECTORS = "mahalanobis,wdiscood,conjnorm,igeood,igeood_features,relation_graph,heat"
SETS = [("near", "cifar100"), ("near", "tin"), ("far", "mnist"), ("far", "textures")]


def table(model_name: str, detectors: list[str], cache_dir: str, heat_iter: int | None, results: dict,
          json_path: str) -> None:
    start = time.perf_counter()
    out, _, _ = cifar_outputs(f"cifar10_{model_name}", cache_dir)
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
        label = f"{name} ({det.n_iter} x 2 CD updates)" if name == "heat" else name
        row = {d: [by_set[d]["auroc"], by_set[d]["fpr95"]] for _, d in SETS}
        row |= {g: [means[g]["auroc"], means[g]["fpr95"]] for g in ("near", "far")}
        if name == "mahalanobis":  # the reference row; distance_detectors_cifar10.py's JSON has it already
            continue
        results.setdefault(model_name, {})[label] = row | {"fit_s": fit_s, "score_s": res.seconds[name]}
        if json_path:
            write_json(json_path, results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--detectors", default=DETECTORS)
    parser.add_argument("--cache-dir", default=os.environ.get("OODSCOPE_CACHE"))
    parser.add_argument("--heat-iter", type=int, default=None, help="HEAT training updates (default: its own)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    results: dict = {}
    for model_name in args.models.split(","):
        table(model_name.strip(), [d.strip() for d in args.detectors.split(",")], args.cache_dir, args.heat_iter,
              results, args.json)


if __name__ == "__main__":
    main()
