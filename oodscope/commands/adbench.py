"""``oodscope adbench``: every anomaly detector on ADBench data sets: WDBC and wine (bundled with scikit-learn), or
any ADBench-format ``.npz`` (``X``, ``y``), CSV/Parquet table with a label column, or folder of them."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("adbench", help="run the anomaly detectors on ADBench data sets (WDBC, wine, your "
                                   ".npz/.csv files)")
    parser.add_argument("--protocol", choices=("dte", "adbench"), default="dte",
                        help="dte: semi-supervised + unsupervised settings of the DTE paper, seeds 0-4 (default); "
                             "adbench: 70/30 stratified split, min-max scaling, seeds 1-3")
    parser.add_argument("--datasets", default="wdbc,wine",
                        help="comma-separated: wdbc, wine, ADBench .npz files (X, y), .csv/.parquet tables, or folders "
                             "of them (default: wdbc,wine)")
    parser.add_argument("--label-column", default="y",
                        help="the 0/1 anomaly label column of CSV/Parquet tables (default: y)")
    parser.add_argument("--detectors", default="all",
                        help="comma-separated names, or 'all' (default: every tabular anomaly detector)")
    parser.add_argument("--skip-trained", action="store_true",
                        help="leave out the detectors that train a network (DTE-C, Deep SVDD/SAD, DRPO)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the protocol's)")
    parser.add_argument("--resample-to", type=int, default=None,
                        help="the DTE-/ADBench-exact splits: resample smaller data sets to this many rows (with "
                             "replacement), subsample larger ones (DTE 50,000, ADBench 10,000 rows) and take the DTE "
                             "code's first half of the normal rows; 1000 reproduces the papers' tables (default: off, "
                             "a seeded permutation)")
    parser.add_argument("--contamination", action="store_true",
                        help="also estimate each data set's contamination factor with gammaGMM (Perini et al., ICML "
                             "2023; kNN, IForest, LOF scores on the whole standardised data set) and report it next "
                             "to the true one (in results.json)")
    parser.add_argument("--out", default="oodscope-adbench", help="output directory (default: ./oodscope-adbench)")
    parser.add_argument("--quiet", action="store_true", help="no per-run lines")
    parser.add_argument("--device", default="cpu",
                        help="where the network detectors (Deep SVDD/SAD, DTE-C, DRPO) train: cpu (default), cuda, "
                             "mps, auto; scores are computed on the CPU")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..anomaly.datasets import load_all
    from ..anomaly.protocol import anomaly_detectors, run_protocol, summarise
    from ..evaluation import Results
    from ..results_io import array_description, run_metadata
    from ..runner import parse_detectors

    start = time.perf_counter()
    from ..detectors import create, get

    detectors = anomaly_detectors() if args.detectors == "all" else parse_detectors(args.detectors)
    if args.skip_trained:
        detectors = [name for name in detectors if not get(name).trains_network]
    datasets = load_all(args.datasets, args.label_column)
    seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",")]
    from ..extraction.extract import resolve_device

    resolve_device(args.device)  # a device this machine lacks fails before any fit
    params = {name: {"device": args.device} for name in detectors if "device" in get(name)._param_names()}
    records, seconds = run_protocol(detectors, datasets, args.protocol, seeds=seeds, resample_to=args.resample_to,
                                    params=params,
                                    log=None if args.quiet else print)
    summary = summarise(records)
    print(format_summary(summary, args.protocol))
    groups = {g: list(dict.fromkeys(r["dataset"] for r in summary if r["group"] == g))
              for g in dict.fromkeys(r["group"] for r in summary)}
    results = Results(records=summary, id_accuracy=None, seconds=seconds, groups=groups, id_name="normal")
    extra = {"seeds": records, "summary": summary}
    if args.contamination:
        extra["contamination"] = [contamination_report(data) for data in datasets]
        print(format_contamination(extra["contamination"]))
    data_sha256 = {f"{data.name} {part}": array_description(values)
                   for data in datasets for part, values in (("X", data.X), ("y", data.y))}
    meta = run_metadata("adbench", argv=getattr(args, "argv", None), protocol=args.protocol,
                        seeds=sorted({r["seed"] for r in records}), resample_to=args.resample_to,
                        data_sha256=data_sha256, detectors=[create(name) for name in detectors],
                        notes=["detectors are created anew for every split; a stochastic one gets the split's seed",
                               "data_sha256: of the loaded X and y (ADBench's rows of scikit-learn's bundled data)"],
                        timings={**{f"{name} fit+score": s for name, s in seconds.items()},
                                 "total": time.perf_counter() - start})
    paths = results.write(Path(args.out), meta, extra=extra)
    from ..report.html import write_report
    from ..report.published import anchor_rows

    intro = (f"Tabular anomaly detection, protocol {args.protocol}: the mean over each setting's data sets of the "
             "per-data-set mean over seeds; metrics in percent, anomalies are the positive class; higher AUROC is "
             "better. The per-data-set tables give the mean over seeds.")
    paths["html"] = write_report(Path(args.out) / "report.html", results, meta, title="oodscope adbench report",
                                 detectors={name: create(name) for name in detectors}, intro=intro,
                                 anchors=anchor_rows(summary, args.protocol, args.resample_to))
    print(f"total {time.perf_counter() - start:.1f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def format_summary(summary: list[dict], protocol: str) -> str:
    """Detector rows, one AUROC and one AUPR (anomalies positive) column (mean ± std over seeds) per dataset x
    setting."""
    from ..results_io import format_table, mean_std

    cells = {(r["detector"], r["dataset"], r["group"]): r for r in summary}

    def pair(dataset: str, group: str, metric: str):
        def value(row: dict):
            r = cells.get((row["detector"], dataset, group))
            return None if r is None else (r[metric], r[f"{metric}_std"])
        return value

    columns = [(f"detector\n({protocol})", "detector", "")]
    for d, g in dict.fromkeys((r["dataset"], r["group"]) for r in summary):
        columns += [(f"{d}/{g}\nAUROC", pair(d, g, "auroc"), mean_std()),
                    (f"{d}/{g}\nAUPR", pair(d, g, "aupr_out"), mean_std())]
    rows = [{"detector": detector} for detector in dict.fromkeys(r["detector"] for r in summary)]
    return format_table(rows, columns)


def contamination_report(data) -> dict:
    """gammaGMM's posterior of the contamination factor of one data set (unsupervised: scores on all rows)."""
    import numpy as np

    from ..anomaly.contamination import DEFAULT_DETECTORS, estimate_contamination
    from ..thresholds import flagged_count

    std = data.X.std(axis=0)
    X = (data.X - data.X.mean(axis=0)) / np.where(std > 0, std, 1.0)
    posterior = estimate_contamination(X, DEFAULT_DETECTORS)
    low, high = posterior.interval(0.9)
    return {"dataset": data.name, "true": float(data.y.mean()), "posterior_mean": posterior.mean_,
            "interval90": [low, high], "detectors": list(DEFAULT_DETECTORS), "converged": posterior.converged_,
            "predicted_anomalies": flagged_count(len(data.y), posterior.mean_), "anomalies": data.n_anomalies}


def format_contamination(estimates: list[dict]) -> str:
    from ..results_io import format_table

    percent = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    columns = [("dataset", "dataset", ""), ("true", "true", percent), ("mean", "posterior_mean", percent),
               ("90% interval", "interval90", lambda v: f"[{100 * v[0]:.2f}, {100 * v[1]:.2f}]", ">"),
               ("", lambda e: "" if e["converged"] else "(p0/phigh not met)", "")]
    return "contamination (gammaGMM posterior; true = share of anomalies)\n" + format_table(estimates, columns)
