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

Objectives that change the network (DOS's absent class, MOS's group softmax, AbeT's learned temperature, ISH's
shaped weight gradient) override ``adapt(model, n_classes, train, preprocess)`` to put one of the heads of
:mod:`oodscope.training.heads` in place of the last ``nn.Linear`` before training; :meth:`deploy` switches every
such head to its deployed form (``K`` class logits) after training. Objectives that choose their outliers from a
larger pool each step (DOS) override ``select_outliers``; objectives that derive their outlier pool once from the
given outliers before training (SAL's filtering of wild data) override ``prepare_outliers``. Objectives that
synthesise outliers from the ID images in the model's input space (ASCOOD's attribution-guided virtual outliers)
override ``extend_inputs``; objectives with state updated once per epoch over the training set (SCONE's
augmented-Lagrangian multipliers) override ``end_epoch``.

Objectives whose loss reads the representation, not only the logits (CIDER's and PALM's projection head on the
hypersphere), set ``needs_features = True``: the engine then passes ``features=`` (the ID part) and, when the step
has outliers, ``outlier_features=`` to ``loss``, the input of the module :meth:`feature_module` names (by default
the classifier head, so the penultimate features), with their gradient. Objectives whose loss reads a spatial map
(SSOD's per-position scores of the last convolutional feature map, before global pooling) name its module in
:meth:`feature_map_module`: the engine then passes that module's *output* as ``feature_map=`` (the ID rows) and,
when the step has outliers, ``outlier_feature_map=``, with its gradient.
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
    needs_features: ClassVar[bool] = False  # loss(...) gets features= (the input of feature_module(model))

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

    def adapt(self, model, n_classes: int, train: tuple[Any, Any], preprocess) -> Any:
        """The network to train (``model`` itself by default); called once, before any step, also on resume."""
        return model

    def deploy(self, model) -> Any:
        """The fine-tuned network for scoring: every head of :mod:`.heads` in its deployed form (``K`` logits)."""
        from .heads import _Head, replace_module

        for name, module in list(model.named_modules()):
            if isinstance(module, _Head):
                replace_module(model, name, module.deploy())
        return model

    def score_detector(self):
        """The post-hoc detector the paper scores the fine-tuned model with (:attr:`score`), unfitted; objectives
        whose score reads a layer of their head name it (after ``adapt``)."""
        from ..detectors import create

        return create(self.score)

    def feature_module(self, model) -> str:
        """The dotted name of the module whose input the engine passes to ``loss`` as ``features`` (when
        :attr:`needs_features`): the classifier head (the last ``nn.Linear``, after ``adapt``) by default."""
        from .heads import head_name

        return head_name(model)

    def feature_map_module(self, model) -> str | None:
        """The dotted name of the module whose output the engine passes to ``loss`` as ``feature_map`` (e.g. the
        last convolutional map, before global pooling, after ``adapt``); ``None`` (default): no map is captured."""
        return None

    def prepare_outliers(self, model, train: tuple[Any, Any], outliers, preprocess, seed: int) -> Any:
        """The outlier pool the engine draws from, computed once before training from the given ``outliers``
        (on the adapted model, before any step): all of them by default; SAL filters candidate outliers from wild
        data built from them."""
        return outliers

    def outliers_per_step(self, batch_size: int, outlier_batch_size: int) -> int:
        """How many outliers the engine draws (and augments) per step: ``outlier_batch_size`` by default; an
        objective that selects from a larger pool (DOS) asks for the pool."""
        return outlier_batch_size

    def select_outliers(self, x, x_out, model, preprocess, generator) -> Any:
        """The outliers of one step from the engine's drawn (and augmented) batch ``x_out``; all of it by default."""
        return x_out

    def extend_inputs(self, model, inputs, labels, generator, progress: float) -> Any:
        """The model inputs of one step, after preprocessing (``inputs``: the ID images, then the outliers, on the
        device): ``inputs`` itself by default; an objective that synthesises outliers from the ID rows (ASCOOD)
        appends them. ``progress`` = finished epochs / all epochs (for schedules over training)."""
        return inputs

    def end_epoch(self, model, train: tuple[Any, Any], preprocess) -> dict[str, float]:
        """Called after every epoch, before its checkpoint is written (state kept in the model's buffers is
        saved with it); returns numbers for the epoch's history. Nothing by default; SCONE updates its
        augmented-Lagrangian multipliers and penalties from the whole training set."""
        return {}

    def batch(self, x, x_out, generator) -> tuple[Any, dict]:
        """The model inputs of one step: the ID images, then the outliers (if any); no context."""
        import torch

        return (x if x_out is None else torch.cat([x, x_out])), {}

    def loss(self, logits, labels, outlier_logits=None, **context):
        raise NotImplementedError


def check_positive(who: str, name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{who}: {name} must be a number > 0, got {value!r}")
