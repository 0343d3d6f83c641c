"""The zero-shot vision-language extension of the detector contract (family ``vlm``).

A :class:`VLMDetector` is a :class:`~oodscope.detectors.base.Detector` (parameters in ``__init__``, fitted state
in attributes ending in ``_``, ``calibrate`` / ``predict``, ``save`` / ``oodscope.load``) whose

* ``fit(classes, images=None)`` takes the in-distribution class names (at least two, distinct, non-empty
  strings) and optionally ID images (checked, otherwise unused by the zero-shot methods here); it encodes the
  prompts ``prompt.format(name)`` with the CLIP text tower;
* ``score(images)`` takes ``(N, C, H, W)`` images (C = 1 or 3, float in [0, 1] or uint8; an
  :class:`~oodscope.data.mvtec.ImageSet` works too), resized by CLIP's preprocessing, and returns one float per
  image, higher = more OOD.

``model`` is a :class:`~oodscope.vlm.backbone.ClipBackbone`, a local Hugging Face CLIP folder or
``open_clip:ARCH/PRETRAINED`` (see :func:`~oodscope.vlm.backbone.load_clip`). Text and image embeddings go
through the extraction cache of the backbone.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np

from ..detectors.base import Detector, NotFittedError
from ..extraction.outputs import Need  # noqa: F401 - for subclasses
from .backbone import resolve_clip


def class_names(classes: Any, who: str) -> list[str]:
    """The ID class names as a list of distinct, non-empty strings (a ``ValueError`` naming the fix otherwise)."""
    if isinstance(classes, (str, bytes)):
        raise ValueError(f"{who}: pass the ID class names as a list of strings, not a single string {classes!r}")
    if isinstance(classes, np.ndarray) and classes.ndim != 1:
        raise ValueError(f"{who}: class names must be a flat list, got an array of shape {classes.shape}")
    try:
        names = list(classes)
    except TypeError:
        raise ValueError(f"{who}: fit takes the ID class names (a list of strings), got {type(classes).__name__}"
                         ) from None
    if not names:
        raise ValueError(f"{who}: the list of ID class names is empty; pass at least two class names")
    wrong = [i for i, n in enumerate(names) if not isinstance(n, (str, np.str_))]
    if wrong:
        raise ValueError(f"{who}: class names at positions {wrong[:8]} are not strings "
                         f"({type(names[wrong[0]]).__name__}); pass the names, not label indices")
    names = [str(n).strip() for n in names]
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"{who}: class names at positions {empty[:8]} are empty")
    if len(names) < 2:
        raise ValueError(f"{who}: one ID class ({names[0]!r}) makes every softmax 1; pass at least two class names")
    counts: dict[str, int] = {}
    for n in names:
        counts[n.lower()] = counts.get(n.lower(), 0) + 1
    duplicates = sorted(n for n, c in counts.items() if c > 1)
    if duplicates:
        raise ValueError(f"{who}: duplicate class names {duplicates[:8]}; each ID class must be named once")
    return names


def check_prompt(prompt: Any, who: str) -> None:
    if not isinstance(prompt, str) or prompt.count("{}") != 1:
        raise ValueError(f"{who}: prompt must be a string with one '{{}}' for the class name, e.g. "
                         f"'a photo of a {{}}.', got {prompt!r}")


def check_images(images: Any, who: str, min_side: int = 1) -> np.ndarray:
    """``(N, 3, H, W)`` float32 in [0, 1] (the image-AD rules of :func:`oodscope.imagead.base.as_images`)."""
    from ..imagead.base import as_images

    images = as_images(images, who)
    if min(images.shape[2:]) < min_side:
        raise ValueError(f"{who}: images of {images.shape[2]} x {images.shape[3]} pixels are smaller than one "
                         f"CLIP patch ({min_side} pixels)")
    return images


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    if not np.all(norm > 0):
        raise FloatingPointError("an embedding has norm 0; the CLIP model produced a degenerate embedding")
    return x / norm


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


class VLMDetector(Detector):
    """Base class of zero-shot CLIP detectors (see module docstring)."""

    family: ClassVar[str] = "vlm"
    needs: ClassVar[frozenset[Need]] = frozenset()  # images in, no extracted Outputs: the CLIP model is a parameter

    # subclasses with other parameters keep ``model``, ``prompt`` and ``device``
    model: Any
    prompt: str
    device: str

    def clip(self):
        """The :class:`~oodscope.vlm.backbone.ClipBackbone` of the ``model`` parameter."""
        from ..extraction.extract import resolve_device

        return resolve_clip(self.model, device=str(resolve_device(self.device)))

    def _check_params(self) -> None:
        check_prompt(self.prompt, self.name)

    def fit(self, classes: Sequence[str], images: Any = None) -> "VLMDetector":
        """Encode the prompts of the ID ``classes``; ``images`` (ID images) are checked if given."""
        names = class_names(classes, self.name)
        self._check_params()
        if images is not None:
            check_images(images, f"{self.name}: ID images")
        self._reset_fitted()
        clip = self.clip()
        self.classes_ = names
        self.text_embeddings_ = l2_normalise(self._encode_texts(clip, [self.prompt.format(n) for n in names]))
        self._fit_texts(clip)
        self._check_reserved()
        self.input_dims_ = {"classes": (len(names),)}
        return self

    def _encode_texts(self, clip, texts: list[str], name: str = "prompts") -> np.ndarray:
        from ..extraction.extract import resolve_device

        return clip.encode_texts(texts, device=str(resolve_device(self.device)), name=name)

    def _fit_texts(self, clip) -> None:
        """More fitted text state (negative labels, ...) after ``classes_`` / ``text_embeddings_``."""

    def score(self, x: Any) -> np.ndarray:
        """One float64 per image; higher = more OOD."""
        if not hasattr(self, "input_dims_"):
            raise NotFittedError(f"{self.name} is not fitted: call fit(class_names) first")
        from ..extraction.extract import resolve_device

        clip = self.clip()
        patch = clip.image_size // max(clip.grid)
        images = check_images(x, f"{self.name}: test images", min_side=patch)
        global_, patches = clip.encode_images(images, device=str(resolve_device(self.device)),
                                              patches=self.uses_patches)
        scores = np.asarray(self._score_embeddings(l2_normalise(global_),
                                                   None if patches is None else l2_normalise(patches)),
                            dtype=np.float64)
        if scores.shape != (len(images),) or not np.isfinite(scores).all():
            raise FloatingPointError(f"{self.name}: scores are not {len(images)} finite values")
        return scores

    uses_patches: ClassVar[bool] = False

    def _score_embeddings(self, image: np.ndarray, patches: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _score(self, x: Any) -> np.ndarray:  # pragma: no cover - score is overridden
        return self.score(x)
