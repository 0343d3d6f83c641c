"""WinCLIP: zero-shot anomaly classification and segmentation with compositional prompts and CLIP windows.

Jeong, Zou, Kim, Zhang, Ravichandran & Dabeer, "WinCLIP: Zero-/Few-Shot Anomaly Classification and
Segmentation", CVPR 2023: zero-shot ``winclip`` and few-shot ``winclip_plus``.

* **Compositional prompt ensemble** (Sec. 4.1): state words for normal (``"{}"``, ``"flawless {}"``, ``"perfect
  {}"``, ``"unblemished {}"``, ``"{} without flaw"``, ``"{} without defect"``, ``"{} without damage"``) and
  anomalous (``"damaged {}"``, ``"broken {}"``, ``"{} with flaw"``, ``"{} with defect"``, ``"{} with
  damage"``) objects, filled with ``object_name``, each put into the 21 templates of :data:`TEMPLATES`. The text
  embedding of each state, ``g_n`` and ``g_a``, is the mean of its normalised prompt embeddings, normalised.
* **Classification** (Eq. 1): ``ascore_0(f) = exp(<f, g_a> / T) / (exp(<f, g_n> / T) + exp(<f, g_a> / T))`` of a
  normalised image (or window) embedding ``f``. The image score is ``ascore_0`` of the whole image.
* **Segmentation** (Sec. 4.2): windows of ``k x k`` patches (``scales = (2, 3)``, the paper's small and mid
  scales on a ViT patch grid) slide with stride 1 over the grid; each window's embedding is the class token of
  the ViT fed with the class token and the window's patch tokens only (:mod:`oodscope.vlm.backbone`). Each
  patch gets the harmonic mean of ``ascore_0`` over the windows that contain it (Eq. 3,
  ``M(j) = (1/|U_j| sum_{u in U_j} 1/ascore_0(u))^-1``); the maps of the scales and the image-level score (a
  constant map) are averaged, as in anomalib's re-implementation (the authors released no code), then
  upsampled bilinearly to the input resolution.

Defaults: ``T = 0.07`` (anomalib's value; the image score's ranking does not depend on it, the map's does);
WinCLIP's backbone is open_clip's ``ViT-B-16-plus-240`` (``laion400m_e32``, a 15 x 15 patch grid at 240 px):
``model="open_clip:ViT-B-16-plus-240/laion400m_e32"``. ``fit`` takes defect-free images (the image-AD
contract) and uses them only to fix the image size: the method is zero-shot.

**WinCLIP+** (``winclip_plus``, Sec. 4.3): the defect-free training images are the ``k`` normal reference shots.
Their window embeddings at each scale and their patch tokens (the last block's tokens after the final layer
norm, unprojected, as anomalib's re-implementation reads open_clip's output tokens) form reference memories; a
query window or patch scores ``min_r (1 - cos(f, r)) / 2`` against its memory, window scores go to patches by
the same harmonic aggregation, and the few-shot map is the mean of the patch-level map and the window-scale
maps. The final map is ``(zero-shot map + few-shot map) / 2`` and the image score ``(ascore_0 + max of the
few-shot map) / 2``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..imagead.base import ImageDetector
from .base import l2_normalise, softmax
from .backbone import resolve_clip

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.", "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.",
    "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
    "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)


def state_prompts(states: Sequence[str], object_name: str, templates: Sequence[str] = TEMPLATES) -> list[str]:
    """Every state word filled with ``object_name`` inside every template (states outer, templates inner)."""
    return [template.format(state.format(object_name)) for state in states for template in templates]


HARMONIC_FLOOR = 1e-12


def sliding_windows(grid: tuple[int, int], size: int, stride: int = 1) -> np.ndarray:
    """``(W, h*w)`` boolean masks of the ``size x size`` windows of a row-major patch grid, stride ``stride``."""
    h, w = grid
    if size > min(h, w):
        raise ValueError(f"winclip: a window of {size} x {size} patches does not fit the {h} x {w} patch grid")
    masks = []
    for top in range(0, h - size + 1, stride):
        for left in range(0, w - size + 1, stride):
            mask = np.zeros((h, w), dtype=bool)
            mask[top:top + size, left:left + size] = True
            masks.append(mask.reshape(-1))
    return np.stack(masks)


def harmonic_aggregation(window_scores: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """``(N, P)``: per patch, the harmonic mean of the scores ``(N, W)`` of the windows ``(W, P)`` covering it."""
    cover = windows.astype(np.float64)
    # a score of 0 (a window equal to a reference shot) makes the harmonic mean 0: clamped at 1e-12, no 1/0
    return cover.sum(axis=0) / ((1.0 / np.maximum(window_scores, HARMONIC_FLOOR)) @ cover)


class WinCLIP(ImageDetector):
    """Zero-shot WinCLIP: compositional prompts, window scores harmonically aggregated (see module docstring)."""

    name = "winclip"
    needs_clip = True  # the model parameter has no default: `oodscope ad --detectors all` leaves it out without one
    grid = {"temperature": [0.01, 0.07], "scales": [(2, 3), (2,), (3,)]}

    def __init__(self, model=None, object_name: str = "object", scales: Sequence[int] = (2, 3),
                 temperature: float = 0.07, device: str = "cpu"):
        self.model = model
        self.object_name = object_name
        self.scales = scales
        self.temperature = temperature
        self.device = device

    def _check_params(self) -> None:
        if not isinstance(self.object_name, str) or not self.object_name.strip():
            raise ValueError(f"{self.name}: object_name must be a non-empty string such as 'bottle', "
                             f"got {self.object_name!r}")
        if not self.scales or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
                                  for s in self.scales):
            raise ValueError(f"{self.name}: scales must be window sizes in patches (positive integers), "
                             f"got {self.scales!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"{self.name}: temperature must be > 0, got {self.temperature!r}")

    def clip(self):
        from ..extraction.extract import resolve_device

        return resolve_clip(self.model, device=str(resolve_device(self.device)))

    def _device(self) -> str:
        from ..extraction.extract import resolve_device

        return str(resolve_device(self.device))

    def _fit(self, images: np.ndarray) -> None:
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"{self.name}: images must be square (CLIP crops the centre), got "
                             f"{images.shape[2]} x {images.shape[3]}; resize them (load_mvtec(size=...))")
        clip = self.clip()
        for size in self.scales:
            sliding_windows(clip.grid, int(size))  # a scale larger than the grid fails here, at fit
        embeddings = []
        for states in (NORMAL_STATES, ANOMALOUS_STATES):
            prompts = l2_normalise(clip.encode_texts(state_prompts(states, self.object_name.strip()),
                                                     device=self._device(), name="winclip-prompts"))
            embeddings.append(prompts.mean(axis=0))
        self.state_embeddings_ = l2_normalise(np.stack(embeddings))  # (2, D): normal, anomalous

    def _ascore(self, embeddings: np.ndarray) -> np.ndarray:
        return softmax(l2_normalise(embeddings) @ self.state_embeddings_.T / self.temperature, axis=-1)[..., 1]

    def _predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        clip = self.clip()
        device = self._device()
        global_, _ = clip.encode_images(images, device=device, name="winclip-images", patches=False)
        image_scores = self._ascore(global_)
        h, w = clip.grid
        maps = [np.repeat(image_scores[:, None], h * w, axis=1)]
        for size in self.scales:
            windows = sliding_windows(clip.grid, int(size))
            window_scores = self._ascore(clip.encode_windows(images, windows, device=device,
                                                             name=f"winclip-windows{size}"))
            maps.append(harmonic_aggregation(window_scores, windows))
        grid_map = torch.from_numpy(np.mean(maps, axis=0).reshape(len(images), 1, h, w))
        full = nn.functional.interpolate(grid_map, size=images.shape[2:], mode="bilinear", align_corners=False)
        return image_scores, full[:, 0].numpy()


def association(query: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """``min_r (1 - cos(q, r)) / 2`` of every query row ``(..., D)`` against the memory rows ``(R, D)``."""
    similarity = l2_normalise(query) @ l2_normalise(memory).T
    return np.clip(1.0 - similarity.max(axis=-1), 0.0, 2.0) / 2.0  # round-off can put cos a hair above 1


class WinCLIPPlus(WinCLIP):
    """Few-shot WinCLIP+: the zero-shot scores plus reference association with the normal shots (module docstring)."""

    name = "winclip_plus"

    def _fit(self, images: np.ndarray) -> None:
        super()._fit(images)
        clip, device = self.clip(), self._device()
        tokens = clip.encode_tokens(images, device=device, name="winclip-reference-tokens")
        self.patch_memory_ = tokens.reshape(-1, tokens.shape[-1])
        memories = []
        for size in self.scales:
            windows = clip.encode_windows(images, sliding_windows(clip.grid, int(size)), device=device,
                                          name=f"winclip-reference-windows{size}")
            memories.append(windows.reshape(-1, windows.shape[-1]))
        self.window_memory_ = memories

    def _predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        clip, device = self.clip(), self._device()
        zero_scores, zero_map = super()._predict(images)
        h, w = clip.grid
        maps = [association(clip.encode_tokens(images, device=device, name="winclip-tokens"), self.patch_memory_)]
        for size, memory in zip(self.scales, self.window_memory_):
            windows = sliding_windows(clip.grid, int(size))
            embeddings = clip.encode_windows(images, windows, device=device, name=f"winclip-windows{size}")
            maps.append(harmonic_aggregation(association(embeddings, memory), windows))
        grid_map = torch.from_numpy(np.mean(maps, axis=0).reshape(len(images), 1, h, w))
        few = nn.functional.interpolate(grid_map, size=images.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        few = few.numpy()
        return (zero_scores + few.reshape(len(images), -1).max(axis=1)) / 2.0, (zero_map + few) / 2.0
