"""Benchmark protocols for tabular anomaly detection (``oodscope adbench``).

``dte`` (Livernoche et al., "On Diffusion Modeling for Anomaly Detection", ICLR 2024, Sec. 5 and their
``run.py`` / ``data_generator.py`` at github.com/vicliv/DTE), two settings, seeds ``0..4`` by default:

* ``dte-semi`` (semi-supervised): fit on 50 % of the normal rows; test on the other normal rows and all anomalies;
  a ``StandardScaler`` fitted on the training rows.
* ``dte-unsup`` (unsupervised): standardise the whole data set, fit on a bootstrap resample of it (with
  replacement, same size), test on the whole data set.

``resample_to=1000`` is the **DTE-exact** mode: the draws follow the DTE code (inherited from ADBench's data
generator) exactly, on the rows in the file's order (:func:`~oodscope.anomaly.datasets.adbench_order`) with
``RandomState(seed)``: data sets with fewer than 1000 rows are resampled to 1000 with replacement (duplicates then
appear in train and test); data sets above 50,000 rows are subsampled to 50,000 without replacement (``run.py``'s
``max_size``; re-seeded first, as the generator does); the semi-supervised training rows are the **first** half of
the normal rows in that order (so, without a resample, the same rows for every seed); the unsupervised setting draws
the generator's zero labelled anomalies (a permutation of the anomaly indices) and then the bootstrap ``choice``.
These are the authors' own splits for every data set. The default ``resample_to=None`` keeps the data set as it is
and takes a seeded random permutation of the normal rows for the semi-supervised half.

``adbench`` (Han et al., "ADBench", NeurIPS 2022): a 70/30 stratified train/test split, min-max scaling fitted on
the training part, fit on the whole training part (unlabelled, anomalies included), seeds ``1..3``. ADBench's
``data_generator.py`` resamples data sets with fewer than 1000 rows to 1000 rows with replacement *before* the split
(its default ``generate_duplicates=True``; WDBC and wine are both below), so its published numbers on WDBC/wine have
copies of the same row in train and test; ``resample_to=1000`` reproduces that. The draws follow ADBench's
sequence exactly (``RandomState(seed)``: ``choice`` for the resample, then ``train_test_split`` on the same state, on
the rows in ADBench's file order, :func:`~oodscope.anomaly.datasets.adbench_order`), so the splits are ADBench's own.

Every split is scored with the normal test rows as "in-distribution" and the anomalies as "out": AUROC and the
AUPR with anomalies positive (``aupr_out``) are the numbers ADBench reports.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..detectors.base import SaturationWarning
from .datasets import TabularDataset

PROTOCOLS = {"dte": ("dte-semi", "dte-unsup"), "adbench": ("adbench",)}
DEFAULT_SEEDS = {"dte": (0, 1, 2, 3, 4), "adbench": (1, 2, 3)}


@dataclass
class Split:
    """One train/test split of one data set under one setting and seed (already scaled)."""

    dataset: str
    setting: str
    seed: int
    X_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def _min_max(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low, span = train.min(axis=0), np.ptp(train, axis=0)
    span = np.where(span > 0, span, 1.0)
    return (train - low) / span, (test - low) / span


def splits(data: TabularDataset, protocol: str, seeds: Iterable[int] | None = None,
           resample_to: int | None = None) -> Iterator[Split]:
    """The splits of ``data`` under ``protocol`` (``"dte"`` or ``"adbench"``), one per setting and seed."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    seeds = DEFAULT_SEEDS[protocol] if seeds is None else tuple(seeds)
    for setting in PROTOCOLS[protocol]:
        for seed in seeds:
            if setting == "adbench":
                yield _adbench_split(data, seed, resample_to)
                continue
            yield _dte_split(data, setting, seed, resample_to)


DTE_MAX_ROWS = 50_000  # the DTE run.py's generator(max_size=50000)
ADBENCH_MAX_ROWS = 10_000  # ADBench's generator default max_size


def _exact_rows(X: np.ndarray, y: np.ndarray, seed: int, resample_to: int, max_rows: int):
    """The data generator's row draws (ADBench's ``DataGenerator.generator``, also the DTE code's): with numpy's
    global state seeded, resample a data set below ``resample_to`` rows to that many with replacement; re-seed and
    subsample one above ``max_rows`` to that many without replacement. Returns ``(X, y, state, resampled)``; later
    draws continue from ``state``."""
    state = np.random.RandomState(seed)
    resampled = len(y) < resample_to
    if resampled:
        pick = state.choice(np.arange(len(y)), resample_to, replace=True)
        X, y = X[pick], y[pick]
    if len(y) > max_rows:
        state = np.random.RandomState(seed)  # the generator calls set_seed(seed) again before subsampling
        pick = state.choice(np.arange(len(y)), max_rows, replace=False)
        X, y = X[pick], y[pick]
    return X, y, state, resampled


