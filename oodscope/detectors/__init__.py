"""Detectors: one module per method, all following :class:`~oodscope.detectors.base.Detector`."""

from .base import Detector, NotFittedError
from .registry import UnknownDetectorError, available, create, get

__all__ = ["Detector", "NotFittedError", "UnknownDetectorError", "available", "create", "get"]
