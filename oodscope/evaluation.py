"""Evaluate fitted detectors on an ID test set against named, grouped OOD sets.

``evaluate`` returns :class:`Results`: one record per detector x OOD dataset with every metric (in percent),
group means, the ID accuracy and each detector's fit/score time. Datasets may be given as
:class:`~oodscope.extraction.outputs.Outputs` or, together with ``model=``, as raw data that is extracted once
through the cache (a second ``evaluate`` on the same data reads the cache and never calls the model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .detectors import Detector, create
from .extraction.outputs import Outputs
from .metrics import ood_metrics

METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")
RECORD_KEYS = ("detector", "dataset", "group") + METRICS


@dataclass
class Results:
    """Tidy evaluation results (metrics in percent, FPR@95 with ID as the positive class)."""

    records: list[dict[str, Any]]
    id_accuracy: float | None
    seconds: dict[str, float]
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    groups: dict[str, list[str]] = field(default_factory=dict)
    id_name: str = "id"
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)  # hyperparameters chosen on validation data
    id_errors: np.ndarray | None = field(default=None, repr=False)  # misclassified ID test samples (1.0), if known

    def failure(self, c_fn: float = 0.75) -> list[dict[str, Any]]:
        """Failure detection per detector (:mod:`oodscope.protocols.failure`): reject the misclassified ID test
        samples and every OOD sample, accept the rest; AUROC for that target, AURC, E-AURC, the SCOD risk
        (percent). ``oodscope bench --protocol failure`` adds a covariate-shifted copy of the ID test set."""
        from .metrics.failure import failure_metrics

        if self.id_errors is None:
            raise ValueError("failure detection needs the ID test set's logits and class labels")
        records = []
        for detector, by_set in self.scores.items():
            ood = np.concatenate([by_set[name] for names in self.groups.values() for name in names])
            records.append({"detector": detector, "dataset": f"{self.id_name}+ood", "group": "failure",
                            **failure_metrics(by_set[self.id_name], self.id_errors, ood, c_fn)})
        return records

    def group_means(self) -> list[dict[str, Any]]:
        """One record per detector x group: the mean of each metric over the group's datasets."""
        means = []
        for detector in dict.fromkeys(r["detector"] for r in self.records):
            for group in self.groups:
                rows = [r for r in self.records if r["detector"] == detector and r["group"] == group]
                if rows:
                    means.append({"detector": detector, "dataset": "mean", "group": group,
                                  **{m: float(np.mean([r[m] for r in rows])) for m in METRICS}})
        return means

    def table(self) -> list[dict[str, Any]]:
        """Per-dataset records followed by the group means, each with exactly :data:`RECORD_KEYS`."""
        return [{k: r[k] for k in RECORD_KEYS} for r in self.records] + self.group_means()

    def degenerate_notes(self, few_values: int = 10, saturated_share: float = 0.5,
                         relative_spread: float = 1e-9) -> list[str]:
        """One line per detector whose result needs a word: scores that take at most ``few_values`` distinct
        values on the ID test set, and fewer than half as many as it has samples (collapsed); one value shared by
        at least ``saturated_share`` of the ID test scores (saturated, e.g. a softmax at 1.0); scores of every set
        within ``relative_spread`` of their magnitude (near-constant: float rounding ranks them); or a ranking
        that is inverted (group mean AUROC under 50: the detector scores OOD as *more* ID than ID)."""
        notes = []
        for detector, by_set in self.scores.items():
            id_scores = np.asarray(by_set.get(self.id_name, ()), dtype=np.float64)
            values, counts = np.unique(id_scores, return_counts=True)
            everything = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in by_set.values()])
            span, scale = (np.ptp(everything), np.abs(everything).max()) if everything.size else (0.0, 0.0)
            if id_scores.size and len(values) <= min(few_values, id_scores.size // 2):
                notes.append(f"{detector}: its scores on {self.id_name} take only {len(values)} distinct value"
                             f"{'s' if len(values) != 1 else ''} over {id_scores.size} samples (collapsed; ties "
                             "decide its ranking)")
            elif id_scores.size > 1 and counts.max() >= saturated_share * id_scores.size:
                notes.append(f"{detector}: {100 * counts.max() / id_scores.size:.0f} % of its scores on "
                             f"{self.id_name} equal {values[counts.argmax()]:.6g} (saturated; ties decide the ranking "
                             "of those samples)")
            elif 0 < span <= relative_spread * scale:
                notes.append(f"{detector}: its scores vary by {span:.3g} around {scale:.6g} (near-constant: float "
                             "rounding decides its ranking)")
            for r in self.group_means():
                if r["detector"] == detector and r["auroc"] < 50.0:
                    notes.append(f"{detector}: inverted on {r['group']} (mean AUROC {r['auroc']:.2f} < 50: it "
                                 "scores these OOD sets as more in-distribution than the ID test set)")
        return notes

    def leaderboard(self) -> str:
        """A text table: detector x group, sorted by group then AUROC, with each detector's time."""
        from .results_io import format_table

        order = {group: i for i, group in enumerate(self.groups)}
        rows = [{**r, "seconds": self.seconds.get(r["detector"])} for r in self.group_means() if r["group"] in order]
        columns = [("detector", "detector", ""), ("group", "group", ""), ("AUROC", "auroc", ".2f"),
                   ("FPR@95", "fpr95", ".2f"), ("AUPR-In", "aupr_in", ".2f"), ("AUPR-Out", "aupr_out", ".2f"),
                   ("time [s]", "seconds", ".3f")]
        lines = [format_table(rows, columns, key_order=lambda r: (order[r["group"]], -r["auroc"]))]
        if self.id_accuracy is not None:
            lines.append(f"ID accuracy ({self.id_name}): {self.id_accuracy:.2f} %")
        return "\n".join(lines)

    def write(self, out_dir: str | Path, meta: Mapping[str, Any] | None = None, *,
              extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
        """Write ``results.json`` and ``results.csv`` (per-dataset rows, then group means) with
        :func:`oodscope.results_io.write_results`; ``meta`` defaults to :func:`~oodscope.results_io.run_metadata`
        of an ``evaluate`` run (versions, ID accuracy, each detector's seconds)."""
        from .results_io import run_metadata, write_results

        if meta is None:
            meta = run_metadata("evaluate", id_accuracy=self.id_accuracy, id_name=self.id_name,
                                tuned=self.tuned or None, timings=self.seconds)
        return write_results(out_dir, self.table(), meta, extra=extra)


def labelled_detectors(detectors: Mapping[str, Detector] | Sequence[Detector | str] | str) -> dict[str, Detector]:
    """``{label: detector}``: a mapping is kept as given; a list is keyed by :attr:`Detector.label` (the name plus
    every non-default parameter, e.g. ``knn_distance(k=1)``). Two entries with one label are refused, never merged."""
    if isinstance(detectors, str):
        detectors = [detectors]
    if isinstance(detectors, Mapping):
        return dict(detectors)
    made: dict[str, Detector] = {}
    for entry in detectors:
        detector = create(entry) if isinstance(entry, str) else entry
        label = detector.label
        if label in made:
            kind = "the same detector object" if made[label] is detector else "two detectors with the same settings"
            raise ValueError(f"evaluate: {kind} given twice as {label!r}; results are keyed by label, so give "
                             "each a distinct setting or pass a {label: detector} mapping")
        made[label] = detector
    return made


def _as_groups(ood: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    if ood and all(isinstance(v, Mapping) for v in ood.values()):
        return {group: dict(sets) for group, sets in ood.items()}
    return {"ood": dict(ood)}


def evaluate(detectors: Mapping[str, Detector] | Sequence[Detector | str] | str, id_test: Any,
             ood: Mapping[str, Any], *, train: Any = None, val: Any = None, model: Any = None,
             preprocess: Callable | None = None, layers: Iterable[str] = (), progress: bool = False,
             **extract_options: Any) -> Results:
    """Score the ID test set and every OOD set with every detector and compute the metrics.

    Args:
        detectors: fitted detectors (a mapping name -> detector, or a list of detectors or registry names).
            Unfitted ones are fitted on ``train``.
        id_test: ID test data (:class:`Outputs`, or raw data when ``model`` is given).
        ood: ``{group: {dataset: data}}`` (e.g. ``near``/``far``) or a flat ``{dataset: data}``.
        train: ID training data, needed only to fit unfitted detectors.
        val: held-out labelled ID data, given to unfitted detectors that declare ``Need.VALIDATION``
            (``fit(train, val=val)``, e.g. temperature scaling's temperature).
        model: when given, raw datasets are extracted with :func:`oodscope.extract` (cached) before scoring.
        preprocess: the model's input preprocessing, for that extraction.
        layers: intermediate layers to record in that extraction.
        progress: show a progress bar over detectors (fit and score).
        **extract_options: further options of :func:`oodscope.extract` (``cache_dir``, ``device``, ...).
    """
    detectors = labelled_detectors(detectors)
    groups = _as_groups(ood)
    load = _loader(model, preprocess, layers, extract_options)
    id_outputs = load(id_test, "id_test")
    ood_outputs = {group: {name: load(data, name) for name, data in sets.items()} for group, sets in groups.items()}
    _check_roles(id_outputs, ood_outputs)

    seconds: dict[str, float] = {}
    records, scores = [], {}
    train_outputs = None
    for det_name, detector in _progress(detectors.items(), progress, len(detectors)):
        start = time.perf_counter()
        if not hasattr(detector, "input_dims_"):
            if train is None:
                raise ValueError(f"detector {det_name!r} is not fitted and no train data was given")
            if train_outputs is None:
                train_outputs = load(train, "train")
                val_outputs = None if val is None else load(val, "val")
            detector.fit(train_outputs, val=val_outputs)
        scores[det_name] = {id_outputs.name: detector.score(id_outputs)}
        for sets in ood_outputs.values():
            for name, outputs in sets.items():
                scores[det_name][name] = detector.score(outputs)
        seconds[det_name] = time.perf_counter() - start
        for group, sets in ood_outputs.items():
            for name in sets:
                values = ood_metrics(scores[det_name][id_outputs.name], scores[det_name][name])
                records.append({"detector": det_name, "dataset": name, "group": group,
                                **{k: 100.0 * v for k, v in values.items()}})
    errors = None if id_accuracy(id_outputs) is None else \
        (id_outputs.logits.argmax(axis=1) != id_outputs.labels).astype(np.float64)
    return Results(records=records, id_accuracy=id_accuracy(id_outputs), seconds=seconds, scores=scores,
                   groups={g: list(s) for g, s in ood_outputs.items()}, id_name=id_outputs.name, id_errors=errors)


def _progress(items: Iterable, show: bool, total: int) -> Iterable:
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc="fit+score", unit="detector", leave=False)


def _check_roles(id_outputs: Outputs, ood_outputs: dict[str, dict[str, Outputs]]) -> None:
    """Refuse an ID test set made of OOD-labelled samples, an OOD set that is the ID test set, and two sets
    under one name (scores are kept per set name: a second set of the same name would replace the first's)."""
    if id_outputs.labels is not None and (id_outputs.labels < 0).all():
        raise ValueError(f"ID test set {id_outputs.name!r} has only OOD labels (-1); pass it under ood=")
    seen = {id_outputs.name: "the ID test set"}
    for group, sets in ood_outputs.items():
        for name, outputs in sets.items():
            if name in seen:
                raise ValueError(f"OOD set name {name!r} (group {group!r}) is already used by {seen[name]}; "
                                 "give every set a distinct name")
            seen[name] = f"group {group!r}"
            if outputs.name == id_outputs.name:
                raise ValueError(f"OOD set {name!r} (group {group!r}) has the ID test set's name "
                                 f"{id_outputs.name!r}; names must be unique")
            if outputs is id_outputs or _same_arrays(outputs, id_outputs):
                raise ValueError(f"OOD set {name!r} (group {group!r}) is identical to the ID test set")


def _same_arrays(a: Outputs, b: Outputs) -> bool:
    pairs = [(x, y) for x, y in ((a.logits, b.logits), (a.features, b.features)) if x is not None or y is not None]
    return bool(pairs) and len(a) == len(b) and all(
        x is not None and y is not None and np.array_equal(x, y) for x, y in pairs)


def id_accuracy(outputs: Outputs) -> float | None:
    """Top-1 accuracy in percent, when the outputs have logits and class labels."""
    if outputs.logits is None or outputs.labels is None or (outputs.labels < 0).any():
        return None
    return float(100.0 * np.mean(outputs.logits.argmax(axis=1) == outputs.labels))


def _loader(model: Any, preprocess: Callable | None, layers: Iterable[str],
            options: dict[str, Any]) -> Callable[[Any, str], Outputs]:
    layers = list(layers)

    def load(data: Any, name: str) -> Outputs:
        if isinstance(data, Outputs):
            return data
        if model is None:
            raise ValueError(f"dataset {name!r} is raw data; pass model= to extract it, or pass Outputs")
        from .extraction.extract import extract

        return extract(model, data, name=name, preprocess=preprocess, layers=layers, **options)

    return load
