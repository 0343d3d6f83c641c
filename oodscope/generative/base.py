"""The generative family of the detector contract: density models of the input images.

A :class:`GenerativeDetector` is a :class:`~oodscope.detectors.base.Detector` (parameters, ``fit``/``score``,
``calibrate``/``predict``, ``save``/``load``) whose inputs are **8-bit images**: ``fit(images)`` trains a density
model on ID images, ``score(images)`` gives one float per image, higher = more OOD. Images are uint8
``(N, H, W, C)`` (the ``.npz`` layout) or ``(N, C, H, W)``, or floats in [0, 1] on the 1/255 grid (likelihoods of
8-bit data need the 8-bit values). Images of another size or channel count than the training images, values
outside [0, 1] and NaN are errors.

The four likelihood scores (``pixelcnn_nll``, ``likelihood_ratio``, ``input_complexity``, ``typicality``) take
``model``: ``"pixelcnn"`` (autoregressive, exact discrete likelihood, :mod:`oodscope.generative.pixelcnn`) or
``"realnvp"`` (a normalising flow, dequantised likelihood, :mod:`oodscope.generative.realnvp`). ``hidden`` and
``blocks`` size either network (PixelCNN: channels and masked residual blocks; RealNVP: channels and residual
blocks of each coupling network, with two scales for images whose sides divide by 4).

The detectors of this family share their trained models: a model is keyed by the training images' sha256 and the
model's settings and kept in memory for the process, so the four scores fitted on the same images with the same
settings train one density model (and the likelihood ratio one background model).
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import numpy as np

from ..detectors.base import Detector, NotFittedError
from ..extraction.outputs import Need

#: the density networks the likelihood scores run on
DENSITY_MODELS = ("pixelcnn", "realnvp")
_TRAINED: dict[str, tuple[dict, list[float], list[float]]] = {}  # key -> (state dict, bits/dim, seconds) per epoch


def as_uint8_images(data: Any, who: str) -> np.ndarray:
    """``(N, C, H, W)`` uint8 from uint8 ``NHWC``/``NCHW`` or floats in [0, 1] on the 1/255 grid."""
    images = np.asarray(getattr(data, "images", getattr(data, "inputs", data)))
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"{who}: expected a non-empty batch of images (N, H, W, C) or (N, C, H, W), got shape "
                         f"{images.shape}")
    if images.dtype.kind == "f":
        if not np.isfinite(images).all():
            raise ValueError(f"{who}: images contain NaN or inf")
        low, high = float(images.min()), float(images.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{who}: float images must lie in [0, 1], got [{low:.4g}, {high:.4g}] (or pass uint8)")
        scaled = images * 255.0
        if np.abs(scaled - np.round(scaled)).max() > 1e-3:
            raise ValueError(f"{who}: likelihoods need 8-bit images; these floats are not multiples of 1/255 "
                             "(pass the uint8 images)")
        images = np.round(scaled).astype(np.uint8)
    elif images.dtype != np.uint8:
        raise ValueError(f"{who}: expected uint8 images or floats in [0, 1], got dtype {images.dtype}")
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{who}: expected 1 or 3 channels, got shape {images.shape}")
    return np.ascontiguousarray(images)


class GenerativeDetector(Detector):
    """Base class of the density-model detectors (see module docstring)."""

    family: ClassVar[str] = "generative"
    needs: ClassVar[frozenset[Need]] = frozenset({Need.MODEL})
    trains_network: ClassVar[bool] = True
    takes_images: ClassVar[bool] = True  # fit/score the raw images (the family's feature-space members do not)

    def __init__(self, model: str = "pixelcnn", hidden: int = 64, blocks: int = 5, epochs: int = 3,
                 batch_size: int = 64, lr: float = 1e-3, seed: int = 0, device: str = "cpu"):
        self.model = model
        self.hidden = hidden
        self.blocks = blocks
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        if self.model not in DENSITY_MODELS:
            raise ValueError(f"{self.name}: model must be one of {', '.join(DENSITY_MODELS)}, got {self.model!r}")
        self._check_training_params("hidden", "blocks")

    def _check_training_params(self, *sizes: str) -> None:
        """``sizes``, ``epochs`` and ``batch_size`` integers >= 1 and ``lr > 0`` (every member's common checks)."""
        for name in (*sizes, "epochs", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                raise ValueError(f"{self.name}: {name} must be an integer >= 1, got {value!r}")
        if not float(self.lr) > 0:
            raise ValueError(f"{self.name}: lr must be > 0, got {self.lr!r}")

    # -- the contract on images ---------------------------------------------------------------------------------
    def fit(self, train: Any, y: np.ndarray | None = None) -> "GenerativeDetector":
        images = as_uint8_images(train, f"{self.name}: training images")
        self._check_params()
        if len(images) < 2 or (images == images[:1]).all():
            raise ValueError(f"{self.name}: fit needs at least 2 training images that are not all identical")
        self._reset_fitted()
        self._fit(images)
        self._check_reserved()
        self.input_dims_ = {"image": images.shape[1:]}
        return self

    def score(self, x: Any) -> np.ndarray:
        if not hasattr(self, "input_dims_"):
            raise NotFittedError(f"{self.name} is not fitted: call fit(train_images) first")
        images = as_uint8_images(x, f"{self.name}: test images")
        if images.shape[1:] != tuple(self.input_dims_["image"]):
            raise ValueError(f"{self.name}: images are (C, H, W) = {images.shape[1:]} but the model was trained on "
                             f"{tuple(self.input_dims_['image'])}; resize them the same way")
        scores = np.asarray(self._score(images), dtype=np.float64)
        if scores.shape != (len(images),) or not np.isfinite(scores).all():
            raise FloatingPointError(f"{self.name}: scores are not {len(images)} finite values")
        return scores

    # -- the shared, cached density models --------------------------------------------------------------------
    def _model_settings(self, perturb: float) -> dict[str, Any]:
        return {"model": self.model, "hidden": int(self.hidden), "blocks": int(self.blocks), "epochs": int(self.epochs),
                "batch_size": int(self.batch_size), "lr": float(self.lr), "seed": int(self.seed),
                "perturb": float(perturb)}

    def _density_model(self, images: np.ndarray, perturb: float = 0.0):
        """The density model trained on ``images`` with this detector's settings (once per process and settings)."""
        from ..extraction.extract import resolve_device
        from ._training import train

        import torch

        resolve_device(self.device)  # refused here, also when the trained model is already in the cache
        settings = self._model_settings(perturb)
        key = hashlib.sha256(images.tobytes() + repr((images.shape, sorted(settings.items()))).encode()).hexdigest()
        with torch.random.fork_rng(devices=[]):  # initial weights from the seed, not from the caller's RNG
            torch.manual_seed(int(self.seed))
            model = self._build_network(images.shape[1:])
        if key not in _TRAINED:
            log = train(model, images, epochs=int(self.epochs), batch_size=int(self.batch_size), lr=float(self.lr),
                        seed=int(self.seed), device=self.device, perturb=perturb,
                        desc=f"{self.name}{' background' if perturb else ''}")
            _TRAINED[key] = ({k: v.clone() for k, v in model.state_dict().items()}, log.loss, log.seconds)
        state, bits, seconds = _TRAINED[key]
        model.load_state_dict(state)
        loss_name = getattr(model, "loss_name", "bits_per_dim")
        return model.eval(), {f"train_{loss_name}": list(bits), "train_seconds": list(seconds)}

    def _build_network(self, image_shape: tuple[int, ...]):
        """The untrained network of ``self.model`` for ``(C, H, W)`` images."""
        if self.model == "mae":
            from .mae import MaskedAutoencoder

            return MaskedAutoencoder(int(image_shape[0]), int(image_shape[1]), int(self.patch), int(self.width),
                                     int(self.depth), mask_ratio=float(self.mask_ratio))
        if self.model == "ddpm":
            from .ddpm import DDPM

            return DDPM(int(image_shape[0]), int(self.hidden), int(self.blocks), steps=int(self.diffusion_steps))
        if self.model == "ncsn":
            from .score_network import ScoreNetwork, geometric_sigmas

            sigmas = geometric_sigmas(float(self.sigma_max), float(self.sigma_min), int(self.levels))
            return ScoreNetwork(int(image_shape[0]), int(self.hidden), int(self.blocks), sigmas)
        if self.model == "hvae":
            from .hvae import HierarchicalVAE

            return HierarchicalVAE(int(image_shape[0]), int(self.hidden), int(self.latent))
        if self.model == "realnvp":
            from .realnvp import RealNVP

            height, width = image_shape[1:]
            scales = next(s for s in (2, 1, 0) if height % 2 ** s == 0 and width % 2 ** s == 0)
            return RealNVP(int(image_shape[0]), int(self.hidden), int(self.blocks), scales=scales)
        from .pixelcnn import PixelCNN

        return PixelCNN(int(image_shape[0]), int(self.hidden), int(self.blocks))

    def _new_network(self):
        return self._build_network(tuple(self.input_dims_["image"]))

    def _init_networks(self) -> None:
        """Re-create the networks (architecture only) for :func:`oodscope.persistence.load`."""
        self.network_ = self._new_network().eval()
        if hasattr(self, "background_"):
            self.background_ = self._new_network().eval()

    def _bits_per_dim(self, images: np.ndarray, network=None) -> np.ndarray:
        """Bits/dim of each image; a flow's with the same seeded dequantisation noise for every image."""
        network = network if network is not None else self.network_
        if self.model == "realnvp":
            from .realnvp import evaluate_flow_bits_per_dim, evaluation_noise

            return evaluate_flow_bits_per_dim(network, images, evaluation_noise(images.shape[1:], int(self.seed)))
        from ._training import evaluate_bits_per_dim

        return evaluate_bits_per_dim(network, images)
