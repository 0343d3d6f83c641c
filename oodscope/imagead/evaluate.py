"""Evaluate image anomaly detectors on an MVTec-layout test set: image and pixel metrics per defect type.

Records follow ``oodscope bench``'s format (``detector``, ``dataset``, ``group``, ``auroc``, ``fpr95``,
``aupr_in``, ``aupr_out``, in percent, normal test images as ID and the defect type as OOD) plus ``f1_max``,
``pixel_auroc``, ``aupro`` and ``aupimo`` (percent; ``None`` where masks are missing or the detector gives no
anomaly map, never 0), ``fit_s`` and ``ms_per_image``. One record per defect type (``group`` ``"defect"``) and
one over all defect types (``dataset`` ``"all"``, ``group`` ``"all"``). Per defect type, pixel AUROC and AUPRO
use the normal test images together with that type's images; AUPIMO is the mean over that type's images with
thresholds set on all normal test images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.mvtec import GOOD, ImageSet
from ..metrics import ood_metrics
from ..metrics import pixel as P

PIXEL_METRICS = ("pixel_auroc", "aupro", "aupimo")


@dataclass
class ADRun:
    detector: str
    scores: np.ndarray
    maps: np.ndarray | None
    fit_s: float
    ms_per_image: float
    records: list[dict[str, Any]] = field(default_factory=list)


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * float(value)


def ad_records(name: str, test: ImageSet, scores: np.ndarray, maps: np.ndarray | None,
               fit_s: float = float("nan"), ms_per_image: float = float("nan"),
               notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Records (see module docstring) for one detector's scores and maps on ``test``."""
    normal = test.labels == 0
    if not normal.any():
        raise ValueError(f"test set {test.name!r} has no normal (test/good) images: image AUROC is undefined")
    pixel_ok = maps is not None and test.masks is not None
    aupimo_all = None
    if pixel_ok and test.pixel_ready:
        # anomalous images whose mask became empty (a tiny defect lost in resizing) have no TPR: left out
        empty = (~normal) & ~test.masks.reshape(len(test), -1).any(axis=1)
        try:
            keep = ~empty
            aupimo_all = np.full(len(test), np.nan)
            aupimo_all[keep & ~normal] = P.aupimo(maps[keep], test.masks[keep], test.labels[keep])
            if empty.any() and notes is not None:
                notes.append(f"{name}: {int(empty.sum())} anomalous images with an empty mask are left out of AUPIMO")
        except ValueError as error:  # e.g. too few normal pixels to reach the FPR range
            aupimo_all = None
            if notes is not None:
                notes.append(f"{name}: AUPIMO missing: {error}")
    records = []
    groups = [(d, test.defects == d, "defect") for d in sorted(set(test.defects.tolist()) - {GOOD})]
    groups.append(("all", ~normal, "all"))
    for dataset, chosen, group in groups:
        row: dict[str, Any] = {"detector": name, "dataset": dataset, "group": group}
        row.update({k: 100.0 * v for k, v in ood_metrics(scores[normal], scores[chosen]).items()})
        both = normal | chosen
        row["f1_max"] = 100.0 * P.f1_max(scores[both], test.labels[both])
        has = test.has_mask[both].all() if test.has_mask is not None else False
        if pixel_ok and has:
            row["pixel_auroc"] = _percent(P.pixel_auroc(maps[both], test.masks[both]))
            row["aupro"] = _percent(P.aupro(maps[both], test.masks[both]))
        else:
            row["pixel_auroc"] = row["aupro"] = None
        row["aupimo"] = None
        if aupimo_all is not None:
            values = aupimo_all[chosen]
            values = values[np.isfinite(values)]
            row["aupimo"] = _percent(values.mean()) if values.size else None
        row["n_images"] = int(chosen.sum())
        row["fit_s"], row["ms_per_image"] = float(fit_s), float(ms_per_image)
        records.append(row)
    return records


def run_detector(detector, train: ImageSet, test: ImageSet, notes: list[str] | None = None) -> ADRun:
    """Fit on ``train``, score ``test`` (timed), and compute the records."""
    start = time.perf_counter()
    detector.fit(train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores, maps = detector.score_and_map(test)
    ms = 1000.0 * (time.perf_counter() - start) / len(test)
    records = ad_records(detector.name, test, scores, maps, fit_s, ms, notes)
    return ADRun(detector.name, scores, maps, fit_s, ms, records)
