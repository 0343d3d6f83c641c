"""The density protocol's five prototypicality metrics on the CIFAR-10 bench, at a chosen subsample size.

Carlini, Erlingsson & Papernot (arXiv:1910.13427): confidence, boundary distance, ensemble agreement (the zoo's
ResNet-32/44/56 next to the benchmark's ResNet-20), holdout retraining and DP-training privacy, computed by
``oodscope bench --protocol density --density-metrics ...`` (:mod:`oodscope.protocols.density`); this script only
sets the protocol's subsample size ``--n`` (its default, 2,000 train and 2,000 test images, is the protocol's own)
and writes the run's ``results.json`` and a markdown table of the metrics' agreement and the detectors'
correlations.

    # the full run (the protocol's n = 2000): expected about 10 minutes on one core (estimated, not measured)
    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/density_metrics_cifar10.py \
        --out benchmarks/results/density_metrics_cifar10
    # a reduced check (n = 500): 250 s measured on one core of the shared machine, warm extraction cache
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/density_metrics_cifar10.py --n 500 --out /tmp/density-check

The fine-tuning (holdout) and the DP-SGD heads (privacy) have the protocol's schedules
(:data:`~oodscope.protocols.density.HOLDOUT_SCHEDULE`, :data:`~oodscope.protocols.density.PRIVACY`); the extraction
cache is the usual one (``--cache-dir``), the holdout fine-tuning resumes from ``<cache>/density``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import cifar_bench_dir, cifar_weights, markdown_table
from oodscope.safeio import write_atomic

DETECTORS = "msp,maxlogit,energy,gen,react,ash_s,knn,mahalanobis,rmds,vim"
METRICS = "confidence,boundary,agreement,holdout,privacy"
ENSEMBLE = ("cifar10_resnet32", "cifar10_resnet44", "cifar10_resnet56")


def table(records: list[dict]) -> str:
    """The metrics' pairwise Spearman on train, then the detectors' Spearman with each metric on ID test."""
    pairs = [r for r in records if r.get("metric_pair")]
    cells = [r for r in records if r.get("metric")]
    metrics = list(dict.fromkeys(r["metric"] for r in cells))
    by_detector: dict[str, dict[str, float]] = {}
    for r in cells:
        by_detector.setdefault(r["detector"], {})[r["metric"]] = r["spearman"]
    agreement = markdown_table(["metric pair (train)", "Spearman"], [(r["metric_pair"], r["spearman"]) for r in pairs])
    detectors = markdown_table(["detector", *metrics], [(name, *(values[m] for m in metrics))
                                                        for name, values in by_detector.items()])
    return f"{agreement}\n\n{detectors}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="train and test subsample size (default: the protocol's)")
    parser.add_argument("--metrics", default=METRICS, help=f"--density-metrics (default {METRICS})")
    parser.add_argument("--detectors", default=DETECTORS)
    parser.add_argument("--seed", type=int, default=0, help="the subsamples', the holdout split's and the heads' seed")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from oodscope.cli import main as cli
    from oodscope.protocols import density
    from oodscope.results_io import read_results

    if args.n is not None:
        density.N_IMAGES = args.n
    ensemble = ",".join(str(cifar_weights(name)) for name in ENSEMBLE) if "agreement" in args.metrics else None
    argv = ["bench", str(cifar_bench_dir()), "--model", "cifar10_resnet20", "--weights",
            str(cifar_weights("cifar10_resnet20")), "--protocol", "density", "--density-metrics", args.metrics,
            "--detectors", args.detectors, "--seed", str(args.seed), "--quiet", "--out", str(args.out)]
    argv += ["--ensemble", ensemble] if ensemble else []
    argv += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    if cli(argv) != 0:
        raise SystemExit("oodscope bench failed")
    records = [r for r in read_results(args.out / "results.json")[1] if r.get("setting") == "density"]
    write_atomic(args.out / "density_metrics.md", table(records))
    print(table(records))


if __name__ == "__main__":
    main()
