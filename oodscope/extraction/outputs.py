"""What a detector consumes: the model outputs of one dataset, computed once.

:class:`Outputs` is the single currency between extraction and detectors. It holds the logits, penultimate
features, labels and named intermediate activations of one dataset, plus the classifier head ``W, b``.
Tabular data (anomaly detection) is just ``Outputs(features=X)``; :func:`as_outputs` does that wrapping so
every detector accepts a plain array too.

Methods that must run the network again (input perturbation, gradients) find the model and the raw inputs in
:attr:`Outputs.source`; cached outputs have none, and such a detector says so (see ``Need.MODEL``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


class Need(str, enum.Enum):
    """What a detector needs from :class:`Outputs`."""

    LOGITS = "logits"
    FEATURES = "features"
    HEAD = "head"
    LAYERS = "layers"
    MODEL = "model"
    LABELS = "labels"
    VALIDATION = "validation"  # held-out labelled ID data, given as fit(train, val=...)
    OOD_VALIDATION = "ood_validation"  # outliers for tuning a combination, given as fit(train, ood_val=...)
    OUTLIERS = "outliers"  # auxiliary outliers for training-time objectives (oodscope.training)


@dataclass(frozen=True)
class Head:
    """The final linear layer ``logits = features @ W.T + b`` (``W``: classes x features)."""

    W: np.ndarray
    b: np.ndarray

    def __post_init__(self) -> None:
        if self.W.ndim != 2 or self.b.shape != (self.W.shape[0],):
            raise ValueError(
                f"head W must be (classes, features) and b (classes,); got W{self.W.shape}, b{self.b.shape}"
            )

    @property
    def n_classes(self) -> int:
        return int(self.W.shape[0])


@dataclass
class ModelSource:
    """How to run the network again on this dataset (for ODIN-style perturbation or gradients).

    ``inputs`` are the raw (un-preprocessed) inputs, ``preprocess`` maps a raw batch tensor to the model input,
    ``head`` names the classifier head module (its input is the penultimate feature). See
    :mod:`oodscope.extraction.rerun` for the helpers that use it.
    """

    model: Any
    inputs: Any
    preprocess: Callable | None = None
    device: str = "cpu"
    batch_size: int = 256
    head: str | None = None


@dataclass
class Outputs:
    """Model outputs for one dataset. Arrays are ``(N, ...)``; missing parts are ``None``."""

    logits: np.ndarray | None = None
    features: np.ndarray | None = None
    labels: np.ndarray | None = None
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    head: Head | None = None
    name: str = "data"
    source: ModelSource | None = None

    def __post_init__(self) -> None:
        sizes = {k: len(v) for k, v in self._arrays().items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"dataset {self.name!r}: arrays disagree on the number of samples: {sizes}")

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"logits": self.logits, "features": self.features, "labels": self.labels}
        arrays.update({f"layers[{k}]": v for k, v in self.layers.items()})
        return {k: v for k, v in arrays.items() if v is not None}

    def __len__(self) -> int:
        arrays = self._arrays()
        return len(next(iter(arrays.values()))) if arrays else 0

    # -- checked access -----------------------------------------------------------------------------------
    def get(self, need: Need | str, who: str = "detector") -> Any:
        """Return the part a detector needs, checked: present, non-empty and finite."""
        need = Need(need)
        value = {
            Need.LOGITS: self.logits,
            Need.FEATURES: self.features,
            Need.HEAD: self.head,
            Need.LABELS: self.labels,
            Need.LAYERS: self.layers or None,
            Need.MODEL: self.source,
        }[need]
        if value is None:
            raise ValueError(f"{who} needs {need.value} but dataset {self.name!r} has none{_hint(need)}")
        if isinstance(value, np.ndarray):
            what = f"{need.value} of dataset {self.name!r}"
            if need in (Need.LOGITS, Need.FEATURES) and value.ndim < 2:
                raise ValueError(f"{who}: {what} have shape {value.shape}; expected (samples, "
                                 f"{'classes' if need is Need.LOGITS else 'dimensions'}), e.g. x.reshape(-1, 1) "
                                 "for one column")
            if need is Need.LABELS and value.ndim != 1:
                raise ValueError(f"{who}: {what} have shape {value.shape}; expected one integer label per sample")
            check_finite(value, what)
            if len(value) == 0:
                raise ValueError(f"dataset {self.name!r} is empty")
        elif need is Need.HEAD:
            check_finite(value.W, f"head W given with dataset {self.name!r}")
            check_finite(value.b, f"head b given with dataset {self.name!r}")
        elif need is Need.MODEL:
            for array in _raw_arrays(value.inputs):
                check_finite(array, f"raw inputs of dataset {self.name!r} (the model re-runs on them)")
        return value

    def layer(self, name: str, who: str = "detector") -> np.ndarray:
        if name not in self.layers:
            raise ValueError(
                f"{who} needs layer {name!r} but dataset {self.name!r} has layers {sorted(self.layers)}; "
                f"extract it with extract(..., layers=[{name!r}])"
            )
        values = self.layers[name]
        if values.ndim < 2:
            raise ValueError(f"{who}: layer {name!r} of dataset {self.name!r} has shape {values.shape}; expected "
                             "(samples, channels, ...)")
        check_finite(values, f"layer {name!r} of dataset {self.name!r}")
        return values

    def subset(self, index: np.ndarray | slice, name: str | None = None) -> "Outputs":
        """Rows ``index`` of every array; the head is shared, the model source is dropped."""
        pick = (lambda a: None if a is None else a[index])
        return Outputs(
            logits=pick(self.logits), features=pick(self.features), labels=pick(self.labels),
            layers={k: v[index] for k, v in self.layers.items()}, head=self.head,
            name=name or self.name,
        )


def _raw_arrays(inputs: Any) -> list[np.ndarray]:
    """The numpy arrays among a model source's raw inputs (an array, or a tuple/list of them)."""
    parts = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return [part for part in parts if isinstance(part, np.ndarray)]


