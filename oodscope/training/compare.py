"""Compare training objectives with a cross-entropy control fine-tuned the same way (``oodscope train-bench``).

Every objective starts from the same model and runs the same schedule, seed by seed (same ID data order,
augmentation and outlier draws), so its difference from the ``cross_entropy`` control is the objective's, not that
of the extra fine-tuning. Each fine-tuned model goes through ``oodscope.extract`` and is scored by the given
detectors (MSP, energy, KNN by default) on the benchmark's ID test set and OOD groups; :func:`summarise` gives the
mean and standard deviation over seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..detectors import get
from ..extraction.outputs import Need
from .engine import finetune

DETECTORS = ("msp", "energy", "knn")
CONTROL = "cross_entropy"


def subsample(split: Any, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """A fixed random subsample of ``n`` rows of a split (all rows when ``n <= 0`` or the split is smaller)."""
    if n <= 0 or len(split.inputs) <= n:
        return split.inputs, split.labels
    pick = np.sort(np.random.default_rng(seed).choice(len(split.inputs), n, replace=False))
    return split.inputs[pick], None if split.labels is None else split.labels[pick]


def evaluate_model(model, preprocess, bench, *, detectors: Sequence[Any] = DETECTORS, per_set: int = 0,
                   cache_dir: str | Path | None = None, device: str = "cpu", shifted: Any = None) -> dict[str, float]:
    """ID accuracy and, per detector and OOD group, the mean AUROC and FPR@95 (percent); with ``shifted`` (a
    covariate-shifted copy of the ID test split, e.g. :func:`oodscope.data.corruptions.corrupt` of it) also its
    accuracy, ``shifted_accuracy`` (OOD generalisation), on the same subsample as the test split."""
    from ..evaluation import evaluate
    from ..extraction.extract import extract

    from ..evaluation import labelled_detectors

    detectors = labelled_detectors(list(detectors))
    layers = sorted({layer for d in detectors.values() for layer in d.layer_names()})
    options = dict(preprocess=preprocess, cache_dir=cache_dir, progress=False, batch_size=500, device=device,
                   layers=layers)
    train = extract(model, (bench.train.inputs, bench.train.labels), name="train", **options)
    test = extract(model, subsample(bench.test, per_set), name="test", **options)
    row = {"id_accuracy": float(100 * np.mean(test.logits.argmax(1) == test.labels))}
    if shifted is not None:
        moved = extract(model, subsample(shifted, per_set), name="test-shifted", **options)
        row["shifted_accuracy"] = float(100 * np.mean(moved.logits.argmax(1) == moved.labels))
    ood = {group: {name: extract(model, subsample(split, per_set)[0], name=name, **options)
                   for name, split in sets.items()} for group, sets in bench.ood.items()}
    results = evaluate(detectors, test, ood, train=train)
    for r in results.group_means():
        row[f"{r['detector']} {r['group']} auroc"] = float(r["auroc"])
        row[f"{r['detector']} {r['group']} fpr95"] = float(r["fpr95"])
    return row


def compare(model, preprocess, bench, methods: Sequence[str], outliers: np.ndarray | None, *,
            seeds: Sequence[int] = (0,), detectors: Sequence[str] = DETECTORS, per_set: int = 0,
            cache_dir: str | Path | None = None, checkpoint_dir: str | Path | None = None, log=None,
            shifted: Any = None, **schedule: Any) -> list[dict[str, Any]]:
    """One record per (method, seed): training time, images/s and :func:`evaluate_model`'s metrics.

    ``methods`` always gets the control (:data:`CONTROL`) first; ``schedule`` goes to :func:`finetune`
    (``epochs``, ``max_steps``, ``lr``, ``batch_size``, ``device``, ...); ``shifted`` goes to
    :func:`evaluate_model`."""
    methods = [CONTROL] + [m for m in methods if m != CONTROL]
    for method in methods:
        objective = get(method)
        if objective.family != "training":
            raise ValueError(f"train-bench: {method!r} is a {objective.family} detector, not a training objective")
        if Need.OUTLIERS in objective.needs and outliers is None:
            raise ValueError(f"train-bench: {method!r} needs auxiliary outliers (--outliers FILE.npz)")
    # the control is also scored with every method's own post-hoc score that runs on a plain classifier (energy,
    # SCALE, ...), so that each method is compared with the control on its own score
    plain = {}
    for method in methods:
        own = get(method)().score_detector()
        if not own.layer_names() and own.label not in detectors:
            plain[own.label] = own
    rows = []
    for seed in seeds:
        for method in methods:
            objective = get(method)()
            uses = outliers if Need.OUTLIERS in objective.needs else None
            where = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{method}-seed{seed}"
            tuned, history = finetune(model, (bench.train.inputs, bench.train.labels), objective, uses, seed=seed,
                                      preprocess=preprocess, checkpoint_dir=where, **schedule)
            own = objective.score_detector()  # the paper's score, e.g. DOS's absent-class probability
            scored = [*detectors, *([] if own.label in detectors else [own])]
            if method == CONTROL:
                scored += [d for label, d in plain.items() if label != own.label]
            row = {"method": method, "seed": int(seed), "own_score": own.label,
                   "train_s": float(sum(history.seconds)), "img_per_s": float(history.images_per_second),
                   **evaluate_model(tuned, preprocess, bench, detectors=scored, per_set=per_set,
                                    cache_dir=cache_dir, device=schedule.get("device", "cpu"), shifted=shifted)}
            rows.append(row)
            if log is not None:
                log(row)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the mean and standard deviation over seeds of every number (``key`` and ``key_std``)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        summary: dict[str, Any] = {"method": method, "seeds": len(mine), "own_score": mine[0].get("own_score")}
        for key, value in mine[0].items():
            if isinstance(value, float):
                values = np.array([r[key] for r in mine])
                summary[key], summary[f"{key}_std"] = float(values.mean()), float(values.std())
        out.append(summary)
    return out
