"""``oodscope train-bench BENCH --methods oe,energy_oe --outliers FILE``: objectives against a CE control.

Each method (and the ``cross_entropy`` control, always included) fine-tunes the benchmark's model on the same
schedule and seeds; every fine-tuned model is scored with MSP, energy and KNN (``--detectors``). One table: method x
(ID accuracy, near / far AUROC and FPR@95 per detector), mean +- std over ``--seeds``; ``OUT/results.json`` holds the
per-seed records and the summary (``summary`` table).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from .bench import add_bench_arguments

    parser = subparsers.add_parser("train-bench", help="fine-tune with several training objectives and a "
                                                       "cross-entropy control, one comparison table")
    add_bench_arguments(parser)
    parser.set_defaults(detectors="msp,energy,knn", out="oodscope-train-bench")
    parser.add_argument("--methods", required=True, help="comma-separated training objectives (the control is added)")
    parser.add_argument("--outliers", default=None, help=".npz with an 'images' array of auxiliary outliers")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=None, help="steps per epoch (default: all ID images)")
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--train-batch-size", type=int, default=128)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (mean +- std over them)")
    parser.add_argument("--per-set", type=int, default=0, help="score a fixed subsample of each test set (0: all)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..results_io import format_table, write_results
    from ..report.meta import bench_metadata
    from ..training.compare import compare, summarise
    from .bench import prepare_from
    from .train import _read_outliers

    start = time.perf_counter()
    outliers = None if args.outliers is None else _read_outliers(Path(args.outliers))
    prepared = prepare_from(args)
    device = "cpu" if args.device == "auto" else args.device
    log = None if args.quiet else (lambda row: print(f"  {row['method']} seed {row['seed']}: "
                                                     f"{row['train_s']:.1f} s, ID accuracy {row['id_accuracy']:.2f} %",
                                                     flush=True))
    rows = compare(prepared.model, prepared.preprocess, prepared.bench, args.methods.split(","), outliers,
                   seeds=[int(s) for s in args.seeds.split(",")], detectors=args.detectors.split(","),
                   per_set=args.per_set, cache_dir=args.cache_dir, checkpoint_dir=Path(args.out) / "checkpoints",
                   log=log, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                   batch_size=args.train_batch_size, device=device, progress=not args.quiet)
    summary = summarise(rows)
    print(format_table(summary, summary_columns(args.detectors.split(","), list(prepared.bench.ood))))
    meta = bench_metadata(prepared.bench, prepared.model_name, args.weights, prepared.model,
                          argv=getattr(args, "argv", None), timings={"total": time.perf_counter() - start},
                          training={"methods": args.methods, "epochs": args.epochs, "max_steps": args.max_steps,
                                    "lr": args.lr, "batch_size": args.train_batch_size, "seeds": args.seeds,
                                    "outliers": args.outliers, "per_set": args.per_set})
    paths = write_results(args.out, rows, meta, extra={"summary": summary})
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def summary_columns(detectors: list[str], groups: list[str]) -> list[tuple]:
    def cell(key):
        return lambda r: f"{r[key]:.2f} ± {r[key + '_std']:.2f}" if key in r else None

    def own(key):  # the method's own score (the paper's), whatever detector that is
        return lambda r: cell(f"{r['own_score']} {key}")(r) if r.get("own_score") else None

    columns = [("method", "method", ""), ("seeds", "seeds", "d"), ("ID acc", cell("id_accuracy"), ""),
               ("own score", lambda r: r.get("own_score") or "-", "")]
    for group in groups:
        columns.append((f"own {group}\nAUROC", own(f"{group} auroc"), ""))
        columns.append((f"own {group}\nFPR95", own(f"{group} fpr95"), ""))
    for detector in detectors:
        for group in groups:
            columns.append((f"{detector} {group}\nAUROC", cell(f"{detector} {group} auroc"), ""))
            columns.append((f"{detector} {group}\nFPR95", cell(f"{detector} {group} fpr95"), ""))
    return columns
