"""One registry of detectors, filled by subclassing :class:`~oodscope.detectors.base.Detector`.

Detector modules are discovered from the :mod:`oodscope.detectors` package on first use, so adding a method is
adding one file. Modules must not import optional heavy dependencies (faiss, matplotlib, ...) at import time.
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


_REGISTRY: dict[str, type["Detector"]] = {}
_DISCOVERED = False


def register(cls: type["Detector"]) -> type["Detector"]:
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"detector name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    package = importlib.import_module("oodscope.detectors")
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_") and module.name not in ("base", "registry"):
            importlib.import_module(f"oodscope.detectors.{module.name}")
    _DISCOVERED = True


def available() -> list[str]:
    """Names of all registered detectors, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> type["Detector"]:
    """The detector class registered under ``name`` (case-insensitive)."""
    _discover()
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
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
