"""What the benchmark scripts share: where the data is, the CIFAR-10 bench loaders, percent metrics, markdown
tables and atomic result files.

Every script in ``benchmarks/`` runs from the repository root as ``PYTHONPATH=. python benchmarks/<script>.py``
(``PYTHONPATH=.`` makes ``benchmarks`` importable as a package, so a script reads this module as
``from benchmarks.common import ...``; ``python -m benchmarks.<script>`` is the same). Nothing here edits
``sys.path``.

**The data root** is one setting: ``$OODSCOPE_BENCH_DATA`` when it is set, else ``<repository>/../shared/data``
(the development machine's read-only copy). It holds ``cifar10-bench/`` (with ``models/``), ``adbench/``,
``magnetic-tile/`` and ``clinc150/``; :func:`data_path` names the variable when a folder is missing.
(``$OODSCOPE_DATA`` is a different setting: where ``oodscope bench cifar10`` builds its download.)

Metrics come from :mod:`oodscope.metrics`, in percent (:func:`percent_metrics`); result files are written with
:func:`oodscope.safeio.write_atomic` (:func:`write_json`), so a killed run never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "OODSCOPE_BENCH_DATA"
RESULTS = REPO / "benchmarks" / "results"
CIFAR_BENCH = "cifar10-bench"
MAGNETIC_TILE = "magnetic-tile"
OOD_SETS = ("near/cifar100", "near/tin", "far/mnist", "far/textures")  # the CIFAR-10 bench's OOD test sets
OOD_GROUPS = {"near": ("cifar100", "tin"), "far": ("mnist", "textures")}
LAYERS = ("relu", "layer1", "layer2", "layer3")  # the CIFAR ResNets' stem and stage outputs


# -- where the data is ----------------------------------------------------------------------------------------------
def data_root() -> Path:
    """``$OODSCOPE_BENCH_DATA``, else ``<repository>/../shared/data``."""
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else REPO.parent / "shared" / "data"


def data_path(*parts: str) -> Path:
    """``data_root() / parts``; raises ``FileNotFoundError`` naming the data root and how to set it."""
    path = data_root().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"benchmark data {path} does not exist; point ${DATA_ENV} at the folder that holds "
                                f"{parts[0]}/ (now {'$' + DATA_ENV if os.environ.get(DATA_ENV) else 'the default'} "
                                f"= {data_root()})")
    return path


def cifar_bench_dir() -> Path:
    """The CIFAR-10 bench folder (``benchmark.toml`` or OpenOOD-style ``.npz`` files, ``models/``)."""
    return data_path(CIFAR_BENCH)


def cifar_weights(model_name: str) -> Path:
    """The state dict of a zoo model of the CIFAR-10 bench, e.g. ``cifar10_resnet20``."""
    return data_path(CIFAR_BENCH, "models", f"{model_name}.pth")


def magnetic_tile_dir() -> Path:
    """The magnetic-tile defect data set in the MVTec AD folder layout."""
    return data_path(MAGNETIC_TILE)


# -- the CIFAR-10 bench ------------------------------------------------------------------------------------------------
def cifar_bench(check_overlap: bool = True):
    """The CIFAR-10 bench as an :class:`oodscope.data.benchmark.Benchmark`."""
    from oodscope.data.spec import load_benchmark_dir

    return load_benchmark_dir(cifar_bench_dir(), check_overlap=check_overlap)


def cifar_model(model_name: str = "cifar10_resnet20"):
    """``(model, preprocess)`` of a CIFAR zoo model with the bench's weights."""
    from oodscope.models.zoo import load_model

    return load_model(model_name, str(cifar_weights(model_name)))


def cifar_outputs(model_name: str = "cifar10_resnet20", cache_dir: str | None = None, bench=None, **options: Any):
    """``(outputs, model, preprocess)``: every split of the bench extracted once (read from the extraction cache
    afterwards), each :class:`~oodscope.Outputs` named after its split (``train``, ``near/cifar100``, ...).
    ``options`` go to :func:`oodscope.runner.extract_benchmark` (``layers=``, ``device=``, ...)."""
    from oodscope.runner import extract_benchmark

    bench = cifar_bench() if bench is None else bench
    model, preprocess = cifar_model(model_name)
    options.setdefault("progress", False)
    outputs = extract_benchmark(bench, model, preprocess, cache_dir=cache_dir, **options)
    for name, out in outputs.items():
        out.name = name
    return outputs, model, preprocess


def cifar_subset_outputs(model_name: str, model, preprocess, split: str, n: int, seed: int = 0,
                         layers: Sequence[str] = LAYERS, cache_dir: str | None = None):
    """Outputs (with ``layers`` and the model source) of a fixed random subset of ``n`` images of ``split``, cached
    under the name ``cifar10-sub<n>-<split>`` (``cifar10-r<depth>-sub...`` for other depths than 20)."""
    import oodscope

    data = cifar_bench(check_overlap=False).datasets()[split]
    index = np.sort(np.random.default_rng(seed).choice(len(data.inputs), min(n, len(data.inputs)), replace=False))
    depth = model_name.rsplit("resnet", 1)[-1]
    prefix = "cifar10" if depth == "20" else f"cifar10-r{depth}"
    out = oodscope.extract(model, (data.inputs[index], data.labels[index]),
                           name=f"{prefix}-sub{n}-{split.replace('/', '-')}", preprocess=preprocess,
                           layers=list(layers), cache_dir=cache_dir, progress=False)
    out.name = split
    return out


