"""One results file for every command: ``results.json`` (schema, run metadata, records) + ``results.csv``, and
one aligned text-table formatter.

``oodscope bench``, ``oodscope ad`` and ``oodscope adbench`` (and :meth:`oodscope.evaluation.Results.write`) all
write through :func:`write_results`::

    {"schema": "oodscope-results", "schema_version": 1,
     "meta": {"command": ..., "command_line": ..., "date_utc": ..., "platform": ..., "versions": {...},
              ... whatever the command passes: benchmark, model, weights_sha256, data_sha256, detectors
              ({label: parameters}), timings (seconds), notes ...},
     "records": [{"detector": ..., "dataset": ..., "group": ..., "auroc": ..., ...}, ...],
     ... further tables under their own keys (adbench: "seeds", "summary", "contamination") ...}

Further tables go into the same ``results.json`` (never into separate ad-hoc files); ``results.csv`` holds the
``records`` only: the standard columns (``detector, dataset, group`` and the metrics) first, then every other key in
first-seen order. Both files are written atomically (a temporary file in the same folder, then ``os.replace``) and
are strict JSON: numpy scalars and arrays become plain numbers and lists, NaN and infinities become ``null``
(empty cells in the CSV). :func:`read_results` checks the schema and its version.

:func:`format_table` is the one text-table formatter of the command line (bench's leaderboard, ad's table,
adbench's tables); missing values (``None``, NaN) print as ``-``.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import math
import platform
import shlex
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .evaluation import RECORD_KEYS as STANDARD_COLUMNS  # detector, dataset, group, auroc, fpr95, aupr_in, aupr_out
from .safeio import write_atomic  # UTF-8 bytes as given: the CSV writer's own line ends are kept

SCHEMA = "oodscope-results"
SCHEMA_VERSION = 1
RESERVED_KEYS = ("schema", "schema_version", "meta", "records")
# distributions whose versions go into the metadata (those not installed are left out, oodscope never)
PACKAGES = ("oodscope", "numpy", "scipy", "scikit-learn", "torch", "torchvision", "pyod", "faiss-cpu", "faiss-gpu",
            "faiss", "matplotlib")


# -- JSON-safe values ---------------------------------------------------------------------------------------------
def to_json(value: Any, default: Callable[[Any], Any] = repr) -> Any:
    """``value`` as plain JSON data: numpy scalars/arrays -> numbers/lists, NaN/inf -> ``None``, tuples -> lists,
    paths -> strings, mapping keys -> strings; anything else through ``default`` (its ``repr``)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return to_json(value.tolist(), default)
    if isinstance(value, Mapping):
        return {str(k): to_json(v, default) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v, default) for v in value]
    if isinstance(value, (set, frozenset)):
        return [to_json(v, default) for v in sorted(value, key=repr)]
    if isinstance(value, Path):
        return str(value)
    return default(value)


