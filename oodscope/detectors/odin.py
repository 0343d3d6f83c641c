"""ODIN: temperature scaling and input perturbation.

Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection in Neural Networks",
ICLR 2018. With ``S_c(x; T) = softmax(f(x) / T)_c`` and ``y^ = argmax_c f_c(x)``:

* Eq. 2, input preprocessing: ``x~ = x - eps * sign(-grad_x log S_y^(x; T))``, a small step that raises the
  (temperature-scaled) confidence of the predicted class; ID inputs gain more than OOD inputs.
* the score is ``max_c S_c(x~; T)``; we return its negative (higher = more OOD).

Defaults are the paper's CIFAR-10 settings, ``T = 1000`` and ``eps = 0.0014``.

**Perturbation space.** The paper's ``eps`` is in the unit of the image in ``[0, 1]``: its code takes the
gradient with respect to the *normalised* input and divides the signed gradient of each channel by that
channel's normalisation std before stepping, which is the same as stepping ``eps`` in ``[0, 1]`` pixel space.
We do the same: with ``input_std="auto"`` the per-channel std is read from the preprocessing's ``std``
attribute (:class:`~oodscope.data.transforms.ImageNormalize` has one) and the step in model-input space is
``eps / std_c``. A preprocessing without ``std`` means no normalisation, so the step is ``eps`` itself; pass
``input_std=<float or per-channel list>`` to override, or ``input_std=1.0`` to step in model-input space.
pytorch-ood's ``ODIN(norm_std=...)`` implements the same convention when given the std.

ODIN runs the network again (one forward + backward + forward per batch) through
:func:`oodscope.extraction.rerun.rerun`, so it needs ``Outputs`` made by :func:`oodscope.extract` in this
session (they carry the model; outputs loaded from disk alone do not). With ``epsilon=0`` no perturbation is
made and the score comes from the cached logits, so tuning ``T`` alone never runs the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..extraction.outputs import ModelSource, Need, Outputs
from ._common import probabilities
from .base import Detector

if TYPE_CHECKING:  # torch is imported only when ODIN re-runs the network
    import torch


class ODIN(Detector):
    """``score(x) = -max_c softmax(f(x~) / T)_c`` with ``x~`` the ODIN-perturbed input."""

    name = "odin"
    needs = frozenset({Need.MODEL})
    grid = {"temperature": [1.0, 10.0, 100.0, 1000.0], "epsilon": [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.003, 0.004]}

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014,
                 input_std: str | float | Sequence[float] = "auto"):
        self.temperature = temperature
        self.epsilon = epsilon
        self.input_std = input_std

    def _check_params(self) -> None:
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"odin: temperature must be > 0, got {self.temperature}")
        if not (np.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"odin: epsilon (perturbation size) must be >= 0, got {self.epsilon}")
        if not isinstance(self.input_std, str):
            std = np.atleast_1d(np.asarray(self.input_std, dtype=np.float64))
            if std.ndim != 1 or not (np.isfinite(std).all() and (std > 0).all()):
                raise ValueError(f"odin: input_std must be 'auto', a positive number or one positive number per "
                                 f"channel, got {self.input_std!r}")
        elif self.input_std != "auto":
            raise ValueError(f"odin: input_std must be 'auto' or numbers, got {self.input_std!r}")

    def _check_inputs(self, data: Outputs, fitting: bool) -> None:
        if fitting or (self.epsilon == 0 and data.logits is not None):
            if len(data) == 0:
                raise ValueError(f"{self.name}: dataset {data.name!r} is empty")
            if data.source is not None:
                data.get(Need.MODEL, who=self.name)  # raw inputs checked (finite) even though ODIN learns nothing
            return  # ODIN learns nothing; with epsilon = 0 the cached logits suffice
        super()._check_inputs(data, fitting)

    def _score(self, x: Outputs) -> np.ndarray:
        if self.epsilon == 0 and x.logits is not None:
            return -probabilities(x.logits, self.temperature).max(axis=1)
        import torch

        from ..extraction.rerun import perturb, rerun

        source = x.get(Need.MODEL, who=self.name)
        temperature = float(self.temperature)

        def score_batch(batch: torch.Tensor, probe) -> torch.Tensor:
            step = self.perturbation_step(source, batch)
            confidence = lambda z: torch.log_softmax(probe(z)["logits"] / temperature, dim=1).max(dim=1).values
            perturbed = perturb(batch, confidence, step)
            with torch.no_grad():
                logits = probe(perturbed)["logits"]
            return -torch.softmax(logits.double() / temperature, dim=1).max(dim=1).values

        return rerun(source, score_batch)

    def perturbation_step(self, source: ModelSource, batch: torch.Tensor) -> torch.Tensor | float:
        """``eps / std`` per channel (broadcast over ``N x C x ...``), or ``eps`` when there is no std."""
        import torch

        if isinstance(self.input_std, str):
            std = getattr(source.preprocess, "std", None)
            if std is None:
                return float(self.epsilon)
            std = torch.as_tensor(std, dtype=batch.dtype, device=batch.device).flatten()
        else:
            std = torch.as_tensor(np.atleast_1d(self.input_std), dtype=batch.dtype, device=batch.device)
        if batch.ndim < 2 or std.numel() not in (1, batch.shape[1]):
            raise ValueError(f"odin: input_std has {std.numel()} values but the model input has shape "
                             f"{tuple(batch.shape)} (channels on axis 1)")
        return self.epsilon / std.view(1, -1, *([1] * (batch.ndim - 2)))

    def _input_dims(self, data: Outputs) -> dict:
        return {}
