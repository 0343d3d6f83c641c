"""A user's data from one path (``--train``, ``--val``, ``--data``), with an id per row for the scores file.

* a folder of images: class sub-folders (labels by sorted folder name, as torchvision's ``ImageFolder``) or images
  directly inside (no labels); ids are the paths relative to the folder;
* an OpenOOD v1.5 image list (``.txt``: ``relative/path label`` per line, relative to ``--image-root``, default the
  list's folder); ids are the listed paths;
* ``.npz``: ``images`` (uint8 ``N x H x W x 3``) or ``X`` (rows x features), with optional ``labels`` / ``y``;
  read with ``allow_pickle=False``; ids are row numbers;
* ``.npy``: one array (images or rows), no labels;
* ``.csv`` / ``.parquet``: a table; ``label_column`` (if given) holds integer class labels, every other column is
  a numeric feature; ``id_column`` (if given) names the ids, else row numbers.

Images read from files are RGB, resized (shorter side) and center-cropped to ``image_size`` when given
(:func:`oodscope.data.spec.read_image`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .spec import _stack, image_folder_files


@dataclass
class UserData:
    """Model inputs, integer labels (or ``None``) and one id per row; ``kind`` is ``images`` or ``table``."""

    inputs: np.ndarray
    labels: np.ndarray | None
    ids: list[str]
    kind: str

    def __len__(self) -> int:
        return len(self.inputs)


def _labels(values, n: int, where: str) -> np.ndarray | None:
    if values is None:
        return None
    labels = np.asarray(values)
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise ValueError(f"{where}: labels must be {n} integers, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def _kind(inputs: np.ndarray, where: str) -> str:
    if inputs.ndim == 4 and inputs.shape[3] in (1, 3) and inputs.dtype == np.uint8:
        return "images"
    if inputs.ndim == 2 and inputs.dtype.kind in "biuf":
        if inputs.dtype.kind == "f" and not np.isfinite(inputs).all():
            raise ValueError(f"{where}: {int((~np.isfinite(inputs)).sum())} NaN/inf values")
        return "table"
    raise ValueError(f"{where}: expected uint8 images (N, H, W, 3) or numeric rows (N, D), got {inputs.dtype} "
                     f"{inputs.shape}")


def image_folder(folder: Path, image_size: int | None) -> UserData:
    paths, labels = image_folder_files(folder)
    images = _stack(paths, image_size, f"image folder {folder}")
    return UserData(images, labels, [str(p.relative_to(folder)) for p in paths], "images")


def image_list(path: Path, root: Path, image_size: int | None) -> UserData:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{path}, line {number}: expected 'relative/path label', got {line!r}")
            entries.append((parts[0], int(parts[1])))
    missing = [name for name, _ in entries if not (root / name).exists()]
    if missing:
        raise ValueError(f"{path}: {len(missing)} listed images do not exist under {root}, e.g. {missing[0]} "
                         "(set --image-root)")
    images = _stack([root / name for name, _ in entries], image_size, f"image list {path}")
    labels = np.asarray([label for _, label in entries], np.int64)
    return UserData(images, None if (labels < 0).all() else labels, [name for name, _ in entries], "images")


def array_file(path: Path) -> UserData:
    from ..safeio import load_npz

    if path.suffix == ".npy":
        try:
            inputs = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(f"{path}: not a plain numeric .npy file ({error})") from None
        labels = None
    else:
        arrays = load_npz(path)
        key = "images" if "images" in arrays else "X" if "X" in arrays else None
        if key is None:
            raise ValueError(f"{path}: an .npz needs an 'images' or 'X' array; it has {sorted(arrays)}")
        inputs = arrays[key]
        labels = _labels(arrays.get("labels", arrays.get("y")), len(inputs), str(path))
    return UserData(inputs, labels, [str(i) for i in range(len(inputs))], _kind(inputs, str(path)))


def read_table(path: Path):
    """A CSV or Parquet file as a pandas DataFrame; a clear error naming the file otherwise."""
    import pandas as pd

    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except ImportError as error:
        raise ImportError(f"reading Parquet needs pyarrow: pip install pyarrow ({error})") from None
    except Exception as error:  # noqa: BLE001 - pandas raises many types for a bad file; name the file
        raise ValueError(f"{path}: cannot read as {path.suffix[1:]} ({type(error).__name__}: {error})") from None


def numeric_features(frame, path: Path) -> np.ndarray:
    """Every column of ``frame`` as float64 features; non-numeric columns are an error."""
    text = [c for c in frame.columns if frame[c].dtype.kind not in "biuf"]
    if text:
        raise ValueError(f"{path}: non-numeric feature columns {text[:5]}; encode them, or name the label / id "
                         "column (--label-column, --id-column)")
    return frame.to_numpy(dtype=np.float64)


def table_file(path: Path, label_column: str | None, id_column: str | None,
               ignore_columns: tuple[str, ...] = ()) -> UserData:
    frame = read_table(path)
    for column in (label_column, id_column):
        if column is not None and column not in frame.columns:
            raise ValueError(f"{path}: no column {column!r}; columns are {list(frame.columns)[:10]}")
    ids = [str(v) for v in frame[id_column]] if id_column else [str(i) for i in range(len(frame))]
    labels = None
    if label_column is not None:
        labels = _labels(frame[label_column].to_numpy(), len(frame), f"{path} column {label_column!r}")
    drop = list(dict.fromkeys(c for c in (label_column, id_column, *ignore_columns)
                              if c is not None and c in frame.columns))
    inputs = numeric_features(frame.drop(columns=drop), path)
    _kind(inputs, str(path))
    return UserData(inputs, labels, ids, "table")


def load(path: str | Path, *, image_size: int | None = None, label_column: str | None = None,
         id_column: str | None = None, image_root: str | Path | None = None,
         ignore_columns: tuple[str, ...] = ()) -> UserData:
    """The data at ``path`` (see the module docstring); a clear error for anything else. ``ignore_columns``
    of a table are dropped when present (``oodscope score`` drops the label column ``fit`` used)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        data = image_folder(path, image_size)
    elif path.suffix == ".txt":
        data = image_list(path, Path(image_root) if image_root else path.parent, image_size)
    elif path.suffix in (".npz", ".npy"):
        data = array_file(path)
    elif path.suffix in (".csv", ".parquet"):
        data = table_file(path, label_column, id_column, ignore_columns)
    else:
        raise ValueError(f"{path}: expected an image folder, an image list (.txt), .npz, .npy, .csv or .parquet")
    if len(data) == 0:
        raise ValueError(f"{path}: no rows")
    return data
