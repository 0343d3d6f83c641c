"""Adapter that runs any PyOD detector behind the oodscope contract (PyOD is optional: ``pip install pyod``).

Zhao, Nasrullah & Li, "PyOD: A Python Toolbox for Scalable Outlier Detection", JMLR 2019. PyOD detectors follow
``fit(X)`` / ``decision_function(X)`` with higher = more anomalous, which is oodscope's convention, so the score
is ``decision_function`` unchanged. ``model`` is a PyOD class name from ``pyod.models`` (``"KNN"``, ``"IForest"``,
``"DeepSVDD"``, ...), a dotted path (``"pyod.models.lof.LOF"``) or an unfitted instance (cloned at ``fit``);
``params`` are its constructor arguments. PyOD is imported only when the adapter is fitted.

A name or dotted path (which may come from a command line or a saved file) reaches only detector classes of
PyOD: the path must lie under ``pyod.models.`` (checked before anything is imported) and name a subclass of
``pyod.models.base.BaseDetector``, so ``"subprocess.Popen"`` or ``"os.system"`` is refused, never imported or
called.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import numpy as np

from ...extraction.outputs import Outputs
from ._base import AnomalyDetector

# class name -> module of pyod.models (the models a name alone can reach)
_MODULES = {"KNN": "knn", "LOF": "lof", "IForest": "iforest", "OCSVM": "ocsvm", "DeepSVDD": "deep_svdd",
            "PCA": "pca", "MCD": "mcd", "HBOS": "hbos", "COPOD": "copod", "ECOD": "ecod", "CBLOF": "cblof",
            "LODA": "loda", "FeatureBagging": "feature_bagging", "AutoEncoder": "auto_encoder", "VAE": "vae",
            "ABOD": "abod", "GMM": "gmm", "KDE": "kde", "INNE": "inne", "LUNAR": "lunar", "DIF": "dif"}


_PREFIX = "pyod.models."
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def _import_pyod(who: str):
    try:
        return importlib.import_module("pyod")
    except ImportError:
        raise ValueError(f"{who}: PyOD is not installed; pip install pyod") from None


def resolve_model(model: Any, params: dict, who: str):
    """An unfitted PyOD estimator from a class name, a dotted path or an instance."""
    from sklearn.base import clone

    if not isinstance(model, str):
        if not hasattr(model, "decision_function") or not hasattr(model, "fit"):
            raise ValueError(f"{who}: model must be a PyOD class name or an estimator with fit/decision_function, "
                             f"got {type(model).__name__}")
        return clone(model).set_params(**params) if params else clone(model)
    if "." in model:
        module_name, _, class_name = model.rpartition(".")
        if not (module_name.startswith(_PREFIX) and _DOTTED.fullmatch(model)):
            raise ValueError(f"{who}: model {model!r} is not a PyOD detector class: a dotted path must lie under "
                             f"{_PREFIX} (such as 'pyod.models.knn.KNN')")
    elif model in _MODULES:
        module_name, class_name = f"{_PREFIX}{_MODULES[model]}", model
    else:
        raise ValueError(f"{who}: unknown PyOD model {model!r}; give one of {sorted(_MODULES)} or a dotted path "
                         "such as 'pyod.models.knn.KNN'")
    _import_pyod(who)
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise ValueError(f"{who}: cannot import {class_name} from {module_name}") from None
    from pyod.models.base import BaseDetector

    if not (isinstance(cls, type) and issubclass(cls, BaseDetector)) or cls is BaseDetector:
        raise ValueError(f"{who}: {model!r} is not a PyOD detector class (a subclass of "
                         "pyod.models.base.BaseDetector)")
    return cls(**params)


class PyODAdapter(AnomalyDetector):
    """Any PyOD detector; the score is its ``decision_function`` (higher = more anomalous)."""

    name = "pyod"
    adbench_default = False  # needs a model argument

    def __init__(self, model: Any = "KNN", params: dict | None = None):
        self.model = model
        self.params = params

    def _check_params(self) -> None:
        if self.params is not None and not isinstance(self.params, dict):
            raise ValueError(f"{self.name}: params must be a dict of constructor arguments, got {self.params!r}")

    def _fit(self, train: Outputs) -> None:
        self.estimator_ = resolve_model(self.model, dict(self.params or {}), self.name)
        self.estimator_.fit(self._x(train))

    def _score(self, x: Outputs) -> np.ndarray:
        return np.asarray(self.estimator_.decision_function(self._x(x)), dtype=np.float64)
