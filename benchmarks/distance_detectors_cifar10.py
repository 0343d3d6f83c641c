"""Distance detectors (Mahalanobis family, kNN, GMM, NNGuide, NAC, Gram, RankFeat) on the CIFAR-10 bench, ResNet-20
and ResNet-56.

    PYTHONPATH=. python benchmarks/distance_detectors_cifar10.py --depths 20 56 [--n-train 2000 --n-eval 500] \
        [--json benchmarks/results/distance_detectors_resnet20_features.json]
    PYTHONPATH=. python benchmarks/distance_detectors_cifar10.py --merge benchmarks/results/distance_detectors_*.json

Feature-space detectors (``mahalanobis``, ``rmds``, ``knn`` exact and IVF, ``gmm``, ``nnguide``) run on the full
splits (10,000 train; 9,000 ID test; every OOD set complete). Detectors that read intermediate layers or re-run
the network (``mahalanobis_ensemble``, ``nac``, ``gram``, ``rankfeat``) run on fixed random subsamples (seed 0):
``--n-train`` training images, ``--n-eval`` images of the ID test set and of each OOD set, ``--n-val`` images of
the ID validation set and of the OOD validation set (Tiny ImageNet val) for the logistic regression of the full
Mahalanobis method; ``mahalanobis (sub)`` is the plain score on the same subsample, for reference. Prints AUROC and
FPR@95 (percent, ID positive) per OOD set, near/far means, fit time and total score time (seconds, this
machine, shared CPU: indicative only). ``--json`` writes the rows (atomically, after every finished row);
``--merge`` only prints the table of earlier JSON files, this script's and ``density_detectors_cifar10.py --json``'s:
``benchmarks/results/distance_density_cifar10.md`` is ``--merge benchmarks/results/distance_detectors_*.json
benchmarks/results/density_detectors_resnet56*.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import oodscope
from benchmarks.common import LAYERS, OOD_GROUPS, auroc_fpr, cifar_outputs, cifar_subset_outputs, write_json

OOD = OOD_GROUPS
SETS = [name for group in OOD.values() for name in group]
EPSILONS = (0.0, 0.0014)  # a subset of the paper's grid (EPSILON_GRID), to bound the CPU time


def evaluate(detector, train, test, sets, combine=None):
    start = time.perf_counter()
    if combine is not None:
        id_val, ood_val = combine
        detector.set_params(epsilons=EPSILONS).fit(train, val=id_val, ood_val=ood_val)
    else:
        detector.fit(train)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    s_id = detector.score(test)
    row = {name: auroc_fpr(s_id, detector.score(out)) for name, out in sets.items()}
    row["score_s"], row["fit_s"] = time.perf_counter() - start, fit
    for group, names in OOD.items():
        row[group] = tuple(float(np.mean([row[n][i] for n in names])) for i in range(2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=500)
    parser.add_argument("--n-val", type=int, default=300)
    parser.add_argument("--skip", default="", help="comma-separated detector rows to skip")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--merge", nargs="*", default=[], help="only print the table of these JSON files")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {}
    for path in args.merge:
        for model, rows in json.loads(Path(path).read_text()).items():
            results.setdefault(model, {}).update(rows)
    for depth in [] if args.merge else args.depths:
        full, net, pre = cifar_outputs(f"cifar10_resnet{depth}", layers=())
        train, test = full["train"], full["test"]
        sets = {name: full[f"{g}/{name}"] for g, names in OOD.items() for name in names}
        rows = {}
        feature_detectors = {
            "mahalanobis": oodscope.create("mahalanobis"), "rmds": oodscope.create("rmds"),
            "knn": oodscope.create("knn"), "knn (ivf)": oodscope.create("knn", index="ivf"),
            "gmm": oodscope.create("gmm"), "nnguide": oodscope.create("nnguide"),
        }
        for name, detector in feature_detectors.items():
            if name not in skip:
                rows[name] = evaluate(detector, train, test, sets)
                print(f"resnet{depth} {name}: done", flush=True)
        sub = lambda key, n: cifar_subset_outputs(f"cifar10_resnet{depth}", net, pre, key, n)  # noqa: E731
        sub_names = ["mahalanobis (sub)", "mahalanobis_ensemble (4 layers sum)",
                     "mahalanobis_ensemble (4 layers eps+LR)", "nac", "gram", "rankfeat (layer3)"]
        if set(sub_names) <= skip:
            results[f"resnet{depth}"] = rows
            continue
        s_train, s_test = sub("train", args.n_train), sub("test", args.n_eval)
        s_sets = {name: sub(f"{g}/{name}", args.n_eval) for g, names in OOD.items() for name in names}
        combine = (sub("val", args.n_val), sub("ood_val/tin", args.n_val))
        sub_detectors = {  # cheapest first: rows are printed and saved as they finish
            "mahalanobis (sub)": (oodscope.create("mahalanobis"), None),
            "mahalanobis_ensemble (4 layers sum)": (oodscope.create("mahalanobis_ensemble", layers=LAYERS), None),
            "rankfeat (layer3)": (oodscope.create("rankfeat", layer="layer3"), None),
            "nac": (oodscope.create("nac"), None),
            "gram": (oodscope.create("gram", layers=LAYERS), None),
            "mahalanobis_ensemble (4 layers eps+LR)": (oodscope.create("mahalanobis_ensemble", layers=LAYERS),
                                                       combine),
        }
        results[f"resnet{depth}"] = rows
        for name, (detector, comb) in sub_detectors.items():
            if name not in skip:
                rows[name] = evaluate(detector, s_train, s_test, s_sets, comb)
                if comb is not None:
                    rows[name]["epsilon"] = detector.epsilon_
                print(f"resnet{depth} {name}: {json.dumps(rows[name])}", flush=True)
                if args.json:
                    write_json(args.json, results)
        results[f"resnet{depth}"] = rows

    header = "| model | detector | " + " | ".join(f"{s} AUROC/FPR" for s in SETS) + " | near | far | fit s | score s |"
    print()
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for model, rows in results.items():
        for name, row in rows.items():
            cells = [f"{row[s][0]:.2f} / {row[s][1]:.2f}" for s in SETS + list(OOD)]
            print(f"| {model} | {name} | " + " | ".join(cells) + f" | {row['fit_s']:.1f} | {row['score_s']:.1f} |")
    for model, rows in results.items():
        for name, row in rows.items():
            if "epsilon" in row:
                print(f"{model} {name}: epsilon chosen on validation = {row['epsilon']}")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