def _dte_split(data: TabularDataset, setting: str, seed: int, resample_to: int | None) -> Split:
    """The DTE code's split: file row order; with ``resample_to`` its exact draws (resample, subsample, the *first*
    half of the normal rows); without, a seeded permutation of the normal rows."""
    from .datasets import adbench_order

    order = adbench_order(data)
    X, y = data.X[order], data.y[order]
    if resample_to is None:
        state = np.random.RandomState(seed)
    else:
        X, y, state, _ = _exact_rows(X, y, seed, resample_to, DTE_MAX_ROWS)
    if setting == "dte-semi":
        normal = np.flatnonzero(y == 0)
        if resample_to is None:
            normal = state.permutation(normal)
        n_train = round(0.5 * len(normal))  # Python's round, as the DTE code
        test = np.concatenate([normal[n_train:], np.flatnonzero(y == 1)])
        train_x, test_x = _standardise(X[normal[:n_train]], X[test])
        return Split(data.name, setting, seed, train_x, test_x, y[test])
    X, _ = _standardise(X, X)
    state.permutation(int(np.sum(y == 1)))  # the generator's choice of 0 labelled anomalies draws a permutation
    boot = state.choice(np.arange(len(y)), len(y), replace=True)
    return Split(data.name, setting, seed, X[boot], X, y)


def _adbench_split(data: TabularDataset, seed: int, resample_to: int | None) -> Split:
    """ADBench's split: file row order, with ``resample_to`` its exact draws (resample, subsample to 10,000 rows),
    stratified 70/30, min-max."""
    from sklearn.model_selection import train_test_split

    from .datasets import adbench_order

    order = adbench_order(data)
    X, y = data.X[order], data.y[order]
    if resample_to is None:
        state = np.random.RandomState(seed)  # ADBench seeds numpy's global state and draws both steps from it
    else:
        X, y, state, _ = _exact_rows(X, y, seed, resample_to, ADBENCH_MAX_ROWS)
    train, test = train_test_split(np.arange(len(y)), test_size=0.3, shuffle=True, stratify=y, random_state=state)
    train_x, test_x = _min_max(X[train], X[test])
    return Split(data.name, "adbench", seed, train_x, test_x, y[test])


def anomaly_detectors() -> list[str]:
    """Registered anomaly detectors that ``oodscope adbench`` runs by default (tabular input, no extra arguments)."""
    from ..detectors import available, get

    return [name for name in available(family="anomaly") if getattr(get(name), "adbench_default", False)]


def run_protocol(detectors: Sequence[str], datasets: Sequence[TabularDataset], protocol: str,
                 seeds: Iterable[int] | None = None, resample_to: int | None = None,
                 params: dict[str, dict] | None = None, log=None) -> tuple[list[dict], dict[str, float]]:
    """Fit and score every detector on every split; per-seed records (metrics in percent) and seconds per detector.

    ``params`` maps a detector name to extra constructor arguments. Detectors with a ``seed`` parameter get the
    split's seed, so the runs are reproducible and the seeds vary the randomness of the method too.
    """
    from ..detectors import create
    from ..metrics import ood_metrics

    params = params or {}
    records, seconds = [], {name: 0.0 for name in detectors}
    for data in datasets:
        for split in splits(data, protocol, seeds, resample_to):
            normal, anomalous = split.y_test == 0, split.y_test == 1
            saturated: set[str] = set()
            for name in detectors:
                options = dict(params.get(name, {}))
                start = time.perf_counter()
                detector = create(name, **options)
                if "seed" not in options:
                    detector.with_seed(split.seed)
                detector.fit(split.X_train)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", SaturationWarning)
                    scores = detector.score(split.X_test)
                for warning in caught:
                    if issubclass(warning.category, SaturationWarning):
                        saturated.add(name)
                    else:
                        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
                seconds[name] += time.perf_counter() - start
                values = ood_metrics(scores[normal], scores[anomalous])
                records.append({"detector": name, "dataset": split.dataset, "group": split.setting,
                                "seed": split.seed, **{k: 100.0 * v for k, v in values.items()}})
                if log is not None:
                    log(f"{split.dataset:<8}{split.setting:<11}seed {split.seed}  {name:<16}"
                        f"AUROC {records[-1]['auroc']:6.2f}")
            if saturated:  # one line per split, not one per detector: the rows are the data's, not the method's
                warnings.warn(f"{split.dataset} {split.setting} seed {split.seed}: some test rows exceed the training "
                              "rows' magnitude more than 1e6 times after scaling (a feature almost constant in the "
                              f"training rows); {', '.join(sorted(saturated))} saturate on them", SaturationWarning,
                              stacklevel=2)
    return records, seconds


def summarise(records: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per detector x dataset x setting."""
    keys = list(dict.fromkeys((r["detector"], r["dataset"], r["group"]) for r in records))
    out = []
    for detector, dataset, group in keys:
        rows = [r for r in records if (r["detector"], r["dataset"], r["group"]) == (detector, dataset, group)]
        entry = {"detector": detector, "dataset": dataset, "group": group, "n_seeds": len(rows)}
        for metric in ("auroc", "fpr95", "aupr_in", "aupr_out"):
            values = np.array([r[metric] for r in rows])
            entry[metric] = float(values.mean())
            entry[f"{metric}_std"] = float(values.std())
        out.append(entry)
    return out
