"""A hostile-user sweep of bad inputs over every registered detector of every family.

Each case perturbs the tiny data of :mod:`detector_cases` in one way and classifies what the detector does:

* ``error``: a ``ValueError`` / ``FloatingPointError`` raised by oodscope itself (the message names the input);
* ``warned``: finite scores and a warning issued from oodscope code (a documented warning);
* ``ranked``: finite, non-constant scores that rank the planted outliers (the last rows) about as well as with the
  clean training data (AUROC at most :data:`TOLERANCE` lower);
* ``unchanged``: degenerate training data given to a detector that does not learn from it (the same scores as
  with the normal training data);
* ``silent``: finite scores without a warning that are constant or do not rank the planted outlier, or that were
  accepted where the input is invalid (the worst outcome);
* ``crash``: any other exception, or an error raised from inside numpy / scipy / torch / scikit-learn.

``python tests/bad_input_sweep.py`` prints the table by class; ``tests/test_bad_inputs.py`` asserts on it.
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from dataclasses import replace
from typing import Any, Callable

import numpy as np

import oodscope
from detector_cases import N_OUTLIERS, case, detector_names
from oodscope.detectors import get
from oodscope.extraction.outputs import Head, Need, Outputs

INVALID = "invalid"  # the input is wrong: only an error is right
ODD = "odd"  # legal but degenerate: an error, a warning or a correct ranking are right


def _copy(data: Any) -> Any:
    if isinstance(data, Outputs):
        out = Outputs(logits=None if data.logits is None else data.logits.copy(),
                      features=None if data.features is None else data.features.copy(),
                      labels=None if data.labels is None else data.labels.copy(),
                      layers={k: v.copy() for k, v in data.layers.items()},
                      head=data.head, name=data.name, source=data.source)
        return out
    return np.array(data, copy=True)


def _main_arrays(data: Any, detector: Any) -> dict[str, np.ndarray]:
    """The given arrays a detector reads (``Detector._arrays``, less the raw inputs of a re-run): views into ``data``."""
    if not isinstance(data, Outputs):
        return {"input": data}
    try:
        arrays = detector._arrays(data)
    except ValueError:
        return {}
    return {k: v for k, v in arrays.items() if not k.startswith("raw inputs")}


def _poke(value: float, row: int = 0) -> Callable:
    def perturb(data, detector, part):
        data = _copy(data)
        array = _main_arrays(data, detector)[part]
        if array.dtype.kind not in "f":
            return None
        array.reshape(len(array), -1)[row, 0] = value
        return data
    return perturb


def _rows(index_of: Callable[[int], np.ndarray]) -> Callable:
    def perturb(data, detector, part=None):
        index = index_of(len(data))
        if isinstance(data, Outputs):
            out = data.subset(index)
            out.source = None if data.source is None else _sub_source(data.source, index)
            return out
        return np.asarray(data)[index]
    return perturb


def _sub_source(source, index):
    inputs = source.inputs
    if isinstance(inputs, tuple):
        inputs = tuple(np.asarray(a)[index] for a in inputs)
    else:
        inputs = np.asarray(inputs)[index]
    return replace(source, inputs=inputs)


def _reshaped(change: Callable[[np.ndarray], np.ndarray], logits: bool = True) -> Callable:
    """Apply ``change`` to every array the detector reads (no case where it reads none of the given arrays)."""
    def perturb(data, detector, part=None):
        if not isinstance(data, Outputs):
            array = np.asarray(data)
            return None if array.dtype.kind in "USO" else change(array)  # class names have no shape to change
        data = _copy(data)
        read = {k: v for k, v in _main_arrays(data, detector).items() if logits or k != "logits"}
        if not read:
            return None
        for name in ("logits", "features"):
            if name in read:
                setattr(data, name, change(getattr(data, name)))
        data.layers = {k: change(v) if f"layer {k!r}" in read else v for k, v in data.layers.items()}
        return data
    return perturb


def _constant_last_column(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    flat = a.reshape(len(a), -1)
    flat[:, -1] = 0.0  # the last column carries no class information in the test data: now constant
    return a


def _duplicated_column(a: np.ndarray) -> np.ndarray:
    if a.ndim != 2:
        return a
    a = a.copy()
    a[:, -1] = a[:, -2]  # rank-deficient: the last column repeats the one before it
    return a


# features, layers and tabular rows only: every logit column carries a class, so it cannot degenerate harmlessly
_constant_column = _reshaped(_constant_last_column, logits=False)
_rank_deficient = _reshaped(_duplicated_column, logits=False)
_one_d = _reshaped(lambda a: a.reshape(len(a), -1)[:, 0].copy())
_wider = _reshaped(lambda a: np.concatenate([a, a[:, :1]], axis=1))


def _channels(data, detector, part=None):
    array = np.asarray(data)
    if array.ndim != 4:
        return None
    return np.concatenate([array, array[:, :1]], axis=1)  # 4 channels instead of 3 / 2 instead of 1


def _scaled_range(data, detector, part=None):
    array = np.asarray(data)
    if array.ndim != 4 or array.dtype.kind != "f":
        return None
    return array * 255.0  # 0..255 floats where [0, 1] is documented


def _bad_label(data, detector, part=None):
    if not isinstance(data, Outputs) or data.labels is None or Need.LABELS not in type(detector).needs:
        return None
    data = _copy(data)
    data.labels[0] = 9 if data.head is None else data.head.n_classes + 5
    return data


def _nan_head(data, detector, part=None):
    if not isinstance(data, Outputs) or data.head is None or Need.HEAD not in type(detector).needs:
        return None
    data = _copy(data)
    W = data.head.W.copy()
    W[0, 0] = np.nan
    data.head = Head(W, data.head.b)
    if data.source is not None:  # a re-run reads its own head; this case is about the given head
        return None
    return data


def _nan_source(data, detector, part=None):
    if not isinstance(data, Outputs) or data.source is None or Need.MODEL not in type(detector).needs:
        return None
    inputs = data.source.inputs
    x = inputs[0] if isinstance(inputs, tuple) else inputs
    if np.asarray(x).dtype.kind not in "fu":
        return None
    x = np.asarray(x, dtype=np.float32) / (255.0 if np.asarray(x).dtype.kind == "u" else 1.0)
    x = x.copy()
    x.reshape(len(x), -1)[0, 0] = np.nan
    data = _copy(data)
    data.source = replace(data.source, inputs=(x,) + tuple(inputs[1:]) if isinstance(inputs, tuple) else x)
    return data


def _saturate(data, detector, part=None):
    """The planted outlier rows multiplied by 1e30 (arrays the detector reads, or the raw inputs)."""
    data = _copy(data)
    rows = slice(len(data) - N_OUTLIERS, None)
    if isinstance(data, Outputs):
        if data.source is not None and Need.MODEL in type(detector).needs:
            return None  # the network re-runs on the raw inputs: not a saturation of given outputs
        for array in _main_arrays(data, detector).values():
            array[rows] *= 1e30
        return data
    data[rows] *= 1e30
    return data


# (case name, phase, perturbation, kind, per-part?)
CASES = [
    ("nan at fit", "fit", _poke(np.nan), INVALID, True),
    ("inf at fit", "fit", _poke(np.inf), INVALID, True),
    ("nan at score", "score", _poke(np.nan), INVALID, True),
    ("inf at score", "score", _poke(-np.inf), INVALID, True),
    ("nan in head", "fit", _nan_head, INVALID, False),
    ("nan in raw inputs at fit", "fit", _nan_source, INVALID, False),
    ("nan in raw inputs at score", "score", _nan_source, INVALID, False),
    ("empty train", "fit", _rows(lambda n: np.arange(0)), INVALID, False),
    ("empty test", "score", _rows(lambda n: np.arange(0)), INVALID, False),
    ("1-d train", "fit", _one_d, INVALID, False),
    ("1-d test", "score", _one_d, INVALID, False),
    ("extra column at score", "score", _wider, INVALID, False),
    ("extra channel at score", "score", _channels, INVALID, False),
    ("0..255 floats at fit", "fit", _scaled_range, INVALID, False),
    ("label out of range", "fit", _bad_label, INVALID, False),
    ("one training row", "fit", _rows(lambda n: np.zeros(1, dtype=int)), ODD, False),
    ("identical training rows", "fit", _rows(lambda n: np.zeros(n, dtype=int)), ODD, False),
    ("constant training column", "fit+inliers", _constant_column, ODD, False),
    ("rank-deficient training data", "fit+inliers", _rank_deficient, ODD, False),
    ("outliers x 1e30", "score", _saturate, ODD, False),
]


def _raised_by_oodscope(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "/oodscope/" in frames[-1].filename.replace("\\", "/")


def _keep_outliers(changed: Any, original: Any) -> Any:
    if changed is None:
        return None
    rows = slice(len(original) - N_OUTLIERS, None)
    if isinstance(original, Outputs):
        for name in ("logits", "features"):
            if getattr(changed, name) is not None:
                getattr(changed, name)[rows] = getattr(original, name)[rows]
        for k, v in changed.layers.items():
            v[rows] = original.layers[k][rows]
        return changed
    changed[rows] = np.asarray(original)[rows]
    return changed


def classify(name: str, case_name: str, phase: str, perturb: Callable, kind: str, part: str | None) -> str | None:
    """The outcome class of one case, or ``None`` when the case does not apply to this detector."""
    c = case(name)
    train, test = c.train, c.test
    try:
        if phase.startswith("fit"):
            train = perturb(train, c.detector, part)
        if phase == "fit+inliers":  # the test inliers share the degenerate structure; the planted outliers do not
            test = _keep_outliers(perturb(test, c.detector, part), test)
        elif phase == "score":
            test = perturb(test, c.detector, part)
    except Exception:  # noqa: BLE001 - the perturbation cannot be built for this input kind
        return None
    if train is None or test is None:
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            c.detector.fit(train)
            scores = c.detector.score(test)
        except (ValueError, FloatingPointError) as error:
            if "needs the" in str(error) and "package" in str(error):
                return None  # an optional package is missing
            return "error" if _raised_by_oodscope(error) else "crash"
        except Exception:  # noqa: BLE001 - any other exception is a crash by definition
            return "crash"
    warned = any(w.category.__module__.startswith("oodscope") or str(w.message).startswith(f"{name}:")
                 for w in caught)
    if kind == INVALID:
        return "warned" if warned else "silent"  # accepted an invalid input
    normal = _normal_scores(name)
    if phase.startswith("fit") and np.array_equal(scores, normal):
        return "unchanged"  # the detector does not learn from the training data (stateless): nothing degenerates
    if np.ptp(scores) > 0 and _auroc(scores) >= min(_auroc(normal), 1.0) - TOLERANCE:
        return "ranked"
    return "warned" if warned else "silent"


TOLERANCE = 0.1  # a degenerate input may cost this much AUROC of the planted outliers, no more


def _auroc(scores: np.ndarray) -> float:
    """AUROC of the planted outliers (the last rows) against the other rows, ties counted half."""
    inliers, outliers = scores[:-N_OUTLIERS], scores[-N_OUTLIERS:]
    return float(((outliers[:, None] > inliers[None]).mean() + 0.5 * (outliers[:, None] == inliers[None]).mean()))


def _normal_scores(name: str) -> np.ndarray:
    c = case(name)
    return c.detector.fit(c.train).score(c.test)


def run(names: list[str] | None = None) -> list[dict[str, Any]]:
    """One record per (detector, case, part) that applies."""
    records = []
    for name in names or detector_names():
        probe = case(name)
        for case_name, phase, perturb, kind, per_part in CASES:
            data = probe.train if phase == "fit" else probe.test
            parts = list(_main_arrays(data, probe.detector)) if per_part else [None]
            for part in parts:
                outcome = classify(name, case_name, phase, perturb, kind, part)
                if outcome is not None:
                    label = case_name if part is None else f"{case_name} ({part.split()[0]})"
                    records.append({"detector": name, "case": label, "outcome": outcome})
    return records


def summary(records: list[dict[str, Any]]) -> str:
    outcomes = ("error", "warned", "ranked", "unchanged", "silent", "crash")
    by_case: dict[str, Counter] = {}
    for r in records:
        by_case.setdefault(r["case"], Counter())[r["outcome"]] += 1
    width = max(len(k) for k in by_case) + 2
    lines = [f"{'case':<{width}}{'tried':>6}" + "".join(f"{o:>10}" for o in outcomes)]
    for key, counts in by_case.items():
        lines.append(f"{key:<{width}}{sum(counts.values()):>6}" + "".join(f"{counts[o]:>10}" for o in outcomes))
    total = Counter(r["outcome"] for r in records)
    lines.append(f"{'all':<{width}}{len(records):>6}" + "".join(f"{total[o]:>10}" for o in outcomes))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    results = run(sys.argv[1:] or None)
    print(summary(results))
    for r in results:
        if r["outcome"] in ("silent", "crash"):
            print(f"{r['outcome']:>7}  {r['detector']:<22}{r['case']}")
