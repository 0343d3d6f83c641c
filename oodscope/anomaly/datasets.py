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
from pathlib import Path

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
FILE_SUFFIXES = (".npz", ".csv", ".parquet")


def _checked(name: str, X: np.ndarray, y: np.ndarray, source: str) -> TabularDataset:
    """A data set from a file's ``X`` and ``y``, refusing what would give silent wrong numbers."""
    if X.dtype.kind not in "biuf":
        raise ValueError(f"{source}: X must be numeric, got dtype {X.dtype}")
    if X.ndim != 2 or len(X) == 0 or X.shape[1] == 0:
        raise ValueError(f"{source}: X must be a non-empty (rows, features) table, got shape {X.shape}")
    X = X.astype(np.float64)
    if not np.isfinite(X).all():
        raise ValueError(f"{source}: X has {int((~np.isfinite(X)).sum())} NaN/inf values; impute or drop them first")
    if y.shape != (len(X),):
        raise ValueError(f"{source}: need one label per row, got y of shape {y.shape} for {len(X)} rows")
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"{source}: labels must be 0 (normal) and 1 (anomaly), got {sorted(values)[:6]}")
    if values != {0, 1}:
        raise ValueError(f"{source}: needs both normal (0) and anomalous (1) rows to be scored, got only {values}")
    return TabularDataset(name, X, y.astype(np.int64))


def load_npz(path: str | Path) -> TabularDataset:
    """An ADBench-format ``.npz`` (arrays ``X`` and ``y``, 1 = anomaly), read with ``allow_pickle=False``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if not {"X", "y"} <= set(data.files):
                raise ValueError(f"{path}: an ADBench .npz holds arrays 'X' and 'y'; this one has {data.files}")
            X, y = data["X"], data["y"]
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise ValueError(f"{path}: not a plain numeric .npz (numpy reads it as pickled data, which oodscope "
                             "does not load); save X and y as numeric arrays with numpy.savez") from None
        raise
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npz file ({error})") from None
    return _checked(path.stem, X, y, str(path))


def load_table(path: str | Path, label_column: str = "y") -> TabularDataset:
    """A CSV or Parquet table: every column but ``label_column`` (0 normal, 1 anomaly) is a feature."""
    from ..data.user_data import numeric_features, read_table

    path = Path(path)
    frame = read_table(path)
    if label_column not in frame.columns:
        raise ValueError(f"{path}: no label column {label_column!r}; columns are {list(frame.columns)[:10]} "
                         "(choose one with --label-column)")
    return _checked(path.stem, numeric_features(frame.drop(columns=[label_column]), path),
                    frame[label_column].to_numpy(), str(path))


def load(name: str, label_column: str = "y") -> TabularDataset:
    """One data set: a built-in by name (``wdbc``, ``wine``) or a ``.npz``/``.csv``/``.parquet`` file."""
    key = name.lower()
    if key in DATASETS:
        return DATASETS[key]()
    path = Path(name)
    if path.suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        return load_npz(path) if path.suffix == ".npz" else load_table(path, label_column)
    raise ValueError(f"unknown ADBench dataset {name!r}; built in: {sorted(DATASETS)}, or a path to a "
                     f"{'/'.join(FILE_SUFFIXES)} file or a folder of them")


def load_all(names: str, label_column: str = "y") -> list[TabularDataset]:
    """The data sets of a comma-separated list of built-in names, files and folders (a folder: its
    ``.npz``/``.csv``/``.parquet`` files sorted by name). Two data sets with the same name are refused."""
    datasets = []
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        path = Path(name)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in FILE_SUFFIXES)
            if not files:
                raise ValueError(f"{path}: no {'/'.join(FILE_SUFFIXES)} files in this folder")
            datasets += [load(str(f), label_column) for f in files]
        else:
            datasets.append(load(name, label_column))
    names_seen = [d.name for d in datasets]
    twice = sorted({n for n in names_seen if names_seen.count(n) > 1})
    if twice:
        raise ValueError(f"data sets named twice: {twice}; rename the files")
    if not datasets:
        raise ValueError("no data sets given")
    return datasets