def subsample_outputs(out, n: int, seed: int, inputs: np.ndarray | None = None, **source: Any):
    """A fixed seeded subsample of ``n`` rows of ``out`` (``out`` itself when ``n`` is 0 or not smaller), keeping
    the model source on the same rows so that detectors that re-run the network (ODIN, AdaSCALE) still can.
    ``inputs``: the split's raw images, when ``out`` was read back without its source; ``source``: fields of the
    :class:`~oodscope.extraction.outputs.ModelSource` to change (``batch_size=250``, ``device="cpu"``)."""
    import dataclasses

    if not n or n >= len(out):
        return out
    pick = np.sort(np.random.default_rng(seed).permutation(len(out))[:n])
    sub = out.subset(pick)
    if out.source is not None:
        rows = (out.source.inputs if inputs is None else inputs)[pick]
        sub.source = dataclasses.replace(out.source, inputs=rows, **source)
    return sub


# -- metrics, in percent ---------------------------------------------------------------------------------------------
def percent_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """:func:`oodscope.metrics.ood_metrics` in percent: ``auroc``, ``fpr95``, ``aupr_in``, ``aupr_out``, ...
    (higher score = more OOD; FPR@95 with ID positive)."""
    from oodscope.metrics import ood_metrics

    return {key: 100.0 * float(value) for key, value in ood_metrics(id_scores, ood_scores).items()}


def auroc_fpr(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[float, float]:
    """``(AUROC, FPR@95)`` in percent."""
    from oodscope.metrics import auroc, fpr95

    return 100.0 * auroc(id_scores, ood_scores), 100.0 * fpr95(id_scores, ood_scores)


def group_means(cells: Mapping[str, tuple[float, ...]], groups: Mapping[str, Iterable[str]] | None = None
                ) -> dict[str, tuple[float, ...]]:
    """Per group (``near``/``far``), the element-wise mean of the cells of its sets; ``cells`` is keyed by
    ``group/set`` or by the bare set name."""
    groups = OOD_GROUPS if groups is None else groups
    means = {}
    for group, names in groups.items():
        rows = [cells[f"{group}/{n}"] if f"{group}/{n}" in cells else cells[n] for n in names]
        means[group] = tuple(float(v) for v in np.mean(np.asarray(rows, dtype=np.float64), axis=0))
    return means


# -- text ----------------------------------------------------------------------------------------------------------
def fmt_params(params: Mapping[str, Any]) -> str:
    """``a=1, b=0.5`` (floats with ``:g``), ``-`` for none."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "-"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], floats: str = ".2f") -> str:
    """A GitHub/MkDocs markdown table; float cells use ``floats``, ``None`` and NaN print as ``-``, a ``|`` in a
    cell is escaped. Every row must have one cell per header."""
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
            return "-"
        text = format(value, floats) if isinstance(value, (float, np.floating)) else str(value)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for number, row in enumerate(rows):
        row = list(row)
        if len(row) != len(headers):
            raise ValueError(f"markdown_table: row {number} has {len(row)} cells for {len(headers)} headers")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def pair(values: Sequence[float], spec: str = ".2f") -> str:
    """``"12.34 / 56.78"``: an AUROC / FPR@95 cell."""
    return " / ".join(format(float(v), spec) for v in values)


def parse_params(items: Iterable[str], nested: bool = False) -> dict[str, Any]:
    """``NAME=VALUE`` options (``DETECTOR.NAME=VALUE`` with ``nested``) -> a dict; values are read as JSON when
    they parse (``3``, ``0.1``, ``true``, ``[1, 2]``), else kept as text. A malformed item is a ``ValueError``."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if nested:
            detector, dot, name = key.partition(".")
            if not (sep and dot and detector and name):
                raise ValueError(f"--param {item!r}: expected DETECTOR.NAME=VALUE, e.g. patchcore.coreset_ratio=0.01")
            params.setdefault(detector, {})[name] = value
        else:
            if not (sep and key):
                raise ValueError(f"--param {item!r}: expected NAME=VALUE, e.g. steps=300")
            params[key] = value
    return params


def log(message: str) -> None:
    """``[HH:MM:SS] message``, flushed (long runs are followed from their log)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- result files --------------------------------------------------------------------------------------------------
def _plain(value: Any, where: str, bad: list[str]) -> Any:
    """``value`` as JSON data: numpy scalars and arrays become numbers and lists, paths strings, non-finite floats
    ``None`` (their places are collected in ``bad``)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}", bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", bad) for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where, bad)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(where)
        return None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"write_json: {where}: {type(value).__name__} is not JSON data")


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON at ``path``, atomically (:func:`oodscope.safeio.write_atomic`); the folder is
    created. numpy scalars and arrays become numbers and lists. NaN and infinity are not JSON: they are written
    as ``null`` with a warning that names where they were (a long run keeps its other results)."""
    import warnings

    from oodscope.safeio import write_atomic

    bad: list[str] = []
    document = _plain(data, "$", bad)
    if bad:
        warnings.warn(f"write_json {path}: {len(bad)} non-finite value(s) written as null, first at "
                      f"{', '.join(bad[:3])}", RuntimeWarning, stacklevel=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(document, indent=1, allow_nan=False) + "\n")
