"""The image anomaly-detection extension of the detector contract, and the feature backbone it shares.

An :class:`ImageDetector` is a :class:`~oodscope.detectors.base.Detector` (same parameters, ``fit``/``score``,
``calibrate``/``predict``) whose inputs are images rather than extracted outputs:

* ``fit(images)``: defect-free images only (an :class:`~oodscope.data.mvtec.ImageSet`, or an ``(N, C, H, W)``
  array, C = 1 or 3, float in [0, 1] or uint8);
* ``score(images)``: one image score per image, higher = more anomalous;
* ``anomaly_map(images)``: ``(N, H, W)`` float64 at the input resolution (``None`` for detectors with
  ``localises = False``); ``score_and_map`` gives both from one pass.

Image detectors are registered in the one detector registry under ``family = "image"``; :func:`available`,
:func:`get` and :func:`create` here are that registry restricted to the family.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from ..detectors import registry
from ..detectors.base import Detector, NotFittedError
from ..extraction.outputs import Need

RANGE_SLACK = 1e-3  # float images may overshoot [0, 1] by resampling round-off, not more
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def available() -> list[str]:
    """Names of the image anomaly detectors."""
    return registry.available(family="image")


def get(name: str) -> type["ImageDetector"]:
    """The image detector class registered under ``name``."""
    names = available()
    key = name.lower().replace("-", "_")
    if key not in names:
        raise registry.UnknownDetectorError(
            f"unknown image anomaly detector {name!r}{registry.close_names_hint(key, names)} "
            f"(available: {', '.join(names)})")
    return registry.get(key)


def create(name: str, **params: Any) -> "ImageDetector":
    return get(name)(**params)


def as_images(data: Any, name: str = "images") -> np.ndarray:
    """``(N, 3, H, W)`` float32 in [0, 1] from an ImageSet or array (uint8 scaled, 1 channel copied to 3)."""
    images = getattr(data, "images", data)
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected images (N, C, H, W) with C = 1 or 3, got shape {images.shape}")
    if len(images) == 0:
        raise ValueError(f"{name}: no images")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif images.dtype.kind != "f":
        raise ValueError(f"{name}: expected float images in [0, 1] or uint8, got dtype {images.dtype}")
    images = images.astype(np.float32, copy=False)
    if not np.isfinite(images).all():
        raise ValueError(f"{name}: images contain NaN or inf")
    low, high = float(images.min()), float(images.max())
    if low < -RANGE_SLACK or high > 1.0 + RANGE_SLACK:
        hint = "; divide 0..255 values by 255 (or pass uint8)" if high <= 255.0 + RANGE_SLACK and low >= 0 else ""
        raise ValueError(f"{name}: float images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]{hint}")
    if images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    return images


class Backbone:
    """A frozen feature extractor: a torch module and the names of the layers whose outputs to return.

    ``model="efficientnet_lite0"`` (default) is the ImageNet EfficientNet-Lite0 of
    :mod:`oodscope.models.efficientnet_lite`, with its stage names (``stage1`` ... ``stage7``, ``head``) and
    input normalisation. Any other ``nn.Module`` works too: ``layers`` are then names from
    ``model.named_modules()`` read with forward hooks, and images are normalised with ``mean``/``std``
    (ImageNet's by default).

    ``memoize=True`` keeps every computed layer output per image array (keyed by the array's identity), so that
    several detectors sharing this backbone on the same images run the network once per layer set.
    """

    def __init__(self, model: str | nn.Module = "efficientnet_lite0", mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, device: str = "cpu", batch_size: int = 16,
                 memoize: bool = False):
        if isinstance(model, str):
            if model != "efficientnet_lite0":
                raise ValueError(f"unknown backbone {model!r}: pass 'efficientnet_lite0' or a torch nn.Module")
            from ..models.efficientnet_lite import MEAN, STD, efficientnet_lite0

            with torch.random.fork_rng(devices=[]):  # building the modules draws initial weights: not from the caller's RNG
                model = efficientnet_lite0()
            mean, std = mean or MEAN, std or STD
        self.model = model.eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.mean = torch.tensor(mean or IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std or IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.device, self.batch_size = device, batch_size
        self.memo: dict | None = {} if memoize else None

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.device) - self.mean) / self.std

    def forward(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Features of one batch of [0, 1] images (no gradient bookkeeping unless the caller enables it)."""
        x = self.normalise(x)
        if hasattr(self.model, "forward_features"):
            return self.model.forward_features(x, list(layers))
        modules = dict(self.model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(f"backbone has no layers {missing}; some names it has: {list(modules)[1:12]}")
        found: dict[str, torch.Tensor] = {}
        hooks = [modules[name].register_forward_hook(lambda m, i, o, n=name: found.__setitem__(n, o))
                 for name in layers]
        try:
            self.model(x)
        finally:
            for hook in hooks:
                hook.remove()
        return {name: found[name] for name in layers}

    def batches(self, images: np.ndarray, layers: Sequence[str]):
        """Yield ``(start, features)`` per batch of at most ``batch_size`` images."""
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = torch.from_numpy(images[start:start + self.batch_size])
                if self.memo is None:
                    yield start, self.forward(batch, layers)
                    continue
                key = (id(images), images.shape, start)
                stored = self.memo.setdefault(key, {})
                missing = [name for name in layers if name not in stored]
                if missing:
                    stored.update(self.forward(batch, missing))
                yield start, {name: stored[name] for name in layers}


def resolve_backbone(backbone: str | nn.Module | Backbone, device: str = "cpu") -> Backbone:
    from ..extraction.extract import resolve_device

    return backbone if isinstance(backbone, Backbone) else Backbone(backbone, device=str(resolve_device(device)))


#: maps blurred per convolution call: torch's CPU convolution without oneDNN (float64 maps) unfolds the whole batch
#: into ``N x kernel x H x W`` columns, 10 GiB for 677 maps of 224 x 224 at sigma 4, so the batch is cut in blocks
BLUR_BLOCK = 16


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(N, H, W)`` maps, kernel radius ``4 sigma``, reflect padding; computed in
    blocks of :data:`BLUR_BLOCK` maps, so memory does not grow with ``N`` beyond the output."""
    if sigma <= 0:
        return maps
    if len(maps) > BLUR_BLOCK:
        return torch.cat([_blur_block(maps[i:i + BLUR_BLOCK], sigma) for i in range(0, len(maps), BLUR_BLOCK)])
    return _blur_block(maps, sigma)


def _blur_block(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(int(4 * sigma + 0.5), 1)
    coords = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = maps[:, None]
    pad = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    if pad < radius:  # tiny maps: fall back to replicate padding of the full radius
        x = nn.functional.pad(x, (radius, radius, radius, radius), mode="replicate")
    else:
        x = nn.functional.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))
    x = nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


class ImageDetector(Detector):
    """Base class of image anomaly detectors (see module docstring)."""

    family: ClassVar[str] = "image"
    needs: ClassVar[frozenset[Need]] = frozenset({Need.MODEL})
    localises: ClassVar[bool] = True  # False: image scores only, anomaly_map returns None

    def fit(self, train: Any, y: np.ndarray | None = None) -> "ImageDetector":
        """Learn from defect-free images (labels, if given, must all be 0)."""
        images = as_images(train, f"{self.name}: training images")
        labels = getattr(train, "labels", y)
        if labels is not None and np.any(np.asarray(labels) != 0):
            raise ValueError(f"{self.name}: fit on defect-free images only; {int(np.sum(labels != 0))} training "
                             "images are labelled anomalous")
        self._check_params()
        if len(images) < 2 or (images == images[:1]).all():
            raise ValueError(f"{self.name}: fit needs at least 2 training images that are not all identical, got "
                             f"{len(images)}" + (" identical images" if len(images) > 1 else ""))
        self._reset_fitted()
        self._fit(images)
        self._check_reserved()
        self.input_dims_ = {"image": images.shape[1:]}
        return self

    def _init_networks(self) -> None:
        """Re-create the networks for :func:`oodscope.persistence.load`: ``backbone_`` from the parameter.

        Detectors with networks of their own extend this (calling ``super()._init_networks()``).
        """
        if hasattr(self, "backbone_"):
            self.backbone_ = resolve_backbone(self.backbone, device=getattr(self, "device", "cpu"))

    def score_and_map(self, x: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Image scores ``(N,)`` and anomaly maps ``(N, H, W)`` (``None`` if the method does not localise)."""
        if not hasattr(self, "input_dims_"):
            raise NotFittedError(f"{self.name} is not fitted: call fit(train_images) first")
        images = as_images(x, f"{self.name}: test images")
        if images.shape[1:] != self.input_dims_["image"]:
            raise ValueError(f"{self.name}: test images are {images.shape[1:]} but the detector was fitted on "
                             f"{self.input_dims_['image']}; resize them the same way (load_mvtec(size=...))")
        scores, maps = self._predict(images)
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (len(images),) or not np.isfinite(scores).all():
            raise FloatingPointError(f"{self.name}: image scores are not {len(images)} finite values")
        if maps is not None:
            maps = np.asarray(maps, dtype=np.float64)
            if maps.shape != (len(images), *images.shape[2:]):
                raise RuntimeError(f"{self.name}: anomaly maps have shape {maps.shape}")
        return scores, maps

    def score(self, x: Any) -> np.ndarray:
        return self.score_and_map(x)[0]

    def anomaly_map(self, x: Any) -> np.ndarray | None:
        return self.score_and_map(x)[1]

    def _predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def _score(self, x: Any) -> np.ndarray:  # pragma: no cover - score is overridden
        return self.score(x)
