"""Nearest class centroid by cosine similarity (a baseline on raw encoder embeddings).

The class centroids are the means of the training features of each class, ``mu_c = mean_{i: y_i = c} x_i``
(nearest-class-mean classifier, Mensink et al., TPAMI 2013, Eq. 1, with cosine instead of Euclidean
similarity, as is usual for sentence embeddings). The OOD score is the negative best cosine similarity,
``s(x) = -max_c cos(x, mu_c)``: a sample far (in angle) from every class is out of scope. It needs no classifier
head, so it also applies to a frozen encoder's embeddings; ``predict_class`` gives the nearest-centroid label.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import as_float64, class_means, l2_normalize, n_classes_of
from .base import Detector


class CosineCentroid(Detector):
    """``score(x) = -max_c <x / ||x||, mu_c / ||mu_c||>`` with ``mu_c`` the training class means."""

    name = "cos_centroid"
    needs = frozenset({Need.FEATURES, Need.LABELS})

    def _fit(self, train: Outputs) -> None:
        means = class_means(as_float64(train.features), train.labels, n_classes_of(train.labels, train.logits),
                            self.name)
        if (np.linalg.norm(means, axis=1) == 0).any():
            raise ValueError(f"{self.name}: a class centroid is the zero vector; cosine similarity is undefined")
        self.centroids_ = l2_normalize(means)

    def similarities(self, x: Outputs | np.ndarray) -> np.ndarray:
        features = x.features if isinstance(x, Outputs) else np.asarray(x)
        return l2_normalize(as_float64(features)) @ self.centroids_.T

    def predict_class(self, x: Outputs | np.ndarray) -> np.ndarray:
        """Index of the nearest centroid (the nearest-class-mean classifier)."""
        return self.similarities(x).argmax(axis=1)

    def _score(self, x: Outputs) -> np.ndarray:
        return -self.similarities(x).max(axis=1)
