"""Image anomaly detection: detectors that fit on defect-free images and return image scores and anomaly maps.

``oodscope.imagead.create("patchcore").fit(data.train)`` then ``score_and_map(data.test)``; see
:mod:`oodscope.imagead.base` for the contract and :func:`oodscope.data.mvtec.load_mvtec` for the data.
Importing this package imports no optional dependency (OpenCV, faiss are imported where used).
"""

from .base import Backbone, ImageDetector, available, create, get

__all__ = ["Backbone", "ImageDetector", "available", "create", "get"]
