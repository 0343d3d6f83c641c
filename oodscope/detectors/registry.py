"""One registry of detectors of every family, filled by subclassing :class:`~oodscope.detectors.base.Detector`.

Each class declares its ``family`` (:data:`FAMILIES`); the registry never guesses it. Detector modules are
discovered on first use from the packages in :data:`PACKAGES`, so adding a method is adding one file (and a new
family is adding its package here). Modules must not import optional heavy dependencies (faiss, matplotlib,
OpenCV, ...) at import time.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Detector

class UnknownDetectorError(KeyError, ValueError):
    """An unregistered detector name; the message suggests the closest registered names."""

    def __str__(self) -> str:
        return str(self.args[0])


#: the families a detector can declare, with what each one scores
FAMILIES: dict[str, str] = {
    "ood": "post-hoc OOD detection on a trained classifier's outputs (logits, features, head, layers, model)",
    "anomaly": "anomaly detection on tabular rows or given features",
    "image": "image anomaly detection and localisation (fit on defect-free images)",
    "training": "training objectives: fine-tune a classifier (oodscope.training.finetune), then score it post hoc",
    "generative": "density models of the input images: likelihoods and the statistics that correct them",
    "vlm": "zero-shot OOD detection with a vision-language (CLIP) model: images scored against class-name prompts",
}
#: the families whose members are detectors (fit / score); "training" holds objectives
DETECTOR_FAMILIES = ("ood", "anomaly", "image", "generative", "vlm")
#: packages whose modules register detectors (imported once, on first use of the registry)
PACKAGES = ("oodscope.detectors", "oodscope.imagead", "oodscope.training.objectives", "oodscope.generative",
            "oodscope.vlm")
_SKIP = {"base", "registry", "evaluate", "pixelcnn", "realnvp", "hvae", "score_network", "mae", "ddpm"}

_REGISTRY: dict[str, type["Detector"]] = {}
_DISCOVERED: set[str] = set()


def register(cls: type["Detector"]) -> type["Detector"]:
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__}: family {cls.family!r} is not one of "
                         f"{sorted(FAMILIES)}")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"detector name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover(until: str | None = None) -> None:
    """Import the detector packages in order (all of them, or until ``until`` is registered).

    Stopping early keeps ``create("msp")`` from importing the image package (and with it torch).
    """
    for package_name in PACKAGES:
        if until is not None and until in _REGISTRY:
            return
        if package_name in _DISCOVERED:
            continue
        package = importlib.import_module(package_name)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_") and module.name not in _SKIP:
                importlib.import_module(f"{package_name}.{module.name}")
        _DISCOVERED.add(package_name)


def available(family: str | None = None) -> list[str]:
    """Names of the registered detectors (of one ``family`` of :data:`FAMILIES`, or all), sorted."""
    _discover()
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
    return sorted(name for name, cls in _REGISTRY.items() if family is None or cls.family == family)


def get(name: str) -> type["Detector"]:
    """The detector class registered under ``name`` (case-insensitive)."""
    key = name.lower().replace("-", "_")
    _discover(until=key)
    if key not in _REGISTRY:
        _discover()
        close = difflib.get_close_matches(key, _REGISTRY, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownDetectorError(f"unknown detector {name!r}{hint} (oodscope.available() lists all {len(_REGISTRY)})")
    return _REGISTRY[key]


def create(name: str, **params: Any) -> "Detector":
    """Instantiate a registered detector: ``create("knn", k=50)``."""
    return get(name)(**params)


def close_names_hint(name: str, names) -> str:
    """``"; did you mean a, b?"`` for the registered names closest to ``name`` (empty when none is close)."""
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""
