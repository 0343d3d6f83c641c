"""``knn`` (normalised features, for classifier embeddings) against ``knn_distance`` (raw rows) on standardised tables.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/knn_tabular_standardised.py \\
        [--out benchmarks/results/knn_tabular_standardised.json]

``knn`` is Sun et al.'s (ICML 2022) OOD score: the k-th nearest-neighbour distance between **L2-normalised**
penultimate features of a classifier. ``knn_distance`` is the anomaly-detection kNN (Ramaswamy et al. 2000, PyOD's
``KNN``): the k-th distance between the rows as given. On standardised tabular rows the normalisation throws away
each row's norm (its distance from the mean of the normal rows), which is what an anomaly of a standardised table
often differs in. The DTE protocol of ``oodscope adbench`` (semi-supervised: fit on half of the normal rows, standardised
on them; unsupervised: a bootstrap of the standardised set), seeds 0-4, ADBench's WDBC and wine, both detectors
with their defaults (``knn``: k = 50; ``knn_distance``: k = 5) and ``iforest`` for reference.
Prints AUROC (mean ± std over the seeds, percent) per data set and setting.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import markdown_table, write_json
from oodscope.anomaly.datasets import load
from oodscope.anomaly.protocol import run_protocol, summarise

DETECTORS = ("knn", "knn_distance", "iforest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="wdbc,wine")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--out", default=None, help="write the per-seed records and the summary here (JSON)")
    args = parser.parse_args()
    datasets = [load(name) for name in args.datasets.split(",")]
    start = time.perf_counter()
    records, seconds = run_protocol(list(DETECTORS), datasets, "dte", seeds=[int(s) for s in args.seeds.split(",")])
    summary = summarise(records)
    columns = list(dict.fromkeys((r["dataset"], r["group"]) for r in summary))
    cells = {(r["detector"], r["dataset"], r["group"]): r for r in summary}
    rows = [[name] + [f"{cells[(name, d, g)]['auroc']:.2f} ± {cells[(name, d, g)]['auroc_std']:.2f}"
                      for d, g in columns] for name in DETECTORS]
    print(markdown_table(["AUROC %"] + [f"{d} {g}" for d, g in columns], rows))
    print(f"{time.perf_counter() - start:.1f} s; per detector: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    if args.out:
        write_json(args.out, {"args": vars(args), "summary": summary, "records": records, "seconds": seconds})


if __name__ == "__main__":
    main()
