"""The contract of a training objective (family ``training`` of the one registry).

An objective is a small estimator like a detector: hyperparameters in ``__init__`` (scikit-learn's protocol, so
``clone`` and ``get_params`` work), a registered ``name``, the inputs it ``needs`` (``Need.LABELS`` and, for the
outlier-exposure family, ``Need.OUTLIERS``) and one method::

    loss(logits, labels, outlier_logits=None, **context) -> (total, {term: value})

on one mini-batch: ``logits`` of the ID images ``(B, C)``, their integer ``labels`` ``(B,)`` and, when the objective
needs outliers, the logits of the second part of the step's inputs (by default the auxiliary outliers). An
objective that builds its own inputs (MixOE mixes ID images with outliers) overrides
``batch(x, x_out, generator) -> (inputs, context)``: ``inputs`` are the ID images followed by the second part,
``context`` is passed to ``loss`` as keyword arguments. ``total`` is the scalar tensor that
:func:`oodscope.training.finetune` back-propagates; the terms are floats shown in the progress bar and kept in the
history. ``score`` names the post-hoc detector the paper scores the fine-tuned model with (e.g. ``"energy"`` for
energy-bounded fine-tuning); every other detector runs on the fine-tuned model as well.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sklearn.base import BaseEstimator

from ..detectors import registry
from ..extraction.outputs import Need


class Objective(BaseEstimator):
    """Base class of training objectives (see module docstring)."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = "training"
    needs: ClassVar[frozenset[Need]] = frozenset({Need.LABELS})
    score: ClassVar[str] = "msp"  # the detector the paper scores the fine-tuned model with
    trains_network: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            registry.register(cls)

    @property
    def label(self) -> str:
        """The name plus every non-default parameter, e.g. ``oe(lam=1.0)``."""
        from ..detectors.base import configuration_label

        return configuration_label(self)

    def check_params(self) -> None:
        """Validate hyperparameters before any training step; subclasses raise ``ValueError`` naming the fix."""

    def batch(self, x, x_out, generator) -> tuple[Any, dict]:
        """The model inputs of one step: the ID images, then the outliers (if any); no context."""
        import torch

        return (x if x_out is None else torch.cat([x, x_out])), {}

    def loss(self, logits, labels, outlier_logits=None, **context):
        raise NotImplementedError


def check_positive(who: str, name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{who}: {name} must be a number > 0, got {value!r}")
