"""SHE: simplified Hopfield energy.

Zhang, Fu, Wang, Lin, Shen & Yang, "Out-of-distribution Detection based on In-distribution Data Patterns
Memorization with Modern Hopfield Energy", ICLR 2023, Sec. 3. The stored pattern of class ``c`` is the mean
penultimate feature of the training samples of class ``c`` that the network classifies correctly,
``S_c = mean{z_i : y_i = c = ŷ_i}``. The simplified Hopfield energy of a test feature with predicted class ``ŷ``
is ``E(x) = -z^T S_ŷ`` (Eq. 7); it is low for ID, so it is the OOD score as it stands.
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import as_float64, class_means
from .base import Detector


class SHE(Detector):
    """``score(x) = -z · S_ŷ``."""

    name = "she"
    needs = frozenset({Need.FEATURES, Need.LOGITS, Need.LABELS})
    grid: dict = {}

    def _fit(self, train: Outputs) -> None:
        logits = as_float64(train.logits)
        n_classes = logits.shape[1]
        labels = np.asarray(train.labels)
        correct = logits.argmax(axis=1) == labels
        missing = np.setdiff1d(np.arange(n_classes), labels[correct])
        if missing.size:
            raise ValueError(f"she: classes {missing.tolist()} have no correctly classified training sample in "
                             f"{train.name!r}; SHE needs one stored pattern per class (fit on more training data)")
        self.patterns_ = class_means(as_float64(train.features)[correct], labels[correct], n_classes, "she")

    def _score(self, x: Outputs) -> np.ndarray:
        z = as_float64(x.features)
        return -np.einsum("nd,nd->n", z, self.patterns_[as_float64(x.logits).argmax(axis=1)])
