"""The detector contract shared by every method.

A detector is a small estimator in the scikit-learn mould:

* hyperparameters are ``__init__`` arguments stored under the same name, nothing else happens in ``__init__``;
* ``fit(train) -> self`` learns from in-distribution data; what it learns lives in attributes ending in ``_``;
* ``score(x) -> np.ndarray`` returns one float per sample, **higher = more out-of-distribution**;
* the class declares what it consumes in ``needs`` (see :class:`~oodscope.extraction.outputs.Need`) so the
  extraction step computes each part once and shares it between detectors;
* ``grid`` lists the hyperparameter values a tuner searches;
* ``trains_network`` marks methods that train a network of their own (left out of default benchmark runs).

A subclass only writes ``_fit`` (optional) and ``_score``; the base class checks inputs (presence, NaN/inf,
dimensions), refuses ``score`` before ``fit`` and provides the threshold helpers ``calibrate`` / ``predict``.
Subclasses that set ``name`` are registered automatically (see :mod:`oodscope.detectors.registry`).

The class is a scikit-learn estimator (``sklearn.base.clone``, ``Pipeline``, ``GridSearchCV`` with a scorer on
scores work) and offers PyOD's name for the score, ``decision_function``. Attributes in :data:`RESERVED` belong to
the base class (the threshold set by ``calibrate``, the fitted input shapes); a ``_fit`` that sets one is an error.

Held-out data reaches a detector through one route: ``fit(train, val=..., ood_val=...)``. A detector that uses
labelled ID validation data declares ``Need.VALIDATION`` (and outliers for tuning, ``Need.OOD_VALIDATION``) and
writes ``_fit(self, train, val, ood_val)``; every other detector writes ``_fit(self, train)`` and is given neither.
A stochastic detector takes a ``seed`` parameter; callers set it with :meth:`Detector.with_seed`.

Bad input never becomes a silent number. Besides presence, NaN/inf, shapes and label ranges, a detector that
learns from its training data (one that writes ``_fit``) refuses fewer than two training samples and training data
whose rows are all identical (nothing to learn a spread from). ``score`` warns with :class:`SaturationWarning`
when rows of an input exceed the training data's magnitude by more than :data:`SATURATION` times: softmax,
distances and kernels saturate there, so such rows get scores that no longer rank them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
from sklearn.base import BaseEstimator

from ..extraction.outputs import Need, Outputs, as_outputs
from . import registry

#: attributes owned by the base class; a detector's ``_fit`` must not set them
RESERVED = frozenset({"threshold_", "input_dims_", "input_range_", "keep_"})
#: rows more than this many times larger (max |value|) than the training data trigger a SaturationWarning
SATURATION = 1e6


class SaturationWarning(UserWarning):
    """Test rows far outside the training data's magnitude: their scores saturate and may not rank them."""
HELD_OUT = frozenset({Need.VALIDATION, Need.OOD_VALIDATION})


class NotFittedError(ValueError, AttributeError):
    """Raised when a detector is used before ``fit``."""


