"""oodscope vs the AUROCs the DTE paper published for WDBC and wine, on the DTE code's own splits.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/dte_published.py [--no-neural] [--out DIR]

Published: Livernoche, Jain, Hezaveh & Ravanbakhsh, "On Diffusion Modeling for Anomaly Detection", ICLR 2024; the
per-data-set AUROC tables (mean and std over seeds 0-4) are in the authors' repository README, github.com/vicliv/DTE
(README.md at commit 5be3f1f, 2023-11-20): "Table 1: AUC ROC ... semi-supervised setting" and "Table 2: ...
unsupervised setting", rows ``wdbc`` and ``wine``. Setting, from that repository's ``run.py`` and
``data_generator.py``: ADBench's files, resampled to 1000 rows with replacement (both have fewer); semi-supervised =
the first half of the resampled normal rows for training, the other half plus every anomaly row for testing,
``StandardScaler`` fitted on the training rows; unsupervised = the whole resampled set standardised, training on a
bootstrap of it, testing on all of it; PyOD defaults for the baselines. ``oodscope adbench --protocol dte
--resample-to 1000`` draws those splits (same rows, same order, same random draws).

A second, independent reference: the FoMo-0D authors (Shen, Wen & Akoglu, github.com/A-Chicharito-S/FoMo-0D,
``DTE/KNN_result/semi_AUCROC_all.csv``) re-ran the DTE code with seeds 0-4; their PyOD kNN (k = 5) column is given
for the semi-supervised setting.

Prints ours (mean ± std over seeds 0-4) next to the published mean (std), AUROC in percent. Extra rows:
``iforest*`` = our forest drawing its randomness the way the harness does (one ``RandomState(seed)`` stream);
``dte_np (mean)`` = DTE-NP with the posterior-mean time instead of the mode (the authors' code used the mean in
one intermediate version, commit 5aea5d0, and the mode before and after); ``dte_c (2x softmax)`` = DTE-C with the
released code's loss (cross-entropy applied to softmax outputs, ``double_softmax=True``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import write_json

from benchmarks.adbench_published import iforest_shared_stream
from oodscope.anomaly.datasets import load
from oodscope.anomaly.protocol import run_protocol, summarise
from oodscope.report.published import DTE

# vicliv/DTE README, Tables 1 (semi) and 2 (unsup): AUROC mean (std) over seeds 0-4, percent (shipped in the
# package for the adbench report's anchor table)
PUBLISHED = {(detector, dataset, setting): value for (setting, dataset, detector), value in DTE.items()
             if dataset in ("wdbc", "wine")}
# FoMo-0D's re-run of the DTE code, PyOD KNN (k = 5), semi-supervised
FOMO_KNN_SEMI = {"wdbc": (99.23, 0.27), "wine": (99.17, 0.18)}
SETTINGS = ("dte-semi", "dte-unsup")


# (row label, detector, extra parameters); "iforest*" is computed by iforest_shared_stream
ROWS = [("iforest", "iforest", {}), ("iforest*", None, {}), ("lof", "lof", {}), ("ocsvm", "ocsvm", {}),
        ("knn_distance", "knn_distance", {}), ("dte_np", "dte_np", {}),
        ("dte_np (mean)", "dte_np", {"statistic": "mean"}), ("deep_svdd", "deep_svdd", {}),
        ("dte_c", "dte_c", {}), ("dte_c (2x softmax)", "dte_c", {"double_softmax": True})]
NEURAL = {"deep_svdd", "dte_c"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-neural", action="store_true", help="leave out Deep SVDD and DTE-C")
    parser.add_argument("--rows", default=None, help="comma-separated row labels (default: all), e.g. 'dte_c (2x softmax)'")
    parser.add_argument("--out", type=Path, default=None, help="also write the per-seed records here (JSON)")
    args = parser.parse_args()
    rows = [r for r in ROWS if not (args.no_neural and r[1] in NEURAL)]
    if args.rows:
        wanted = [label.strip() for label in args.rows.split(",")]
        rows = [r for r in rows if r[0] in wanted]
    datasets = [load("wdbc"), load("wine")]
    start = time.perf_counter()
    cells, all_records, seconds = {}, [], {}
    for label, detector, params in rows:
        if detector is None:
            for data in datasets:
                for setting, (aurocs, _) in iforest_shared_stream(data, "dte").items():
                    cells[(label, data.name, setting)] = (aurocs.mean(), aurocs.std())
            continue
        records, spent = run_protocol([detector], datasets, "dte", resample_to=1000, params={detector: params})
        seconds[label] = spent[detector]
        for record in records:
            record["detector"] = label
        all_records += records
        for r in summarise(records):
            cells[(label, r["dataset"], r["group"])] = (r["auroc"], r["auroc_std"])
    columns = [(d, s) for s in SETTINGS for d in ("wdbc", "wine")]
    print(f"{'AUROC %':<19}" + "".join(f"{d + ' ' + s[4:]:>30}" for d, s in columns))
    print(f"{'':<19}" + f"{'ours':>16}{'DTE paper':>14}" * len(columns))
    for label, _, _ in rows:
        line = f"{label:<19}"
        for dataset, setting in columns:
            ours = cells[(label, dataset, setting)]
            published = PUBLISHED[(label.split(" ")[0].rstrip("*"), dataset, setting)]
            line += f"{ours[0]:>9.2f} ±{ours[1]:5.2f}{published[0]:>8.2f} ({published[1]:.2f})"
        print(line)
    line = f"{'kNN, FoMo-0D':<19}"
    for dataset, setting in columns:
        line += (f"{FOMO_KNN_SEMI[dataset][0]:>9.2f} ({FOMO_KNN_SEMI[dataset][1]:.2f})" + " " * 14
                 if setting == "dte-semi" else " " * 30)
    print(line + "  (re-run of the DTE code, semi only)")
    print("seconds per row: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    print(f"total {time.perf_counter() - start:.1f} s")
    if args.out is not None:
        write_json(args.out / "dte_published_records.json", all_records)


if __name__ == "__main__":
    main()
