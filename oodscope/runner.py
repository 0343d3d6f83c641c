"""Run a benchmark end to end: extract every split once (cached), fit detectors, evaluate."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from .data.benchmark import Benchmark
from .detectors import Detector, available, get
from .evaluation import Results, evaluate, labelled_detectors
from .extraction import Need, Outputs
from .extraction.extract import extract_many

POST_HOC_NEEDS = frozenset({Need.LOGITS, Need.FEATURES, Need.HEAD, Need.LABELS, Need.VALIDATION,
                            Need.OOD_VALIDATION})


def default_detectors() -> list[str]:
    """Registered detectors that run on cached logits/features alone (no network re-run, no training)."""
    return [name for name in available()
            if get(name).needs <= POST_HOC_NEEDS and not get(name).trains_network
            and get(name).family == "ood"]  # tabular: oodscope adbench; images: oodscope ad


def parse_detectors(spec: str | Sequence[str] | None) -> list[str]:
    """``None``/``"all"`` -> the defaults; ``"a,b"`` -> those names (each checked against the registry)."""
    if spec is None or spec == "all":
        return default_detectors()
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    for name in names:
        get(name)  # raises with suggestions for unknown names
    return names


def extract_benchmark(bench: Benchmark, model: Any, preprocess: Callable | None, *, layers: Sequence[str] = (),
                      **options: Any) -> dict[str, Outputs]:
    """Outputs of every split of ``bench`` by its :meth:`Benchmark.datasets` name, each extracted once (with
    ``engine="ray"`` all splits in one Ray Data execution: :func:`oodscope.extraction.extract.extract_many`)."""
    splits = bench.datasets()
    names = {name: f"{bench.name}-{name.replace('/', '-')}" for name in splits}
    found = extract_many(model, {names[name]: (split.inputs, split.labels) for name, split in splits.items()},
                         preprocess=preprocess, layers=layers, **options)
    return {name: found[names[name]] for name in splits}


def run_benchmark(bench: Benchmark, model: Any, preprocess: Callable | None,
                  detectors: Sequence[str | Detector], **options: Any) -> tuple[Results, dict[str, float]]:
    """Extract (cached), fit every detector on the ID train split, evaluate on test vs each OOD group.

    With ``tune=True`` each detector's hyperparameters are first chosen on the ID val split against the
    ``[ood.val]`` sets only (:func:`oodscope.tune`, cached outputs), then it is fitted on train as usual.
    """
    start = time.perf_counter()
    tune_first = options.pop("tune", False)
    made = labelled_detectors(detectors)
    on_images = {label: d for label, d in made.items() if getattr(d, "takes_images", False)}
    made = {label: d for label, d in made.items() if label not in on_images}
    for detector in on_images.values():  # image detectors that read a classifier (DiffGuard) get the benchmark's
        if hasattr(detector, "use_classifier"):
            detector.use_classifier(model, preprocess)
    if not made:  # only density models of the images: no forward pass of the classifier
        groups = {group: list(sets) for group, sets in bench.ood.items()}
        results = Results(records=[], id_accuracy=None, seconds={}, groups=groups, id_name="test")
        score_images(results, on_images, bench)
        return results, {"extract": 0.0, "total": time.perf_counter() - start}
    # detectors that read nothing but recorded layers (a training objective's head statistics: absent_class,
    # min_others) need those layers in the one extraction pass
    recorded = sorted({layer for d in made.values() if d.needs == frozenset({Need.LAYERS})
                       for layer in d.layer_names()})
    if recorded and "layers" not in options:
        options["layers"] = recorded
    outputs = extract_benchmark(bench, model, preprocess, **options)
    extract_seconds = time.perf_counter() - start
    for name, out in outputs.items():
        out.name = name
    tuned = tune_on_validation(made, outputs, list(bench.ood_val)) if tune_first else {}
    ood = {group: {dataset: outputs[f"{group}/{dataset}"] for dataset in sets} for group, sets in bench.ood.items()}
    # held-out data goes to the detectors that declare it (Need.VALIDATION: the val split; the OOD val sets are
    # kept for tuning, never used to fit)
    results = evaluate(made, outputs["test"], ood, train=outputs["train"], val=outputs["val"],
                       progress=options.get("progress", False))
    results.tuned = tuned
    score_images(results, on_images, bench)
    return results, {"extract": extract_seconds, "total": time.perf_counter() - start}


def score_images(results: Results, detectors: dict[str, Detector], bench: Benchmark) -> None:
    """Fit detectors that take the raw images (``takes_images``: the generative family's density models) on ``bench.train`` and add their records
    and scores to ``results`` (the same metrics, groups and ID set as the rest of the run)."""
    from .evaluation import METRICS
    from .metrics import ood_metrics

    for label, detector in detectors.items():
        start = time.perf_counter()
        if not hasattr(detector, "input_dims_"):
            detector.fit(bench.train.inputs)
        by_set = {results.id_name: detector.score(bench.test.inputs)}
        for group, sets in bench.ood.items():
            for name, split in sets.items():
                by_set[name] = detector.score(split.inputs)
                values = ood_metrics(by_set[results.id_name], by_set[name])
                results.records.append({"detector": label, "dataset": name, "group": group,
                                        **{k: 100.0 * values[k] for k in METRICS}})
        results.scores[label] = by_set
        results.seconds[label] = time.perf_counter() - start


def tune_on_validation(detectors: dict[str, Detector], outputs: dict[str, Outputs],
                       ood_val_names: list[str]) -> dict[str, dict[str, Any]]:
    """Set each detector's grid parameters to the best setting on ``val`` vs ``ood_val/*`` (in place)."""
    from .tuning import tune

    if not ood_val_names:
        raise ValueError("tuning needs [ood.val] sets in the benchmark; this one has none")
    ood_val = {name: outputs[f"ood_val/{name}"] for name in ood_val_names}
    tuned = {}
    for name, detector in detectors.items():
        grid = type(detector).grid
        if not grid or Need.MODEL in type(detector).needs:  # no grid, or tuning would re-run the network
            continue
        fixed = {k: v for k, v in detector.get_params().items() if k not in grid}
        result = tune(detector.name, None, outputs["val"], ood_val, train=outputs["train"], val=outputs["val"],
                      **fixed)
        detector.set_params(**result.best_params)
        tuned[name] = result.best_params
    return tuned
