"""oodscope vs the numbers ADBench published for WDBC and wine (unsupervised setting), on ADBench's own splits.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/adbench_published.py [--no-neural]

Published: Han et al., "ADBench: Anomaly Detection Benchmark", NeurIPS 2022, appendix D.4, Table D4 (AUCROC) and
Table D5 (AUCPR, = scikit-learn's average precision) of the 14 unsupervised algorithms, rows ``WDBC`` and ``wine``
(the paper PDF in github.com/Minqi824/ADBench, ``paper/ADBench_paper.pdf`` at commit 6345a6b, "Update paper for
NeurIPS 2022"). Setting, from that commit's ``run.py`` / ``data_generator.py``: the data set is first resampled to
1000 rows with replacement (both have fewer), then a stratified 70/30 split, min-max scaling fitted on the training
part, the detector fitted on the whole (contaminated) training part, seeds 1, 2, 3, the mean of the three runs;
PyOD defaults for every detector. ``oodscope adbench --protocol adbench --resample-to 1000`` draws exactly those
splits (same rows, same order, same random draws).

Prints, per detector and data set, ours (mean ± std over the 3 seeds) next to the published mean, for AUROC and
AUPR (percent). ``iforest*`` is our detector with its random stream drawn the way ADBench's harness draws it
(``IForest()`` after ``np.random.seed(seed)``: one stream shared by the bootstrap labels and the trees), which
isolates the only difference to ADBench's IForest run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from oodscope.anomaly.datasets import load
from oodscope.anomaly.protocol import run_protocol, splits, summarise
from oodscope.report.published import ADBENCH

# Table D4 (AUCROC) / Table D5 (AUCPR), ADBench NeurIPS 2022, percent (shipped in the package for the report)
PUBLISHED = {(detector, dataset): value for (dataset, detector), value in ADBENCH.items()}


def iforest_shared_stream(dataset, protocol: str = "adbench") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Our IForest's settings, random state = ``RandomState(seed)`` object (the stream ADBench's harness, and the
    DTE harness built on it, give PyOD's ``IForest()``): per setting, the AUROCs and AUPRs over seeds (percent)."""
    from sklearn.ensemble import IsolationForest

    from oodscope.metrics import aupr_out, auroc

    values: dict[str, tuple[list[float], list[float]]] = {}
    for split in splits(dataset, protocol, resample_to=1000):
        forest = IsolationForest(random_state=np.random.RandomState(split.seed)).fit(split.X_train)
        scores = -forest.score_samples(split.X_test)
        aurocs, auprs = values.setdefault(split.setting, ([], []))
        normal, anomalous = scores[split.y_test == 0], scores[split.y_test == 1]
        aurocs.append(100 * auroc(normal, anomalous))
        auprs.append(100 * aupr_out(normal, anomalous))  # average precision with the anomalies positive
    return {setting: (np.array(a), np.array(b)) for setting, (a, b) in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-neural", action="store_true", help="leave out Deep SVDD")
    args = parser.parse_args()
    detectors = ["iforest", "lof", "ocsvm", "knn_distance"] + ([] if args.no_neural else ["deep_svdd"])
    datasets = [load("wdbc"), load("wine")]
    start = time.perf_counter()
    records, _ = run_protocol(detectors, datasets, "adbench", resample_to=1000)
    cells = {(r["detector"], r["dataset"]): r for r in summarise(records)}
    for data in datasets:
        auroc, aupr = iforest_shared_stream(data)["adbench"]
        cells[("iforest*", data.name)] = {"auroc": auroc.mean(), "auroc_std": auroc.std(),
                                          "aupr_out": aupr.mean(), "aupr_out_std": aupr.std()}
    print(f"{'detector':<14}" + "".join(f"{d + ' ' + m:>30}" for d in ("WDBC", "wine") for m in ("AUROC", "AUPR")))
    print(f"{'':<14}" + f"{'ours':>20}{'ADBench':>10}" * 4)
    for name in detectors[:1] + ["iforest*"] + detectors[1:]:
        row = f"{name:<14}"
        for dataset in ("wdbc", "wine"):
            published = PUBLISHED[(name.rstrip("*"), dataset)]
            r = cells[(name, dataset)]
            for (metric, value) in zip(("auroc", "aupr_out"), published):
                row += f"{r[metric]:>12.2f} ± {r[metric + '_std']:5.2f}{value:>10.2f}"
        print(row)
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
