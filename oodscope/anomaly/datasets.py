"""ADBench tabular data sets that are exact subsets of scikit-learn's bundled data (no download).

Han et al., "ADBench: Anomaly Detection Benchmark", NeurIPS 2022 (Datasets and Benchmarks), Table D1:

* ``wdbc`` (Wisconsin diagnostic breast cancer): all 357 benign rows of :func:`sklearn.datasets.load_breast_cancer`
  plus the 10 malignant rows with indices ``WDBC_ANOMALY_ROWS`` -> 367 x 30, 10 anomalies (2.72 %).
* ``wine``: all rows of classes 1 and 2 of :func:`sklearn.datasets.load_wine` plus the 10 class-0 rows with
  indices ``WINE_ANOMALY_ROWS`` -> 129 x 13, 10 anomalies (7.75 %).

Rows keep scikit-learn's order; ``y`` is 1 for an anomaly and 0 for a normal row. ADBench's own files
(``Classical/43_WDBC.npz``, ``45_wine.npz``) hold the same rows in another order: the 10 anomalies first, in the order
``ADBENCH_ANOMALY_ORDER``, then the normal rows in scikit-learn's order (checked row by row against the files of
github.com/Minqi824/ADBench); :func:`adbench_order` gives that order, which the ``adbench`` protocol needs to draw
ADBench's exact splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WDBC_ANOMALY_ROWS = (28, 33, 95, 117, 230, 323, 370, 498, 516, 564)
WINE_ANOMALY_ROWS = (5, 7, 9, 16, 32, 37, 48, 53, 56, 57)
# the same anomaly rows (scikit-learn indices) in the order of ADBench's .npz files
ADBENCH_ANOMALY_ORDER = {"wdbc": (28, 117, 230, 95, 370, 323, 516, 498, 33, 564),
                         "wine": (57, 16, 32, 7, 56, 48, 9, 37, 5, 53)}


@dataclass(frozen=True)
class TabularDataset:
    """A tabular anomaly-detection data set: ``X`` (samples x features, float64) and ``y`` (1 = anomaly)."""

    name: str
    X: np.ndarray
    y: np.ndarray
    source_rows: np.ndarray | None = None  # row index in the source data set (scikit-learn's), when known

    def __post_init__(self) -> None:
        if self.X.ndim != 2 or self.y.shape != (len(self.X),):
            raise ValueError(f"dataset {self.name!r}: X must be (n, d) and y (n,), got {self.X.shape}, {self.y.shape}")
        if not set(np.unique(self.y)) <= {0, 1}:
            raise ValueError(f"dataset {self.name!r}: y must hold 0 (normal) and 1 (anomaly)")

    @property
    def n_anomalies(self) -> int:
        return int(self.y.sum())


def _subset(name: str, X: np.ndarray, keep: np.ndarray, anomaly_rows: tuple[int, ...]) -> TabularDataset:
    anomalies = np.zeros(len(X), dtype=bool)
    anomalies[list(anomaly_rows)] = True
    rows = np.flatnonzero(keep | anomalies)
    return TabularDataset(name, np.asarray(X[rows], dtype=np.float64), anomalies[rows].astype(np.int64), rows)


def adbench_order(data: TabularDataset) -> np.ndarray:
    """Row permutation putting ``data`` in the order of ADBench's file (identity for other data sets)."""
    order = ADBENCH_ANOMALY_ORDER.get(data.name)
    if order is None or data.source_rows is None:
        return np.arange(len(data.y))
    position = {int(row): i for i, row in enumerate(data.source_rows)}
    first = np.array([position[row] for row in order])
    return np.concatenate([first, np.flatnonzero(data.y == 0)])


def load_wdbc() -> TabularDataset:
    """ADBench ``WDBC``: benign rows (target 1) + 10 malignant rows (target 0) of ``load_breast_cancer``."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    if np.any(data.target[list(WDBC_ANOMALY_ROWS)] != 0):
        raise RuntimeError("load_breast_cancer changed: the ADBench WDBC anomaly rows are no longer malignant")
    return _subset("wdbc", data.data, data.target == 1, WDBC_ANOMALY_ROWS)


def load_wine() -> TabularDataset:
    """ADBench ``wine``: classes 1 and 2 of ``load_wine`` + 10 class-0 rows as anomalies."""
    from sklearn.datasets import load_wine as sklearn_wine

    data = sklearn_wine()
    if np.any(data.target[list(WINE_ANOMALY_ROWS)] != 0):
        raise RuntimeError("load_wine changed: the ADBench wine anomaly rows are no longer class 0")
    return _subset("wine", data.data, data.target != 0, WINE_ANOMALY_ROWS)


DATASETS = {"wdbc": load_wdbc, "wine": load_wine}


def load(name: str) -> TabularDataset:
    """A built-in ADBench data set by name (``wdbc`` or ``wine``)."""
    key = name.lower()
    if key not in DATASETS:
        raise ValueError(f"unknown ADBench dataset {name!r}; built in: {sorted(DATASETS)}")
    return DATASETS[key]()
