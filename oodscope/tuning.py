"""Hyperparameter tuning on validation sets, from cached outputs.

``tune(name, grid, id_val, ood_val)`` fits one detector per grid setting and keeps the setting with the best mean
AUROC over the OOD validation sets (the CIFAR benchmark has ``val`` as ID and ``ood_val/tin`` as OOD validation).
Everything is computed from :class:`~oodscope.extraction.outputs.Outputs`, so the network runs again only for
detectors that must (``Need.MODEL``, e.g. ODIN's perturbation); settings that need no re-run (ODIN with
``epsilon=0``) use the cached logits.

Fitting data: detectors are fitted on ``train`` (the ID training outputs). Detectors that learn nothing accept any
data; if ``train`` is omitted they are fitted on ``id_val`` itself, which is only sound for such stateless
detectors, so pass ``train=`` whenever the detector learns from data.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .detectors import Detector, get
from .extraction.outputs import Outputs
from .metrics import auroc, fpr95


@dataclass
class TuneResult:
    """The winning setting, its fitted detector and one row per tried setting (metrics in percent)."""

    best_params: dict[str, Any]
    best_detector: Detector
    table: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{'setting':<44}{'AUROC':>8}{'FPR@95':>9}{'time [s]':>10}"]
        for row in self.table:
            setting = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "(defaults)"
            if row.get("error"):
                lines.append(f"{setting:<44}  failed: {row['error']}")
            else:
                lines.append(f"{setting:<44}{row['auroc']:>8.2f}{row['fpr95']:>9.2f}{row['seconds']:>10.2f}")
        return "\n".join(lines)


def _as_sets(ood_val: Outputs | Mapping[str, Outputs] | Sequence[Outputs]) -> dict[str, Outputs]:
    if isinstance(ood_val, Outputs):
        return {ood_val.name: ood_val}
    if isinstance(ood_val, Mapping):
        sets = dict(ood_val)
    else:
        sets = {o.name: o for o in ood_val}
    if not sets:
        raise ValueError("tune: ood_val is empty; give at least one OOD validation set")
    return sets


def _settings(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") or len(list(values)) == 0:
            raise ValueError(f"tune: grid[{key!r}] must be a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(list(grid[k]) for k in keys))]


def tune(name: str, grid: Mapping[str, Sequence[Any]] | None, id_val: Outputs,
         ood_val: Outputs | Mapping[str, Outputs] | Sequence[Outputs], *, train: Outputs | None = None,
         val: Outputs | None = None, **fixed: Any) -> TuneResult:
    """Grid-search the detector ``name`` on validation data; best = highest mean AUROC over ``ood_val``.

    Args:
        name: a registered detector name (``oodscope.available()``).
        grid: ``{parameter: [values]}``; ``None`` uses the detector's own ``grid``.
        id_val: ID validation outputs (e.g. the ``val`` split).
        ood_val: one OOD validation :class:`Outputs`, a ``{name: Outputs}`` mapping or a list of them.
        train: ID data the detectors are fitted on (default: ``id_val``, for stateless detectors only).
        val: held-out ID data for detectors that declare ``Need.VALIDATION`` (``fit(train, val=val)``, e.g. the
            temperature of temperature scaling); ignored by the others.
        fixed: parameters held fixed for every setting.

    Returns:
        :class:`TuneResult` with ``best_params``, ``best_detector`` (fitted) and ``table``: one record per setting
        with ``params``, per-set ``auroc``/``fpr95`` in ``per_set``, their means, ``seconds`` and ``error``.
    """
    cls = get(name)
    grid = dict(cls.grid if grid is None else grid)
    unknown = set(grid) - set(cls._param_names())
    if unknown:
        raise ValueError(f"tune: {name} has no parameters {sorted(unknown)}; its parameters: {cls._param_names()}")
    clash = set(grid) & set(fixed)
    if clash:
        raise ValueError(f"tune: {sorted(clash)} given both in the grid and as fixed parameters")
    if not isinstance(id_val, Outputs):
        raise ValueError("tune: id_val must be oodscope.Outputs (cached outputs of the ID validation split)")
    sets = _as_sets(ood_val)
    fit_on = train if train is not None else id_val

    table: list[dict[str, Any]] = []
    best: tuple[float, int, Detector] | None = None
    for index, params in enumerate(_settings(grid) or [{}]):
        start = time.perf_counter()
        row: dict[str, Any] = {"params": params, "per_set": {}, "auroc": np.nan, "fpr95": np.nan, "error": None}
        try:
            detector = cls(**fixed, **params).fit(fit_on, val=val)
            id_scores = detector.score(id_val)
            for set_name, outputs in sets.items():
                ood_scores = detector.score(outputs)
                row["per_set"][set_name] = {"auroc": 100.0 * auroc(id_scores, ood_scores),
                                            "fpr95": 100.0 * fpr95(id_scores, ood_scores)}
        except (ValueError, FloatingPointError) as error:  # an invalid setting: record it, keep searching
            row["error"] = f"{type(error).__name__}: {error}"
        else:
            row["auroc"] = float(np.mean([m["auroc"] for m in row["per_set"].values()]))
            row["fpr95"] = float(np.mean([m["fpr95"] for m in row["per_set"].values()]))
            if best is None or row["auroc"] > best[0]:
                best = (row["auroc"], index, detector)
        row["seconds"] = time.perf_counter() - start
        table.append(row)
    if best is None:
        raise ValueError(f"tune: every setting of {name} failed; first error: {table[0]['error']}")
    return TuneResult(best_params=dict(table[best[1]]["params"]), best_detector=best[2], table=table)