def _param_value(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.size > 64:
        return f"array(shape={value.shape}, dtype={value.dtype}, sha256={digest_array(value)[:16]})"
    return to_json(value)


def detector_parameters(detectors: Mapping[str, Any] | Iterable[Any]) -> dict[str, dict[str, Any]]:
    """``{label: parameters}``: each detector's ``get_params(deep=False)``, JSON-safe (other values as their repr).
    A mapping is keyed as given; a list by :attr:`Detector.label`."""
    items = detectors.items() if isinstance(detectors, Mapping) else ((d.label, d) for d in detectors)
    return {str(label): {k: _param_value(v) for k, v in det.get_params(deep=False).items()} for label, det in items}


# -- hashes and versions ------------------------------------------------------------------------------------------
def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def digest_array(values: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (the extraction cache's digest)."""
    from .extraction.cache import digest_array as digest

    return digest(values)


def array_description(values: np.ndarray) -> str:
    """``"<sha256 prefix> (n x shape)"``: the first 16 hex digits of :func:`digest_array` and the array's size."""
    values = np.asarray(values)
    shape = "x".join(map(str, values.shape[1:]))
    size = f"{len(values)} x {shape}" if shape else f"{len(values)}"
    return f"{digest_array(values)[:16]} ({size})"


def data_hashes(bench: Any) -> dict[str, str]:
    """A benchmark's data: :func:`array_description` of each split's input array, by dataset name."""
    hashes = {}
    for name, split in bench.datasets().items():
        source = f"{bench.sources[name]}: " if name in getattr(bench, "sources", {}) else ""
        if isinstance(split.inputs, np.ndarray):
            hashes[name] = source + array_description(split.inputs)
        else:
            hashes[name] = f"{source}({len(split)} samples, not an array)"
    return hashes


def weights_description(model_name: str, weights: str | None, model: Any) -> dict[str, str]:
    """``model``, ``weights``, ``weights_sha256`` (of the file, or the checked release prefix) and
    ``state_dict_sha256`` (prefix) of a network."""
    info = {"model": model_name or type(model).__name__}
    if weights:
        info["weights"] = str(weights)
        info["weights_sha256"] = file_sha256(weights)
    else:
        from .models.cifar_resnet import RELEASE, RELEASE_SHA256_PREFIX

        if model_name in RELEASE_SHA256_PREFIX:
            info["weights"] = RELEASE.format(name=model_name, sha=RELEASE_SHA256_PREFIX[model_name])
            info["weights_sha256"] = f"{RELEASE_SHA256_PREFIX[model_name]}... (release prefix, checked)"
    try:
        from .extraction.extract import model_digest

        info["state_dict_sha256"] = model_digest(model)[:16]
    except Exception:  # noqa: BLE001 - a model without a state dict still gets its metadata
        pass
    return info


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Python's version and each installed distribution's (read from its metadata: nothing is imported)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            if name == "oodscope":
                from . import __version__

                versions[name] = __version__
    return versions


def command_line(argv: Sequence[str] | None = None) -> str:
    """``oodscope`` plus the arguments (``sys.argv[1:]`` when not given), shell-quoted."""
    argv = sys.argv[1:] if argv is None else argv
    return shlex.join(["oodscope", *map(str, argv)])


def run_metadata(command: str, *, argv: Sequence[str] | None = None, detectors: Any = None,
                 timings: Mapping[str, float] | None = None, **parts: Any) -> dict[str, Any]:
    """Run metadata: the command, its command line (``argv``; default ``sys.argv``), UTC time, platform and
    package versions, then ``detectors`` (``{label: parameters}``, see :func:`detector_parameters`), ``timings``
    (seconds, rounded to ms) and every other part as given (JSON-safe; ``None`` parts are left out)."""
    meta: dict[str, Any] = {"command": command, "command_line": command_line(argv),
                            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                            "platform": platform.platform(), "versions": package_versions()}
    meta.update({key: to_json(value) for key, value in parts.items() if value is not None})
    if detectors is not None:
        meta["detectors"] = detector_parameters(detectors)
    if timings is not None:
        meta["timings"] = {str(k): round(float(v), 3) for k, v in timings.items()}
    return meta


# -- results.json / results.csv -----------------------------------------------------------------------------------
def csv_columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The standard columns, then every other key in first-seen order."""
    return list(STANDARD_COLUMNS) + list(dict.fromkeys(k for r in records for k in r if k not in STANDARD_COLUMNS))


def write_results(out_dir: str | Path, records: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], *,
                  name: str = "results", extra: Mapping[str, Sequence | Mapping] | None = None) -> dict[str, Path]:
    """Write ``<name>.json`` (schema, ``meta``, ``records`` and each ``extra`` table under its key) and
    ``<name>.csv`` (the records), atomically; returns ``{"json": path, "csv": path}``."""
    extra = dict(extra or {})
    clash = set(extra) & set(RESERVED_KEYS)
    if clash:
        raise ValueError(f"write_results: extra tables may not be named {sorted(clash)} (reserved keys)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [to_json(dict(r)) for r in records]
    document = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "meta": to_json(dict(meta)), "records": rows,
                **{str(k): to_json(v) for k, v in extra.items()}}
    paths = {"json": out / f"{name}.json", "csv": out / f"{name}.csv"}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(rows), restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(paths["json"], json.dumps(document, indent=1, allow_nan=False) + "\n")
    write_atomic(paths["csv"], buffer.getvalue())
    return paths


def read_results(path: str | Path, table: str = "records") -> tuple[dict[str, Any], list | dict]:
    """``(meta, rows)`` of a ``results.json`` written by :func:`write_results` (``table``: ``records`` or the
    name of an extra table, e.g. adbench's ``seeds``). A file of another schema or version is refused."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list):
        raise ValueError(f"{path}: a bare JSON list of records, the results.json of oodscope before the "
                         f"{SCHEMA!r} schema; re-run the command to rewrite it, or read the list with json.load")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: not an oodscope results file (schema {found!r}, expected {SCHEMA!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: {SCHEMA} schema version {data.get('schema_version')!r}; this oodscope reads "
                         f"version {SCHEMA_VERSION}")
    if table in ("schema", "schema_version", "meta") or table not in data:
        tables = [k for k in data if k not in ("schema", "schema_version", "meta")]
        raise ValueError(f"{path}: no table {table!r}; it holds {tables}")
    return data["meta"], data[table]


# -- text tables --------------------------------------------------------------------------------------------------
def is_missing(value: Any) -> bool:
    """``None`` or a float NaN."""
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def mean_std(spec: str = ".2f") -> Callable[[Any], str]:
    """A cell format for a ``(mean, std)`` pair: ``"12.34 ± 0.56"`` (``-`` for a missing part)."""
    def cell(pair: Any) -> str:
        mean, std = pair
        return " ± ".join("-" if is_missing(v) else format(v, spec) for v in (mean, std))

    return cell


def format_table(records: Iterable[Mapping[str, Any]], columns: Sequence[tuple], *,
                 key_order: Callable[[Mapping[str, Any]], Any] | None = None, gap: int = 2) -> str:
    """An aligned text table, one row per record.

    ``columns``: ``(header, key, format)`` or ``(header, key, format, align)`` tuples. ``key`` is a record key or a
    callable ``record -> value``; ``format`` a format spec (``".2f"``) or a callable ``value -> str`` (``""``: str);
    ``align`` ``"<"`` or ``">"`` (default: right for a format spec or non-string values, else left). A header may hold
    ``"\\n"`` for a header of several lines. Missing values (``None``, NaN) print as ``-``. ``key_order``: a sort
    key over the records (default: the order given).
    """
    rows = list(records)
    if key_order is not None:
        rows = sorted(rows, key=key_order)
    headers, cells, aligns = [], [], []
    for column in columns:
        header, key, fmt = column[:3]
        values = [key(r) if callable(key) else r.get(key) for r in rows]
        texts = ["-" if is_missing(v) else fmt(v) if callable(fmt) else format(v, fmt) for v in values]
        present = [v for v in values if not is_missing(v)]
        align = column[3] if len(column) > 3 else (
            ">" if (isinstance(fmt, str) and fmt) or not all(isinstance(v, str) for v in present) else "<")
        headers.append(str(header).split("\n"))
        cells.append(texts)
        aligns.append(align)
    height = max((len(h) for h in headers), default=1)
    headers = [[""] * (height - len(h)) + h for h in headers]
    widths = [max(len(t) for t in [*h, *c]) for h, c in zip(headers, cells)]
    sep = " " * gap
    lines = [sep.join(format(h[i], f"{a}{w}") for h, a, w in zip(headers, aligns, widths)).rstrip()
             for i in range(height)]
    lines += [sep.join(format(c[i], f"{a}{w}") for c, a, w in zip(cells, aligns, widths)).rstrip()
              for i in range(len(rows))]
    return "\n".join(lines)