class Detector(BaseEstimator):
    """Base class of all detectors (see module docstring for the contract)."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = "ood"  # one of registry.FAMILIES; subclass bases of other families override it
    needs: ClassVar[frozenset[Need]] = frozenset()
    grid: ClassVar[dict[str, Sequence[Any]]] = {}
    trains_network: ClassVar[bool] = False  # True for methods that train a model of their own (slow)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        clash = RESERVED & {k for k in vars(cls)}
        if clash:
            raise TypeError(f"{cls.__qualname__} defines {sorted(clash)}, which the Detector base class owns; "
                            "name the detector's own fitted state differently")
        if cls.__dict__.get("name"):
            registry.register(cls)

    # -- parameters (scikit-learn's estimator protocol) -----------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        return list(cls._get_param_names())

    def set_params(self, **params: Any) -> "Detector":
        unknown = set(params) - set(self._param_names())
        if unknown:
            raise ValueError(f"{self.name}: unknown parameters {sorted(unknown)}; known: {self._param_names()}")
        return super().set_params(**params)

    def clone(self, **params: Any) -> "Detector":
        """A new, unfitted detector with the same (or overridden) parameters."""
        return type(self)(**{**self.get_params(deep=False), **params})

    @classmethod
    def is_stochastic(cls) -> bool:
        """Whether the detector draws random numbers (it then takes a ``seed`` parameter)."""
        return "seed" in cls._param_names()

    def with_seed(self, seed: int) -> "Detector":
        """Set ``seed`` if the detector is stochastic; a no-op otherwise. Returns ``self``."""
        if self.is_stochastic():
            self.set_params(seed=int(seed))
        return self

    @property
    def label(self) -> str:
        """The name plus every non-default parameter, e.g. ``knn_distance(k=1)``: unique per configuration."""
        return configuration_label(self)

    # -- the contract ------------------------------------------------------------------------------------
    def fit(self, train: Outputs | np.ndarray, y: np.ndarray | None = None, *, val: Outputs | np.ndarray | None = None,
            ood_val: Outputs | np.ndarray | None = None) -> "Detector":
        """Learn from in-distribution data (an :class:`Outputs` or a samples x features array).

        ``val`` (labelled held-out ID data) and ``ood_val`` (outliers for tuning) are used by detectors that declare
        ``Need.VALIDATION`` / ``Need.OOD_VALIDATION`` and ignored by the others.
        """
        train = as_outputs(train, labels=y, name="train")
        self._check_params()
        self._check_inputs(train, fitting=True)
        self._reset_fitted()
        if self.needs & HELD_OUT:
            val = None if val is None else as_outputs(val, name="val")
            ood_val = None if ood_val is None else as_outputs(ood_val, name="ood_val")
            self._fit(train, val, ood_val)
        else:
            self._fit(train)
        self._check_reserved()
        self.input_dims_ = self._input_dims(train)
        self.input_range_ = {part: _max_abs(values) for part, values in self._arrays(train).items()}
        return self

    def _reset_fitted(self) -> None:
        """Refitting starts from a clean slate: no stale threshold or fitted state survives."""
        for key in [k for k in vars(self) if k.endswith("_")]:
            delattr(self, key)

    def _check_reserved(self) -> None:
        clash = RESERVED & set(vars(self))
        if clash:
            raise TypeError(f"{type(self).__qualname__}._fit set {sorted(clash)}, which the Detector base class "
                            "owns; store the detector's own state under another name")

    def score(self, x: Outputs | np.ndarray) -> np.ndarray:
        """One float64 per sample; higher means more out-of-distribution."""
        if not hasattr(self, "input_dims_"):
            raise NotFittedError(f"{self.name or type(self).__name__} is not fitted: call fit(train) first")
        x = as_outputs(x, name="test")
        self._check_inputs(x, fitting=False)
        self._check_dims(x)
        self._warn_saturated(x)
        scores = np.asarray(self._score(x), dtype=np.float64)
        if scores.shape != (len(x),):
            raise RuntimeError(f"{self.name}: _score returned shape {scores.shape} for {len(x)} samples")
        if not np.isfinite(scores).all():
            bad = int((~np.isfinite(scores)).sum())
            raise FloatingPointError(f"{self.name}: {bad} of {len(x)} scores on {x.name!r} are NaN or inf")
        return scores

    def decision_function(self, x: Outputs | np.ndarray) -> np.ndarray:
        """PyOD's name for :meth:`score` (higher = more anomalous)."""
        return self.score(x)

    def _fit(self, train: Outputs) -> None:
        """Learn fitted state (attributes ending in ``_``). Stateless detectors keep this default."""

    def _score(self, x: Outputs) -> np.ndarray:
        raise NotImplementedError

    def _check_params(self) -> None:
        """Validate hyperparameters at ``fit`` time; subclasses raise ``ValueError`` naming the fix."""

    # -- thresholding (shared by all detectors) -----------------------------------------------------------
    def calibrate(self, id_val: Outputs | np.ndarray, keep: float = 0.95) -> "Detector":
        """Set ``threshold_`` to the smallest ID validation score with at least ``keep`` of them at or below it.

        The one threshold rule of :func:`oodscope.thresholds.threshold_for_keep` (also behind ``fpr_at_tpr``):
        ``predict`` then accepts at least ``keep`` of ``id_val`` (more only where scores tie at the threshold),
        and the share of an OOD set it accepts is exactly that set's FPR at TPR = ``keep``.
        """
        from ..thresholds import threshold_for_keep

        self.threshold_ = threshold_for_keep(self.score(id_val), keep)
        return self

    def predict(self, x: Outputs | np.ndarray) -> np.ndarray:
        """``True`` where a sample is flagged out-of-distribution (score above ``threshold_``)."""
        from ..thresholds import flag

        if not hasattr(self, "threshold_"):
            raise NotFittedError(f"{self.name}: no threshold; call calibrate(id_val) after fit")
        return flag(self.score(x), self.threshold_)

    # -- input checks ------------------------------------------------------------------------------------
    def _check_inputs(self, data: Outputs, fitting: bool) -> None:
        if len(data) == 0:
            raise ValueError(f"{self.name}: dataset {data.name!r} is empty")
        for need in self.needs - HELD_OUT:
            if need is Need.LABELS and not fitting:
                continue
            if need is Need.LAYERS:
                for layer in self.layer_names():
                    data.layer(layer, who=self.name)
                continue
            data.get(need, who=self.name)
        if fitting and Need.LABELS in self.needs:
            self._check_labels(data)
        if fitting and type(self)._fit is not Detector._fit:
            self._check_not_degenerate(data)
        if Need.HEAD in self.needs and Need.FEATURES in self.needs:
            head_dim, feat_dim = data.head.W.shape[1], data.features.shape[1]
            if head_dim != feat_dim:
                raise ValueError(f"{self.name}: head W has {head_dim} inputs but features of {data.name!r} have "
                                 f"{feat_dim} dimensions; pass the head of the layer that consumes these features")

    def _check_labels(self, data: Outputs) -> None:
        labels = np.asarray(data.labels)
        if labels.dtype.kind not in "iu":
            raise ValueError(f"{self.name}: training labels of {data.name!r} must be integer class indices, got "
                             f"dtype {labels.dtype}")
        if (labels < 0).any():
            raise ValueError(f"{self.name}: training labels of {data.name!r} contain negative (OOD) labels; "
                             "fit on in-distribution data only")
        n_classes = (data.head.n_classes if data.head is not None
                     else data.logits.shape[1] if data.logits is not None and data.logits.ndim == 2 else None)
        if n_classes is not None and labels.max() >= n_classes:
            raise ValueError(f"{self.name}: training label {int(labels.max())} of {data.name!r} is out of range: "
                             f"the classifier has {n_classes} classes (labels 0..{n_classes - 1})")

    def _arrays(self, data: Outputs) -> dict[str, np.ndarray]:
        """The arrays this detector reads from ``data`` (logits, features, layers, raw inputs for a re-run)."""
        arrays = {}
        for need in (Need.LOGITS, Need.FEATURES):
            if need in self.needs and data.get(need) is not None:
                arrays[need.value] = data.get(need)
        if Need.LAYERS in self.needs:
            arrays.update({f"layer {n!r}": data.layers[n] for n in self.layer_names() if n in data.layers})
        if Need.MODEL in self.needs and data.source is not None:
            from ..extraction.outputs import _raw_arrays

            arrays.update({f"raw inputs[{i}]": a for i, a in enumerate(_raw_arrays(data.source.inputs))
                           if a.dtype.kind in "fiu" and len(a) == len(data)})
        return arrays

    def _check_not_degenerate(self, data: Outputs) -> None:
        if len(data) < 2:
            raise ValueError(f"{self.name}: fit needs at least 2 training samples, {data.name!r} has {len(data)}")
        arrays = self._arrays(data)
        if arrays and all(_rows_identical(values) for values in arrays.values()):
            raise ValueError(f"{self.name}: all {len(data)} training samples of {data.name!r} are identical "
                             f"({', '.join(arrays)}); the detector has no spread to learn from")

    def _warn_saturated(self, data: Outputs) -> None:
        import warnings

        for part, values in self._arrays(data).items():
            reference = getattr(self, "input_range_", {}).get(part)
            if reference is None or values.dtype.kind not in "fc" or values.size == 0:
                continue
            count = int((_row_max_abs(values) > SATURATION * max(reference, 1e-12)).sum())
            if count:
                warnings.warn(f"{self.name}: {count} of {len(values)} rows of {part} of {data.name!r} exceed the "
                              f"training data's magnitude ({reference:.3g}) more than {SATURATION:.0e} times; their "
                              "scores saturate and may not rank them", SaturationWarning, stacklevel=3)

    def layer_names(self) -> list[str]:
        """Intermediate layers this detector reads (detectors that need layers take a ``layers`` parameter)."""
        return list(getattr(self, "layers", None) or [])

    def _input_dims(self, data: Outputs) -> dict[str, tuple[int, ...]]:
        dims = {}
        for need in (Need.LOGITS, Need.FEATURES):
            if need in self.needs:
                dims[need.value] = data.get(need).shape[1:]
        if Need.LAYERS in self.needs:
            dims.update({f"layer {n!r}": data.layers[n].shape[1:] for n in self.layer_names()})
        return dims

    def _check_dims(self, data: Outputs) -> None:
        for key, dims in self._input_dims(data).items():
            if dims != self.input_dims_[key]:
                raise ValueError(f"{self.name}: {key} of {data.name!r} have shape {dims} per sample, "
                                 f"but the detector was fitted on {self.input_dims_[key]}")

    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to one file, read by ``oodscope.load(path)`` (:mod:`oodscope.persistence`)."""
        from ..persistence import save

        return save(self, path)


def configuration_label(estimator: BaseEstimator) -> str:
    """``name(param=value, ...)`` with the parameters that differ from the ``__init__`` defaults."""
    import inspect

    signature = inspect.signature(type(estimator).__init__).parameters
    changed = {k: v for k, v in estimator.get_params(deep=False).items()
               if k not in signature or not _same(v, signature[k].default)}
    name = getattr(estimator, "name", "") or type(estimator).__name__
    return name + ("(" + ", ".join(f"{k}={_short(v)}" for k, v in changed.items()) + ")" if changed else "")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    try:
        return bool(a == b) and type(a) is type(b) or (a is b)
    except Exception:
        return a is b


def _short(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array{value.shape}"
    text = repr(value)
    return text if len(text) <= 40 else f"<{type(value).__name__}>"


def _row_max_abs(values: np.ndarray, elements: int = 1 << 24) -> np.ndarray:
    """``max |x|`` of every row, in row blocks of about ``elements`` values (no full-size copy of a large bank)."""
    flat = values.reshape(len(values), -1)
    rows = max(1, elements // max(1, flat.shape[1]))
    return np.concatenate([np.abs(flat[start:start + rows]).max(axis=1) for start in range(0, len(flat), rows)])


def _max_abs(values: np.ndarray) -> float | None:
    if values.dtype.kind not in "fciu" or values.size == 0:
        return None
    return float(_row_max_abs(values).max())


def _rows_identical(values: np.ndarray, block: int = 1024) -> bool:
    """Whether every row equals the first (the first block is checked first, so real data returns fast)."""
    flat = values.reshape(len(values), -1)
    first = flat[0]
    return all(bool((flat[start:start + block] == first).all()) for start in range(0, len(flat), block))
