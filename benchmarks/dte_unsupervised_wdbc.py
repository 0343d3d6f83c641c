"""Why the DTE paper's unsupervised WDBC numbers do not reproduce from its public code (kNN, seeds 0-4).

The public DTE code (its ``data_generator.py`` resampling small data sets to 1,000 rows with replacement, then
``run.py``'s bootstrap of the training rows) puts exact copies of most test rows into the training rows; the kNN
distance of a row then mostly counts its copies. oodscope's DTE-exact split (``--resample-to 1000``) draws the same
rows as that code (checked by an independent re-implementation with numpy's global RNG and PyOD's KNN: 80.86 vs our
80.78 on WDBC). This script computes kNN (k = 5, the k-th distance, as PyOD) AUROC on WDBC and wine under the
DTE-exact split and under variants without the duplicates; only those reach the published WDBC figure.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/dte_unsupervised_wdbc.py [--spread 100]

``--spread N`` also prints the DTE-exact unsupervised WDBC kNN AUROC over seeds 0..N-1 (mean, best seed). The
last table is ``dte_np`` in the semi-supervised DTE-exact setting per seed, with the argmax of the posterior (the
authors' current code, oodscope's default) and its mean (``statistic="mean"``).
"""

from __future__ import annotations

import argparse

import numpy as np

import oodscope
from oodscope.anomaly.datasets import adbench_order, load
from oodscope.anomaly.protocol import splits
from oodscope.metrics import auroc

PUBLISHED = {"wdbc": 98.04, "wine": 47.04}  # DTE paper, unsupervised kNN
SEEDS = (0, 1, 2, 3, 4)


def knn_auroc(train: np.ndarray, test: np.ndarray, y: np.ndarray) -> float:
    scores = oodscope.create("knn_distance", k=5).fit(train).score(test)
    return 100.0 * auroc(scores[y == 0], scores[y == 1])


def standardise(X: np.ndarray) -> np.ndarray:
    std = X.std(axis=0)
    return (X - X.mean(axis=0)) / np.where(std > 0, std, 1.0)


def variant(data, seed: int, resample: bool, dedup: bool) -> float:
    """The DTE unsupervised recipe (standardise all rows, bootstrap the training rows, test on all rows), with or
    without the resample to 1,000 rows and with or without duplicate training rows."""
    X, y = data.X[adbench_order(data)], data.y[adbench_order(data)]
    state = np.random.RandomState(seed)
    if resample and len(y) < 1000:
        pick = state.choice(np.arange(len(y)), 1000, replace=True)
        X, y = X[pick], y[pick]
    X = standardise(X)
    state.permutation(int(y.sum()))  # the generator's draw of zero labelled anomalies
    train = X[state.choice(np.arange(len(y)), len(y), replace=True)]
    return knn_auroc(np.unique(train, axis=0) if dedup else train, X, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spread", type=int, default=0, help="seeds for the DTE-exact WDBC spread (0: skip)")
    args = parser.parse_args()
    print("| split | WDBC kNN AUROC | wine kNN AUROC |\n|---|---|---|")
    rows = {}
    for name in ("wdbc", "wine"):
        data = load(name)
        exact = [knn_auroc(s.X_train, s.X_test, s.y_test) for s in splits(data, "dte", SEEDS, resample_to=1000)
                 if s.setting == "dte-unsup"]
        rows.setdefault("oodscope DTE-exact (--resample-to 1000)", {})[name] = np.mean(exact)
        for label, resample, dedup in (("resample, duplicates removed from training", True, True),
                                       ("no resample (367 / 129 rows)", False, False),
                                       ("no resample, duplicates removed", False, True)):
            rows.setdefault(label, {})[name] = np.mean([variant(data, s, resample, dedup) for s in SEEDS])
    for label, values in rows.items():
        print(f"| {label} | {values['wdbc']:.2f} | {values['wine']:.2f} |")
    print(f"| published (DTE paper) | {PUBLISHED['wdbc']:.2f} | {PUBLISHED['wine']:.2f} |")
    wdbc = load("wdbc")
    if args.spread:
        spread = [knn_auroc(s.X_train, s.X_test, s.y_test) for s in
                  splits(wdbc, "dte", range(args.spread), resample_to=1000) if s.setting == "dte-unsup"]
        print(f"DTE-exact unsupervised WDBC kNN over seeds 0-{args.spread - 1}: mean {np.mean(spread):.2f}, "
              f"best seed {np.max(spread):.2f}")
    print("\n| dte_np, semi-supervised WDBC | " + " | ".join(f"seed {s}" for s in SEEDS) + " | mean |")
    print("|---|" + "---|" * (len(SEEDS) + 1))
    for statistic in ("mode", "mean"):
        values = []
        for split in splits(wdbc, "dte", SEEDS, resample_to=1000):
            if split.setting == "dte-semi":
                scores = oodscope.create("dte_np", statistic=statistic).fit(split.X_train).score(split.X_test)
                values.append(100.0 * auroc(scores[split.y_test == 0], scores[split.y_test == 1]))
        print(f"| {statistic} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {np.mean(values):.2f} |")


if __name__ == "__main__":
    main()
