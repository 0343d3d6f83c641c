"""oodscope: out-of-distribution and anomaly detection - detectors, one-pass extraction, metrics, benchmarks.

The package follows the way data flows::

    data (datasets, benchmark specs) -> extraction (run the model once, cache) -> detectors (one module each)
    -> metrics -> evaluation -> report and CLI

Every detector follows one contract: ``fit(train)`` on in-distribution data, ``score(x)`` with one float per
sample, higher = more out-of-distribution.
"""

from __future__ import annotations

from .detectors import Detector, NotFittedError, available, create
from .extraction.outputs import Head, Need, Outputs

__version__ = "0.1.0"

__all__ = ["Detector", "NotFittedError", "available", "create", "Head", "Need", "Outputs", "extract",
           "evaluate", "Results", "metrics", "__version__", "tune", "load"]

_LAZY = {"extract": ("oodscope.extraction.extract", "extract"),
         "evaluate": ("oodscope.evaluation", "evaluate"),
         "Results": ("oodscope.evaluation", "Results"),
         "metrics": ("oodscope.metrics", None),
         "tune": ("oodscope.tuning", "tune"),
         "load": ("oodscope.persistence", "load")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attribute is None else getattr(module, attribute)
    raise AttributeError(f"module 'oodscope' has no attribute {name!r}")
