"""Absent-class probability: the OOD score of a classifier trained with an extra class for outliers.

Jiang et al., "Diverse Outlier Sampling Improves Out-of-Distribution Detection" (DOS), ICLR 2024, and the
absent-category loss it trains with: a ``K + 1``-way classifier whose last class is "outlier". The ID confidence in
the paper is ``1 - p_{K+1}(x)``; the OOD score here is

    ``score(x) = p_{K+1}(x) = softmax(f(x))_{K+1}``.

The deployed model of :class:`oodscope.training.objectives.dos.DOS` records ``p_{K+1}`` in its
``fc.absent_probability`` layer (``extract(model, x, layers=["fc.absent_probability"])``); name another layer with
``layers=[...]`` for a model whose head is elsewhere. Stateless.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..extraction.outputs import Need, Outputs
from .base import Detector

ABSENT_LAYER = "fc.absent_probability"


def probability_columns(x: Outputs, layer: str, who: str, columns: int | None = None) -> np.ndarray:
    """The probabilities a head recorded in ``layer``: a clear error when they are not probabilities."""
    values = np.asarray(x.layers[layer], dtype=np.float64)
    if values.ndim != 2 or (columns is not None and values.shape[1] != columns):
        want = f"(samples, {columns})" if columns else "(samples, groups)"
        raise ValueError(f"{who}: layer {layer!r} must hold {want} probabilities, got shape {values.shape}")
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise ValueError(f"{who}: layer {layer!r} holds values outside [0, 1] ({values.min():.3g}.."
                         f"{values.max():.3g}); it is not a head's probability output")
    return values


class LayerProbabilities(Detector):
    """Base of the stateless detectors that read one layer of probabilities recorded by a training objective's
    head; subclasses give the layer's default name and reduce its columns to a score in ``_score``."""

    needs = frozenset({Need.LAYERS})
    columns: int | None = None  # the layer's expected width (None: any)

    def __init__(self, layers: Sequence[str] = ()):
        self.layers = layers

    def _check_params(self) -> None:
        if len(self.layers) != 1:
            raise ValueError(f"{self.name}: layers names the one layer holding the probabilities, got "
                             f"{list(self.layers)}")

    def probabilities(self, x: Outputs) -> np.ndarray:
        return probability_columns(x, self.layers[0], self.name, self.columns)


class AbsentClass(LayerProbabilities):
    """``score(x) = p_{K+1}(x)``, the absent class's softmax probability (read from a layer)."""

    name = "absent_class"
    columns = 1

    def __init__(self, layers: Sequence[str] = (ABSENT_LAYER,)):
        super().__init__(layers)

    def _score(self, x: Outputs) -> np.ndarray:
        return self.probabilities(x)[:, 0]