def _hint(need: Need) -> str:
    if need is Need.MODEL:
        return ": this detector runs the network again; pass the outputs of oodscope.extract(...) made in this session (cached outputs carry no model)"
    if need is Need.HEAD:
        return ": extract from a model whose last layer is nn.Linear, or pass head=Head(W, b)"
    if need is Need.LABELS:
        return ": fit needs the in-distribution training labels"
    return ""


def check_finite(values: np.ndarray, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` and how many rows hold NaN or inf."""
    if values.dtype.kind not in "fc":
        return
    if values.ndim == 0:
        bad = int(not np.isfinite(values))
    else:   # in row chunks of ~16M values, so a large bank (or a memmap) gets no full-size boolean copy; the
        # reduction runs over the trailing axes as they lie in memory (a reshape would copy channels-last maps)
        rows = max(1, (1 << 24) // max(1, values[:1].size))
        axes = tuple(range(1, values.ndim))
        bad = sum(int(len(block) - np.count_nonzero(np.isfinite(block).all(axis=axes)))
                  for block in (values[start:start + rows] for start in range(0, len(values), rows)))
    if bad:
        raise ValueError(f"{what}: {bad} of {len(values)} rows contain NaN or inf")


def as_outputs(data: Outputs | np.ndarray | Any, labels: np.ndarray | None = None, name: str = "data") -> Outputs:
    """Wrap a plain ``(N, D)`` array (tabular data, precomputed features) as :class:`Outputs`."""
    if isinstance(data, Outputs):
        if labels is not None:
            raise ValueError("pass labels inside Outputs, not beside it")
        return data
    array = np.asarray(data)
    if array.ndim != 2:
        raise ValueError(f"dataset {name!r}: expected a 2-d array (samples x features), got shape {array.shape}")
    if array.dtype.kind not in "fciu":
        raise ValueError(f"dataset {name!r}: expected numbers, got dtype {array.dtype}")
    return Outputs(features=array, labels=None if labels is None else np.asarray(labels), name=name)
