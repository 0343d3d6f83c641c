"""Unsupervised anomaly detectors for tabular data or given features (fit on mostly normal rows, score new rows).

Every module here registers one method (see :class:`._base.AnomalyDetector`). They are not part of the default
OOD benchmark run (``oodscope bench``); name them explicitly or use ``oodscope adbench``.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
