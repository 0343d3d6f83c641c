"""Published numbers shipped with oodscope, each with its source, for the report's anchor table.

Only benchmarks whose setting oodscope reproduces exactly get anchors (same rows, same splits, same random draws):

* ``oodscope adbench --protocol dte --resample-to 1000``: the DTE paper's tables (Livernoche, Jain, Hezaveh &
  Ravanbakhsh, "On Diffusion Modeling for Anomaly Detection", ICLR 2024), AUROC in percent, mean (std) over seeds
  0-4, from the authors' repository README (github.com/vicliv/DTE at commit 5be3f1f): Table 1 (semi-supervised)
  and Table 2 (unsupervised). For ADBench's files the std is not recorded here (``None``).
* ``oodscope adbench --protocol adbench --resample-to 1000``: ADBench (Han et al., NeurIPS 2022), appendix D.4,
  Table D4 (AUCROC, mean of seeds 1-3, unsupervised), rows WDBC and wine.

Keys are ``(setting, dataset, detector)`` with the data set's name lower-cased and without ADBench's numeric
prefix (``6_cardio`` -> ``cardio``); see :func:`dataset_key`. The benchmark scripts
``benchmarks/dte_published.py`` and ``benchmarks/adbench_published.py`` read the same values from here.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

DTE_SOURCE = "DTE (ICLR 2024), github.com/vicliv/DTE README Table {table} at 5be3f1f, seeds 0-4"
ADBENCH_SOURCE = "ADBench (NeurIPS 2022), appendix Table D4 (AUCROC), seeds 1-3"

_DTE_SEMI_ADBENCH_FILES = {  # Table 1, semi-supervised: kNN, IForest, LOF, OCSVM
    "cardio": (92.0, 93.32, 92.21, 95.61), "thyroid": (98.68, 98.96, 92.72, 98.56),
    "satellite": (82.24, 77.46, 80.3, 73.91), "pendigits": (99.87, 97.22, 99.05, 96.36),
    "ionosphere": (97.44, 91.21, 94.29, 96.32), "vowels": (82.21, 61.83, 86.3, 75.91),
}

#: (setting, dataset, detector) -> (AUROC mean, std or None), percent
DTE: dict[tuple[str, str, str], tuple[float, float | None]] = {
    **{("dte-semi", dataset, detector): (value, None) for dataset, values in _DTE_SEMI_ADBENCH_FILES.items()
       for detector, value in zip(("knn_distance", "iforest", "lof", "ocsvm"), values)},
    ("dte-semi", "wdbc", "iforest"): (98.73, 0.64), ("dte-semi", "wine", "iforest"): (93.92, 1.79),
    ("dte-semi", "wdbc", "knn_distance"): (99.05, 0.27), ("dte-semi", "wine", "knn_distance"): (99.19, 0.22),
    ("dte-semi", "wdbc", "lof"): (99.62, 0.21), ("dte-semi", "wine", "lof"): (98.36, 0.38),
    ("dte-semi", "wdbc", "ocsvm"): (99.34, 0.23), ("dte-semi", "wine", "ocsvm"): (97.82, 0.45),
    ("dte-semi", "wdbc", "deep_svdd"): (99.31, 0.40), ("dte-semi", "wine", "deep_svdd"): (92.16, 4.34),
    ("dte-semi", "wdbc", "dte_np"): (99.52, 0.38), ("dte-semi", "wine", "dte_np"): (99.44, 0.97),
    ("dte-semi", "wdbc", "dte_c"): (98.48, 0.77), ("dte-semi", "wine", "dte_c"): (99.97, 0.04),
    ("dte-unsup", "wdbc", "iforest"): (98.83, 0.39), ("dte-unsup", "wine", "iforest"): (78.61, 6.71),
    ("dte-unsup", "wdbc", "knn_distance"): (98.04, 0.64), ("dte-unsup", "wine", "knn_distance"): (47.04, 3.12),
    ("dte-unsup", "wdbc", "lof"): (84.87, 9.38), ("dte-unsup", "wine", "lof"): (32.97, 14.63),
    ("dte-unsup", "wdbc", "ocsvm"): (98.42, 0.37), ("dte-unsup", "wine", "ocsvm"): (67.14, 3.79),
    ("dte-unsup", "wdbc", "deep_svdd"): (60.20, 20.82), ("dte-unsup", "wine", "deep_svdd"): (50.72, 23.41),
    ("dte-unsup", "wdbc", "dte_np"): (97.49, 1.11), ("dte-unsup", "wine", "dte_np"): (42.45, 6.29),
    ("dte-unsup", "wdbc", "dte_c"): (83.51, 6.61), ("dte-unsup", "wine", "dte_c"): (55.71, 11.39),
}

#: (dataset, detector) -> (AUCROC, AUCPR) mean of seeds 1-3, percent (ADBench Tables D4 / D5)
ADBENCH: dict[tuple[str, str], tuple[float, float]] = {
    ("wdbc", "iforest"): (98.95, 78.53), ("wine", "iforest"): (80.37, 25.96),
    ("wdbc", "lof"): (89.00, 14.93), ("wine", "lof"): (37.74, 7.77),
    ("wdbc", "ocsvm"): (98.86, 71.88), ("wine", "ocsvm"): (73.07, 21.56),
    ("wdbc", "knn_distance"): (91.72, 43.72), ("wine", "knn_distance"): (44.98, 8.43),
    ("wdbc", "deep_svdd"): (65.69, 6.57), ("wine", "deep_svdd"): (59.52, 21.14),
}


def dataset_key(name: str) -> str:
    """``"6_cardio"`` -> ``"cardio"``, ``"18_Ionosphere"`` -> ``"ionosphere"`` (ADBench's file names)."""
    return re.sub(r"^\d+_", "", str(name)).lower()


def published_auroc(protocol: str, resample_to: int | None, setting: str, dataset: str,
                    detector: str) -> tuple[float, float | None, str] | None:
    """The published AUROC (mean, std, source) of a result of ``oodscope adbench``, or ``None`` where no anchor
    applies (another protocol or resampling, a data set or detector the paper did not report)."""
    if resample_to != 1000:
        return None
    key = dataset_key(dataset)
    if protocol == "dte" and (setting, key, detector) in DTE:
        mean, std = DTE[(setting, key, detector)]
        return mean, std, DTE_SOURCE.format(table=1 if setting == "dte-semi" else 2)
    if protocol == "adbench" and setting == "adbench" and (key, detector) in ADBENCH:
        return ADBENCH[(key, detector)][0], None, ADBENCH_SOURCE
    return None


def anchor_rows(records: Sequence[Mapping[str, Any]], protocol: str, resample_to: int | None
                ) -> list[dict[str, Any]]:
    """Ours next to the published AUROC for every summary record (``group`` = setting, ``dataset``,
    ``detector``, ``auroc``, optional ``auroc_std``) that has an anchor; ``difference`` = ours - published."""
    rows = []
    for r in records:
        found = published_auroc(protocol, resample_to, r["group"], r["dataset"], r["detector"])
        if found is None:
            continue
        mean, std, source = found
        rows.append({"detector": r["detector"], "dataset": r["dataset"], "setting": r["group"],
                     "ours": r["auroc"], "ours_std": r.get("auroc_std"), "published": mean, "published_std": std,
                     "difference": r["auroc"] - mean, "source": source})
    return rows
