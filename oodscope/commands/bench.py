"""``oodscope bench [BENCHMARK]``: run a benchmark and print the leaderboard (default: ``digits``, no download)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run an OOD benchmark and print the leaderboard")
    parser.add_argument("benchmark", nargs="?", default="digits",
                        help="built-in name (default: digits) or a folder with benchmark.toml")
    parser.add_argument("--model", default=None, help="model name for benchmark folders, e.g. cifar10_resnet20")
    parser.add_argument("--weights", default=None, help="local weights file for --model")
    parser.add_argument("--data-root", default=None, help="where built-in benchmarks keep downloaded data")
    parser.add_argument("--detectors", default="all", help="comma-separated names, or 'all' (default)")
    parser.add_argument("--out", default="oodscope-results", help="output directory (default: ./oodscope-results)")
    parser.add_argument("--cache-dir", default=None, help="extraction cache (default: $OODSCOPE_CACHE or ~/.cache/oodscope)")
    parser.add_argument("--device", default="auto", help="torch device (default: auto = CUDA if present)")
    parser.add_argument("--batch-size", type=int, default=256, help="extraction batch size")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the extraction cache")
    parser.add_argument("--seed", type=int, default=0, help="seed of the digits splits and classifier")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..data.builtin import BenchRequest, prepare
    from ..report.plots import plot_score_distributions
    from ..runner import parse_detectors, run_benchmark

    start = time.perf_counter()
    detectors = parse_detectors(args.detectors)
    prepared = prepare(BenchRequest(benchmark=args.benchmark, model=args.model, weights=args.weights,
                                    data_root=args.data_root, cache_dir=args.cache_dir, seed=args.seed,
                                    device=args.device))
    bench = prepared.bench
    results, timing = run_benchmark(bench, prepared.model, prepared.preprocess, detectors,
                                    cache_dir=args.cache_dir, device=args.device, batch_size=args.batch_size,
                                    use_cache=not args.no_cache, progress=not args.quiet)
    print(f"benchmark {bench.name} ({prepared.model_name}): ID test {len(bench.test)}, "
          + ", ".join(f"{g}/{d} {len(s)}" for g, sets in bench.ood.items() for d, s in sets.items()))
    print(results.leaderboard())
    out = Path(args.out)
    paths = results.write(out)
    paths["png"] = plot_score_distributions(results, out / "score_distributions.png")
    print(f"extraction {timing['extract']:.2f} s, total {time.perf_counter() - start:.2f} s; wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0
