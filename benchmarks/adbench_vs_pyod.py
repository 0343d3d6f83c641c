"""Side by side: oodscope's anomaly detectors vs PyOD's on ADBench WDBC and wine, identical splits.

    PYTHONPATH=. python benchmarks/adbench_vs_pyod.py [--protocol dte] [--seeds 0,1,2,3,4] [--neural] \
        [--out benchmarks/results/adbench_vs_pyod_dte.json]

Prints AUROC (mean ± std over seeds, percent) per dataset x setting for each pair (ours | PyOD) and the seconds
spent. PyOD must be installed (pip install pyod). ``--neural`` adds Deep SVDD (ours vs PyOD), DTE-C and the other
trained detectors (slow on CPU). ``--out`` also writes the per-seed AUROCs of both libraries (JSON).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from benchmarks.common import write_json
from oodscope import create
from oodscope.anomaly.datasets import load
from oodscope.anomaly.protocol import splits
from oodscope.metrics.ood import auroc

PAIRS = {  # ours -> PyOD class and arguments (PyOD defaults otherwise)
    "iforest": ("pyod.models.iforest", "IForest", {}),
    "lof": ("pyod.models.lof", "LOF", {"n_neighbors": 20}),
    "ocsvm": ("pyod.models.ocsvm", "OCSVM", {}),
    "knn_distance": ("pyod.models.knn", "KNN", {"n_neighbors": 5}),
    "dte_np": ("pyod.models.knn", "KNN", {"n_neighbors": 5, "method": "mean"}),  # DTE's authors: same ranking
    "mahalanobis_ad": None,
    "rp_depth": None,
    "mean_shifted": None,
}
NEURAL = {"deep_svdd": ("pyod.models.deep_svdd", "DeepSVDD", {"verbose": 0}), "dte_c": None, "drpo": None,
          "deep_sad": None}


def pyod_model(spec, n_features, seed):
    import importlib

    module, name, kwargs = spec
    cls = getattr(importlib.import_module(module), name)
    kwargs = dict(kwargs)
    if name == "DeepSVDD":
        kwargs.update(n_features=n_features, random_state=seed)
    elif name == "IForest":
        kwargs.update(random_state=seed)
    return cls(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", default="dte")
    parser.add_argument("--seeds", default=None)
    parser.add_argument("--datasets", default="wdbc,wine")
    parser.add_argument("--neural", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated subset of our detectors")
    parser.add_argument("--out", default=None, help="write the per-seed AUROCs (percent) of both libraries here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",")]
    pairs = dict(PAIRS, **(NEURAL if args.neural else {}))
    if args.only:
        pairs = {k: v for k, v in pairs.items() if k in args.only.split(",")}
    results: dict = {}
    seconds: dict = {}
    for dataset in args.datasets.split(","):
        for split in splits(load(dataset), args.protocol, seeds):
            normal, anomalous = split.y_test == 0, split.y_test == 1
            for ours, spec in pairs.items():
                start = time.perf_counter()
                s = create(ours).with_seed(split.seed).fit(split.X_train).score(split.X_test)
                seconds[ours] = seconds.get(ours, 0.0) + time.perf_counter() - start
                key = (dataset, split.setting, ours)
                results.setdefault(key, {"ours": [], "pyod": []})["ours"].append(100 * auroc(s[normal], s[anomalous]))
                if spec is not None:
                    start = time.perf_counter()
                    model = pyod_model(spec, split.X_train.shape[1], split.seed).fit(split.X_train)
                    p = model.decision_function(split.X_test)
                    seconds[f"pyod:{ours}"] = seconds.get(f"pyod:{ours}", 0.0) + time.perf_counter() - start
                    results[key]["pyod"].append(100 * auroc(p[normal], p[anomalous]))
    print(f"protocol {args.protocol}; AUROC %, mean ± std over seeds; ours | PyOD (dte_np is compared with "
          "PyOD KNN method='mean')")
    columns = list(dict.fromkeys((d, g) for d, g, _ in results))
    print(f"{'detector':<16}" + "".join(f"{d + '/' + g:>30}" for d, g in columns))
    for ours in pairs:
        row = f"{ours:<16}"
        for d, g in columns:
            r = results[(d, g, ours)]
            cell = f"{np.mean(r['ours']):.2f}±{np.std(r['ours']):.2f}"
            if r["pyod"]:
                cell += f" | {np.mean(r['pyod']):.2f}±{np.std(r['pyod']):.2f}"
            row += f"{cell:>30}"
        print(row)
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    if args.out:
        write_json(args.out, {"args": vars(args), "seconds": seconds,
                              "auroc": [{"dataset": d, "setting": g, "detector": name, **values}
                                        for (d, g, name), values in results.items()]})


if __name__ == "__main__":
    main()
