"""``oodscope bench [BENCHMARK]``: run a benchmark and print the leaderboard (default: ``digits``, no download)."""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any, Mapping


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run an OOD benchmark and print the leaderboard")
    add_bench_arguments(parser)
    parser.set_defaults(run=run)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a benchmark run (shared with ``oodscope train``, which runs one on the fine-tuned model)."""
    parser.add_argument("benchmark", nargs="?", default="digits",
                        help="built-in name (default: digits) or a folder with benchmark.toml")
    parser.add_argument("--model", default=None,
                        help="model for benchmark folders: a zoo name (e.g. cifar10_resnet20), a TorchScript file, "
                             "package.module:callable, torchvision:NAME, timm:NAME or hf:MODEL")
    parser.add_argument("--weights", default=None, help="local weights file for --model")
    parser.add_argument("--data-root", default=None, help="where built-in benchmarks keep downloaded data")
    parser.add_argument("--detectors", default="all", help="comma-separated names, or 'all' (default)")
    parser.add_argument("--family", default=None,
                        help="run every detector of this family instead (e.g. generative: density models of the "
                             "images, fitted on [id].train)")
    parser.add_argument("--out", default="oodscope-results", help="output directory (default: ./oodscope-results)")
    parser.add_argument("--cache-dir", default=None, help="extraction cache (default: $OODSCOPE_CACHE or ~/.cache/oodscope)")
    parser.add_argument("--device", default="auto", help="torch device (default: auto = CUDA if present)")
    parser.add_argument("--batch-size", type=int, default=256, help="extraction batch size")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the extraction cache")
    parser.add_argument("--seed", type=int, default=0, help="seed of the digits splits and classifier")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--tune", action="store_true",
                        help="choose each detector's hyperparameters on [id].val vs [ood.val] before fitting")
    parser.add_argument("--groups", default=None, help="comma-separated OOD groups to run (e.g. near,far); default all")
    parser.add_argument("--full-spectrum", action="store_true",
                        help="add a covariate-shifted copy of the ID test (common corruptions), counted as ID")
    parser.add_argument("--protocol", default=None,
                        help="comma-separated evaluation protocols to run after the benchmark: failure (reject "
                             "misclassified or OOD), unit-tests (synthetic OOD sets), scaling (inputs x alpha), "
                             "density (prototypicality metrics vs scores), label-noise (classifiers fine-tuned "
                             "with noisy labels), open-set (classifiers trained on known classes only), correlation (ID "
                             "accuracy vs AUROC across --ensemble models)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="where the forward pass runs: this process (default) or a Ray Data actor pool "
                             "(needs oodscope[ray]; same outputs and cache entries)")
    parser.add_argument("--address", default=None,
                        help="--engine ray: a running Ray cluster (e.g. ray://head:10001 or auto); default: start "
                             "a local Ray instance")
    parser.add_argument("--workers", type=int, default=2, help="--engine ray: model replicas in the actor pool")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0,
                        help="--engine ray: GPUs each replica asks Ray for (0: CPU)")
    parser.add_argument("--ensemble", default=None,
                        help="density and correlation protocols: comma-separated further models, each a model SPEC, "
                             "NAME=WEIGHTS, or a zoo weights file named after its model (cifar10_resnet32.pth)")
    parser.add_argument("--density-metrics", default=None,
                        help="density protocol: comma-separated metrics of confidence, boundary, agreement (needs "
                             "--ensemble), holdout (fine-tunes on half the ID train set), privacy (DP-SGD heads); "
                             "default: confidence, boundary and agreement with --ensemble")


def load_ensemble(text: str | None) -> list[tuple[str, Any, Any]]:
    """``(name, model, preprocess)`` of each ``--ensemble`` entry: a model SPEC, ``NAME=WEIGHTS``, or a zoo weights
    file named after its model."""
    from ..models.spec import ModelSpec, load
    from ..models.zoo import available_models

    members = []
    for entry in [e.strip() for e in (text or "").split(",") if e.strip()]:
        name, _, weights = entry.partition("=")
        if not weights and Path(entry).suffix == ".pth" and Path(entry).stem in available_models():
            name, weights = Path(entry).stem, entry
        model, preprocess, _ = load(ModelSpec(name, weights=weights or None))
        members.append((Path(name).name, model, preprocess))
    return members


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """``{"engine": RayEngine(...)}`` for ``--engine ray``; nothing for the local engine (the default path)."""
    if getattr(args, "engine", "local") == "local":
        if getattr(args, "address", None) or getattr(args, "gpus_per_worker", 0):
            raise ValueError("--address and --gpus-per-worker need --engine ray")
        return {}
    from ..extraction.ray_engine import RayEngine

    return {"engine": RayEngine(address=args.address, workers=args.workers,
                                gpus_per_worker=args.gpus_per_worker).check()}


def prepare_from(args: argparse.Namespace):
    from ..data.builtin import BenchRequest, prepare

    return prepare(BenchRequest(benchmark=args.benchmark, model=args.model, weights=args.weights,
                                data_root=args.data_root, cache_dir=args.cache_dir, seed=args.seed,
                                device=args.device))


def run(args: argparse.Namespace) -> int:
    from ..runner import parse_detectors

    start = time.perf_counter()
    parse_detectors(args.detectors)  # unknown names fail before any loading
    return run_prepared(args, prepare_from(args), start)


def run_prepared(args: argparse.Namespace, prepared, start: float, **meta_extra) -> int:
    """Extract, fit, score, print the leaderboard and write results.json, results.csv and report.html."""
    from ..data.spec import select_groups
    from ..detectors import create
    from ..report.html import write_report
    from ..report.meta import bench_metadata
    from ..results_io import write_results
    from ..runner import parse_detectors, run_benchmark

    from .. import protocols

    protocols.parse(getattr(args, "protocol", None))  # an unknown protocol fails before any work
    ensemble = load_ensemble(getattr(args, "ensemble", None))
    if getattr(args, "density_metrics", None):  # a wrong metric fails before any work
        from ..protocols.density import chosen_metrics

        chosen_metrics(args.density_metrics, bool(ensemble))
    if getattr(args, "family", None):
        from ..detectors import available
        from ..detectors.registry import DETECTOR_FAMILIES

        if args.family not in DETECTOR_FAMILIES:
            raise ValueError(f"--family {args.family!r}: choose one of {', '.join(DETECTOR_FAMILIES)}")
        args.detectors = ",".join(available(family=args.family))
    detectors = parse_detectors(args.detectors)
    bench = select_groups(prepared.bench, args.groups)
    detectors = {name: create(name) for name in detectors}
    labelled = {detector.label: detector for detector in detectors.values()}  # the records' detector names
    extract_options = dict(cache_dir=args.cache_dir, device=args.device, batch_size=args.batch_size,
                           use_cache=not args.no_cache, progress=not args.quiet, **engine_options(args))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        results, timing = run_benchmark(bench, prepared.model, prepared.preprocess, list(detectors.values()),
                                        tune=args.tune, **extract_options)
    notes = results.degenerate_notes() + fit_notes(caught, labelled)
    print(f"benchmark {bench.name} ({prepared.model_name}): ID test {len(bench.test)}, "
          + ", ".join(f"{g}/{d} {len(s)}" for g, sets in bench.ood.items() for d, s in sets.items()))
    for name, count in bench.overlaps.items():
        print(f"warning: {count} images of OOD set {name} are identical to ID images")
    print(results.leaderboard())
    for note in notes:
        print(f"note: {note}")
    for name, params in results.tuned.items():
        print(f"tuned on validation: {name} {params}")
    records, report_options = results.table(), {}
    if args.full_spectrum:
        from ..fullspectrum import full_spectrum_records, score_shifted

        if any(getattr(d, "takes_images", False) for d in detectors.values()):
            raise ValueError("--full-spectrum runs the classifier's detectors; leave out the generative family")
        shifted_scores, shifted_accuracy, timing["full-spectrum"] = score_shifted(
            bench, prepared.model, prepared.preprocess, detectors, **extract_options)
        full_spectrum = full_spectrum_records(results, shifted_scores, shifted_accuracy)
        records += full_spectrum
        report_options = {"full_spectrum": full_spectrum, "shifted_scores": shifted_scores}
        print(f"full-spectrum (ID = test + shifted test; shifted accuracy {shifted_accuracy:.2f} %):")
        for r in full_spectrum:
            if r["setting"] == "shift-sensitivity":
                print(f"  {r['detector']:<14}AUROC clean vs shifted {r['auroc']:6.2f}, "
                      f"shifted flagged at 95 % TPR {r['flagged']:6.2f} %")
    by_protocol: dict[str, list[dict[str, Any]]] = {}  # the report's protocol sections
    for name in protocols.parse(getattr(args, "protocol", None)):
        protocol_start = time.perf_counter()
        on_outputs = {label: d for label, d in labelled.items() if not getattr(d, "takes_images", False)}
        context = protocols.Context(bench, prepared.model, prepared.preprocess, on_outputs, results,
                                    extract_options, seed=getattr(args, "seed", 0), ensemble=ensemble,
                                    options={"density_metrics": getattr(args, "density_metrics", None)})
        protocol_records, printed = protocols.run(name, context)
        records += protocol_records
        by_protocol[name] = protocol_records
        timing[f"protocol {name}"] = time.perf_counter() - protocol_start
        print(printed)
    out = Path(args.out)
    timing.pop("total", None)  # run_benchmark's; the command's own total goes last
    timing.update({f"{name} fit+score": seconds for name, seconds in results.seconds.items()})
    timing["total"] = time.perf_counter() - start
    meta = bench_metadata(bench, prepared.model_name, args.weights, prepared.model, argv=getattr(args, "argv", None),
                          detectors=labelled, timings=timing, id_accuracy=results.id_accuracy, id_name=results.id_name,
                          tuned=results.tuned or "defaults", notes=notes or None, **meta_extra)
    paths = write_results(out, records, meta)
    report_start = time.perf_counter()  # the histograms are drawn once, in the report's detector sections
    paths["html"] = write_report(out / "report.html", results, meta, detectors=labelled, notes=notes,
                                 protocols=by_protocol, **report_options)
    report_seconds, total = time.perf_counter() - report_start, time.perf_counter() - start
    print(f"extraction {timing['extract']:.2f} s, figures and report {report_seconds:.2f} s "
          f"({100 * report_seconds / total:.0f} % of the run), total {total:.2f} s; wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0


def fit_notes(caught: list, detectors: Mapping[str, Any]) -> list[str]:
    """The warnings of a detector (a message starting with its label, e.g. temperature's degenerate calibration)
    as notes for the leaderboard and the report; any other warning is shown as usual."""
    names = {*detectors, *(getattr(d, "name", label) for label, d in detectors.items())}
    notes, shown = [], set()
    for warning in caught:
        message = str(warning.message)
        if issubclass(warning.category, UserWarning) and message.split(":", 1)[0] in names:
            notes.append(message)
        elif (message, warning.category) not in shown:  # once, as the default filter would
            shown.add((message, warning.category))
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return list(dict.fromkeys(notes))
