"""FiLo: zero-shot anomaly detection with fine-grained anomaly descriptions and position-enhanced prompts.

Gu, Zhu, Zhu, Chen, Li, Tang & Wang, "FiLo: Zero-Shot Anomaly Detection by Fine-Grained Description and
High-Quality Localization", ACM MM 2024 (arXiv 2404.13671); facts and defaults from the paper and the authors'
released code (``models/FiLo.py``, ``models/vv_open_clip/transformer.py``, ``test.py``, ``train.py``).

**What is built** (``filo``, training-free):

* **FG-Des** (fine-grained descriptions, Sec. 3.2): the anomalous state words are ``"abnormal {} with <d>"`` for
  each description ``d`` of the object's category, plus WinCLIP's five generic anomalous states; the normal ones
  are WinCLIP's seven. :data:`DESCRIPTIONS` holds LLM-written lists for the 15 MVTec AD and 12 VisA categories,
  written for oodscope from the category names alone (not the authors' lists; ``pcb1``-``pcb4`` are prompted as
  "pcb", ``macaroni1``/``2`` as "macaroni"); other objects need ``descriptions=`` (a list of anomaly types, e.g. written by an LLM as the paper does).
* **Position-enhanced prompts** (HQ-Loc, Sec. 3.3): each anomalous state gets ``" at <position>"`` for the nine
  positions of :data:`POSITIONS`. The paper picks the position from Grounding DINO's box; without it,
  ``positions=None`` averages all nine (location-agnostic), a tuple restricts them (``("center",)`` is what the
  authors' code uses when Grounding DINO finds no box).
* **Text vectors**: each state word inside each template of :data:`~oodscope.vlm.winclip.TEMPLATES` (WinCLIP's 21,
  standing in for the paper's learnable context ``[V_1 ... V_12]``), normalised, averaged over the normal prompts
  (``g_n``) and over the anomalous prompts of the chosen positions (``g_a``), normalised.
* **Multi-layer patch-text scoring**: patch features of ``layers`` (the authors' ``6 12 18 24`` on ViT-L/14) from
  the dual path (V-V attention without the MLP beside CLIP's blocks, :func:`~oodscope.vlm.anomalyclip.dpam_features`)
  in the last ``dpam_depth`` blocks (default: all but the first 6, the authors' setting), each through the final
  layer norm and the visual projection. Per layer, ``100 cos(patch, [g_n, g_a]) / sqrt(2)`` (the authors divide the
  pair by its joint norm) is upsampled bilinearly (``align_corners=True``) to the model's input size, turned into
  ``S = softmax`` over [normal, anomalous], and ``(S_a - S_n + 1) / 2`` is smoothed with the authors' 3 x 3
  Gaussian (``sigma = 4``); the map is the mean over the layers, resized to the input images.
* **Image score**: ``(p_a + max of the map) / 2`` with ``p_a = softmax(cos(f, [g_n, g_a]) / 0.07)_a`` of CLIP's
  image embedding ``f`` (the probability the authors' classification loss trains; their test script adds the
  raw ``<f, g_a> / sqrt(2)`` instead).

**The trained parts** (``filo_trained``, :class:`FiLoTrained`, trained on ``auxiliary=`` an annotated set):

* prompts ``X_1 ... X_12 <state>.`` and ``X_1 ... X_12 <state> at <position>.`` (no templates; in training of
  the auxiliary set's own category, ``auxiliary_object``, as the authors prompt each image with its class) whose context
  (:class:`ConditionalContext`, one per prompt kind) is shifted per image by a meta-net of the image embedding;
* the raw Q-K tokens of every layer in ``layers`` through one linear decoder each, the raw V-V tokens of the layers
  inside the dual path through MMCI (:class:`MultiShapeConv`: 1x1, 3x3, 5x5, 7x7, 5x1 and 1x5 convolutions,
  summed); per decoded layer ``softmax(100 cos(token, [g_n, g_a]))`` upsampled, ``[g_n, g_a]`` divided by its
  joint norm;
* stage 1: contexts and decoders by ``sum_maps focal + Dice(S_a, mask) + Dice(S_n, 1 - mask)`` (AdamW, betas
  (0.5, 0.999), lr 1e-3 / 1e-4, 15 epochs, batch 1); stage 2: the :class:`Adapter` by cross-entropy of the raw
  ``<f', [g_n, g_a]>`` (lr 1e-5, 5 epochs), everything else frozen;
* test: the blurred ``(S_a - S_n + 1) / 2`` averaged over the decoded layers; image score ``(<f', g_a> + max) / 2``.

The context here follows each image's own embedding (the authors' forward takes the first image's for the whole
batch: the same at their batch size 1).

**HQ-Loc's boxes** (both detectors, ``grounding=`` a Hugging Face Grounding DINO folder or cached id; test time
only, as the authors' ``test.py``; rules in :mod:`oodscope.vlm.grounding`): Grounding DINO is prompted with the
general anomaly words and the descriptions; the position word of each image is the 3 x 3 cell of its best anomaly
box's centre (``"center"`` without one), so ``g_a`` is the mean over that position's prompts only; the image score
is taken from the map, then the map outside every anomaly box is multiplied by ``outside_weight`` (0.7). Without
``grounding``, ``positions=`` chooses the position prompts (all nine by default). The authors fine-tuned their
Grounding DINO on the auxiliary set with MMDetection (weights not in the Hugging Face format): the zero-shot
``IDEA-Research/grounding-dino-tiny`` has their architecture, not their weights.
The patch features here are per layer; in the authors' code the stored V-V tokens of every layer are aliased to
one tensor that later blocks update in place, so all of them equal the last block's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..imagead.base import ImageDetector
from .anomalyclip import TEMPERATURE, dpam_features
from .backbone import _fill_rows, placed, resolve_clip
from .base import l2_normalise, softmax
from .grounding import GRID as POSITIONS  # the nine position words, in Grounding DINO's 3 x 3 grid order
from .winclip import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES
MAP_SCALE = 100.0 / np.sqrt(2.0)  # 100 x cos against the pair [g_n, g_a] divided by its joint norm sqrt(2)
BLUR_SIZE, BLUR_SIGMA = 3, 4.0  # the authors' torchvision GaussianBlur(3, 4.0)
UNFROZEN_FIRST = 6  # the authors' dual path covers every block after the first 6

#: FG-Des descriptions, per MVTec AD and VisA category. Written for oodscope by a language model from the category
#: name alone (what the paper's FG-Des prescribes: an LLM lists the anomaly types an object of that kind can
#: show), without looking at the data sets' images, defect folders or the authors' own lists, so they hold no
#: knowledge of the test sets. Scores with them differ from the authors' (whose lists were written by another LLM).
DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "carpet": ("a stain", "a hole", "a cut in the pile", "a loose or pulled thread", "a colour patch",
               "a foreign fibre or object woven in", "a flattened or worn area"),
    "grid": ("a bent wire", "a broken strand", "a glue spot", "a stray thread", "a metal fragment",
             "an irregular mesh spacing", "rust"),
    "leather": ("a scratch", "a cut", "a fold or crease", "a colour blotch", "a glue spot", "a puncture",
                "a worn or scuffed patch"),
    "tile": ("a crack", "a chip on the edge", "an oil stain", "a glue strip", "a rough patch",
             "a grey stroke or streak", "a discoloured spot"),
    "wood": ("a scratch", "a hole", "a liquid stain", "a colour patch", "a crack along the grain", "a knot",
             "a dent"),
    "bottle": ("a broken rim", "a crack in the glass", "a chipped edge", "dirt or contamination inside",
               "a foreign particle", "a deformed neck"),
    "cable": ("a bent wire", "a cut insulation", "a missing wire", "a swapped wire colour", "a poked insulation",
              "an exposed conductor", "a missing cable"),
    "capsule": ("a crack", "a faulty or smeared imprint", "a dent", "a squeezed shape", "a scratch",
                "a hole in the shell"),
    "hazelnut": ("a crack in the shell", "a cut", "a hole", "a printed mark", "mould", "a broken shell"),
    "metal nut": ("a bent edge", "a scratch", "a colour stain", "a flipped orientation", "a missing part",
                  "rust"),
    "pill": ("a crack", "a chipped edge", "a colour spot", "contamination", "a faulty imprint", "a scratch",
             "a wrong pill type"),
    "screw": ("a scratched head", "a damaged thread", "a bent shaft", "a deformed tip", "a scratched neck",
              "rust"),
    "toothbrush": ("bent bristles", "missing bristles", "splayed bristles", "a foreign object in the bristles",
                   "uneven bristle lengths", "a dirty head"),
    "transistor": ("a bent lead", "a cut lead", "a missing lead", "a damaged case", "a misplaced body",
                   "a burn mark"),
    "zipper": ("broken teeth", "split teeth", "squeezed teeth", "a frayed fabric border", "a hole in the fabric",
               "a rough or torn tape", "misaligned teeth"),
    "candle": ("a crack in the wax", "a chunk of wax missing", "a foreign particle in the wax",
               "a spot of a different colour", "a damaged or missing wick", "melted wax on the surface"),
    "capsules": ("a crack", "a dent", "a bubble in the shell", "a spot of a different colour", "a deformed shape",
                 "a leaking capsule"),
    "cashew": ("a burnt spot", "a broken piece", "a spot of a different colour", "a hole", "a foreign particle",
               "two nuts stuck together"),
    "chewinggum": ("a crack", "a chip on the edge", "a spot of a different colour", "a scratch",
                   "a foreign particle", "a deformed shape"),
    "fryum": ("a broken piece", "a burnt spot", "a spot of a different colour", "a crack", "a foreign particle",
              "a deformed shape"),
    "macaroni1": ("a crack", "a chip", "a scratch", "a spot of a different colour", "a foreign particle",
                  "a broken piece"),
    "macaroni2": ("a crack", "a chip", "a scratch", "a spot of a different colour", "a foreign particle",
                  "a broken piece"),
    **{pcb: ("a bent or missing pin", "a burnt component", "a scratch on the board", "a missing component",
             "a melted part", "a solder bridge", "a foreign object on the board") for pcb in
       ("pcb1", "pcb2", "pcb3", "pcb4")},
    "pipe fryum": ("a broken piece", "a burnt spot", "a crack", "a spot of a different colour",
                   "a foreign particle", "a deformed shape"),
}
#: the word a category is prompted with, where it differs from its name
PROMPT_NAMES = {"pcb1": "pcb", "pcb2": "pcb", "pcb3": "pcb", "pcb4": "pcb", "macaroni1": "macaroni",
                "macaroni2": "macaroni"}


def anomalous_states(descriptions: Sequence[str]) -> list[str]:
    """FG-Des state words: ``"abnormal {} with <d>"`` per description, then WinCLIP's generic anomalous states."""
    return [f"abnormal {{}} with {d}" for d in descriptions] + list(ANOMALOUS_STATES)


def position_prompts(states: Sequence[str], object_name: str, positions: Sequence[str],
                     templates: Sequence[str] = TEMPLATES) -> list[str]:
    """Every state of ``object_name`` at every position inside every template (states, positions, templates)."""
    return [template.format(f"{state.format(object_name)} at {position}")
            for state in states for position in positions for template in templates]


def small_gaussian_blur(maps: torch.Tensor, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """torchvision's ``GaussianBlur(size, sigma)`` on ``(N, H, W)`` maps: a separable ``size``-tap kernel, reflect
    padding."""
    half = (size - 1) / 2
    coords = torch.linspace(-half, half, size, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    pad = size // 2
    x = nn.functional.pad(maps[:, None], (pad, pad, pad, pad), mode="reflect")
    x = nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))
    return nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))[:, 0]


class FiLo(ImageDetector):
    """Training-free FiLo: FG-Des and position-enhanced prompts, multi-layer dual-path patch scoring (module
    docstring)."""

    name = "filo"
    needs_clip = True
    grid = {"positions": [None, ("center",)]}

    def __init__(self, model=None, object_name: str = "object", descriptions: Sequence[str] | None = None,
                 positions: Sequence[str] | None = None, layers: Sequence[int] = (6, 12, 18, 24),
                 dpam_depth: int | None = None, grounding=None, box_threshold: float = 0.25,
                 text_threshold: float = 0.25, max_box_area: float = 0.7, outside_weight: float = 0.7,
                 device: str = "cpu"):
        self.model = model
        self.object_name = object_name
        self.descriptions = descriptions
        self.positions = positions
        self.layers = layers
        self.dpam_depth = dpam_depth
        self.grounding = grounding  # a Grounding DINO folder / cached id: HQ-Loc's boxes and position (test only)
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.max_box_area = max_box_area
        self.outside_weight = outside_weight
        self.device = device

    def _check_params(self) -> None:
        if not isinstance(self.object_name, str) or not self.object_name.strip():
            raise ValueError(f"{self.name}: object_name must be a non-empty string such as 'bottle', "
                             f"got {self.object_name!r}")
        self._descriptions()
        self._positions()
        self._check_grounding()

    def _check_grounding(self) -> None:
        """The HQ-Loc settings (checked at fit and again before each prediction: they act at test time)."""
        from .grounding import GroundingDino

        if not (self.grounding is None or isinstance(self.grounding, (str, GroundingDino))):
            raise ValueError(f"{self.name}: grounding must be a Grounding DINO folder or a model id in the Hugging "
                             f"Face cache (a string), or an oodscope.vlm.grounding.GroundingDino, got "
                             f"{type(self.grounding).__name__}")
        if self.grounding is not None and self.positions is not None:
            raise ValueError(f"{self.name}: with grounding= each image's position comes from its Grounding DINO box; "
                             f"leave positions=None (got {self.positions!r})")
        for key in ("box_threshold", "text_threshold", "max_box_area", "outside_weight"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 <= value <= 1:
                raise ValueError(f"{self.name}: {key} must be a number in [0, 1], got {value!r}")

    def _descriptions(self) -> list[str]:
        if self.descriptions is None:
            found = DESCRIPTIONS.get(self._category())
            if found is None:
                raise ValueError(f"{self.name}: no built-in fine-grained descriptions for object_name "
                                 f"{self.object_name!r}; pass descriptions=[...] (anomaly types such as 'crack', "
                                 f"'scratch') or one of the MVTec AD / VisA categories: {', '.join(DESCRIPTIONS)}")
            return list(found)
        if isinstance(self.descriptions, str):
            raise ValueError(f"{self.name}: descriptions must be a list of strings, not one string "
                             f"{self.descriptions!r}")
        names = list(self.descriptions)
        if not names:
            raise ValueError(f"{self.name}: descriptions is empty; pass at least one anomaly type (e.g. ['crack']) "
                             "or descriptions=None for the built-in lists")
        if any(not isinstance(d, str) or not d.strip() for d in names):
            raise ValueError(f"{self.name}: descriptions must be non-empty strings, got {names!r}")
        return [d.strip() for d in names]

    def _positions(self) -> list[str]:
        if self.positions is None:
            return list(POSITIONS)
        if isinstance(self.positions, str):
            raise ValueError(f"{self.name}: positions must be a list of names such as ['center'], not one string")
        chosen = list(self.positions)
        unknown = [p for p in chosen if p not in POSITIONS]
        if not chosen or unknown:
            raise ValueError(f"{self.name}: positions must be a non-empty list of {POSITIONS} (or None: all), got "
                             f"{self.positions!r}")
        return chosen

    def _category(self) -> str:
        return self.object_name.strip().replace("_", " ")  # MVTec folder names: metal_nut -> metal nut

    def _prompt_name(self) -> str:
        return PROMPT_NAMES.get(self._category(), self._category())

    def clip(self):
        from ..extraction.extract import resolve_device

        return resolve_clip(self.model, device=str(resolve_device(self.device)))

    def _device(self) -> torch.device:
        from ..extraction.extract import resolve_device

        return resolve_device(self.device)

    def _check_model(self, images: np.ndarray):
        """The CLIP backbone, checked for what the dual path needs; sets ``dpam_depth_``."""
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"{self.name}: images must be square (CLIP crops the centre), got "
                             f"{images.shape[2]} x {images.shape[3]}; resize them (load_mvtec(size=...))")
        clip = self.clip()
        if not hasattr(clip, "vision_blocks"):
            raise ValueError(f"{self.name}: the backbone {type(clip).__name__} exposes no vision blocks (the dual "
                             "path runs them); load a Hugging Face CLIP folder or an open_clip model")
        blocks = len(clip.vision_blocks())
        depth = max(blocks - UNFROZEN_FIRST, 0) if self.dpam_depth is None else self.dpam_depth
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or not 0 <= depth <= blocks or \
                not self.layers or not set(self.layers) <= set(range(1, blocks + 1)):
            raise ValueError(f"{self.name}: dpam_depth must be in 0..{blocks} and layers in 1..{blocks} (the model has "
                             f"{blocks} vision blocks), got {self.dpam_depth!r}, {tuple(self.layers or ())}")
        self.dpam_depth_ = int(depth)
        return clip

    def _fit(self, images: np.ndarray) -> None:
        clip = self._check_model(images)
        device, name = str(self._device()), self._prompt_name()
        normal = clip.encode_texts([t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES],
                                   device=device, name="filo-prompts")
        states = anomalous_states(self._descriptions())
        anomalous = l2_normalise(clip.encode_texts(position_prompts(states, name, self._positions()), device=device,
                                                   name="filo-prompts"))
        self.text_embeddings_ = np.stack([l2_normalise(e.mean(axis=0)) for e in (l2_normalise(normal), anomalous)])
        if self.positions is None:  # g_a of each position alone, for grounding= (states x positions x templates)
            by_position = anomalous.reshape(len(states), len(POSITIONS), len(TEMPLATES), -1).mean(axis=(0, 2))
            self.anomalous_by_position_ = l2_normalise(by_position)

    def _locate(self, images: np.ndarray) -> tuple[list[str], list[np.ndarray]] | None:
        """HQ-Loc with ``grounding``: each image's position word and anomaly boxes (:mod:`.grounding`), or
        ``None`` without it."""
        if self.grounding is None:
            return None
        self._check_grounding()
        if not self._has_position_prompts():
            raise ValueError(f"{self.name}: this detector was fitted with positions={self.positions!r}, so it has no "
                             "prompts of each position for grounding=; refit it with positions=None")
        from .grounding import anomaly_caption, position_of, resolve_grounding, select_boxes

        grounding = resolve_grounding(self.grounding, device=str(self._device()))
        caption, words = anomaly_caption(self._descriptions())
        found = [select_boxes(grounding, d, words, self.box_threshold, self.text_threshold, self.max_box_area)
                 for d in grounding.detect(images, caption, device=self._device())]
        return [position_of(boxes, scores) for boxes, scores in found], [boxes for boxes, _ in found]

    def _has_position_prompts(self) -> bool:
        """Whether the fit kept ``g_a`` of each position (needed by ``grounding=``)."""
        return hasattr(self, "anomalous_by_position_")

    def _text_pairs(self, positions: list[str] | None, n: int) -> np.ndarray:
        """``(n, 2, D)``: ``[g_n, g_a]`` per image, ``g_a`` of the image's position when ``positions`` are given."""
        if positions is None:
            return np.broadcast_to(self.text_embeddings_, (n, *self.text_embeddings_.shape))
        g_a = self.anomalous_by_position_[[POSITIONS.index(p) for p in positions]]
        return np.stack([np.broadcast_to(self.text_embeddings_[0], g_a.shape), g_a], axis=1)

    def _weight_outside(self, full: np.ndarray, boxes: list[np.ndarray] | None) -> np.ndarray:
        """HQ-Loc's map: the pixels outside every anomaly box of an image times ``outside_weight``."""
        if boxes is None:
            return full
        from .grounding import weight_outside

        return np.stack([weight_outside(torch.from_numpy(m), b, self.outside_weight).numpy()
                         for m, b in zip(full, boxes)])

    def _predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        clip, device = self.clip(), self._device()
        located = self._locate(images)
        pairs = self._text_pairs(None if located is None else located[0], len(images))
        size = clip.image_size
        scores, maps = [], []
        with placed(clip, device), torch.no_grad():
            for start in range(0, len(images), clip.batch_size):
                batch = torch.from_numpy(images[start:start + clip.batch_size]).to(device)
                n = len(batch)  # every batch at one size (backbone._fill_rows): scores independent of batching
                global_, patches = dpam_features(clip, _fill_rows(clip.preprocess(batch), clip.batch_size),
                                                 tuple(self.layers), self.dpam_depth_)
                image = l2_normalise(global_[:n].double().cpu().numpy())
                texts = np.ascontiguousarray(pairs[start:start + n])
                scores.append(softmax(np.einsum("nd,nkd->nk", image, texts) / TEMPERATURE)[:, 1])
                layer_maps = []
                for p in patches:
                    unit = torch.from_numpy(l2_normalise(p[:n].double().cpu().numpy()))
                    logits = MAP_SCALE * torch.einsum("npd,nkd->npk", unit, torch.from_numpy(texts))
                    logits = logits.transpose(1, 2).reshape(n, 2, *clip.grid)
                    s = torch.softmax(nn.functional.interpolate(logits, size=(size, size), mode="bilinear",
                                                                align_corners=True), dim=1)
                    layer_maps.append(small_gaussian_blur((s[:, 1] - s[:, 0] + 1) / 2))
                maps.append(torch.stack(layer_maps).mean(dim=0))
        full = torch.cat(maps)
        if full.shape[1:] != images.shape[2:]:
            full = nn.functional.interpolate(full[:, None], size=images.shape[2:], mode="bilinear",
                                             align_corners=False)[:, 0]
        full = full.numpy()
        image_scores = (np.concatenate(scores) + full.reshape(len(full), -1).max(axis=1)) / 2  # before HQ-Loc
        return image_scores, self._weight_outside(full, None if located is None else located[1])


# -- the trained parts -------------------------------------------------------------------------------------------
class ConditionalContext(nn.Module):
    """FiLo's learnable context (CoCoOp's conditional form, the authors' ``PromptLearner_normal/abnormal``):
    ``n_ctx`` vectors ``V`` in the token-embedding space, from ``N(0, 0.02^2)``, shifted by a meta-net of the
    image embedding: ``V + meta(f)`` with ``meta = Linear(D, D/16) -> ReLU -> Linear(D/16, width)``."""

    def __init__(self, width: int, dim: int, n_ctx: int, generator: torch.Generator):
        super().__init__()
        self.context = nn.Parameter(torch.randn(n_ctx, width, generator=generator) * 0.02)
        hidden = max(1, dim // 16)
        self.meta_net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, width))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(n_ctx, width)`` context for one unit-norm image embedding ``(D,)``."""
        return self.context + self.meta_net(image)


class MultiShapeConv(nn.Module):
    """MMCI's convolutions (the authors' ``CovLayer``): the sum of 1x1, 3x3, 5x5, 7x7, 5x1 and 1x5 convolutions
    (``padding="same"``) of the ``(N, P, width)`` patch tokens laid out on their ``grid``, to ``(N, P, D)``."""

    KERNELS = ((1, 1), (3, 3), (5, 5), (7, 7), (5, 1), (1, 5))

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(width, dim, kernel_size=k, padding="same") for k in self.KERNELS])

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = tokens.transpose(1, 2).reshape(len(tokens), tokens.shape[2], *grid)
        out = sum(conv(x) for conv in self.convs)
        return out.flatten(2).transpose(1, 2)


class Adapter(nn.Module):
    """The authors' image-feature adapter: ``f + SiLU(W_2 ReLU(W_1 f))``, ``W_1: D -> D/2``, no biases."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, max(1, dim // 2), bias=False), nn.ReLU(),
                                nn.Linear(max(1, dim // 2), dim, bias=False), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x


class FiLoNetworks(nn.Module):
    """Everything FiLo trains beside the frozen CLIP: the two conditional contexts, one linear decoder per Q-K layer
    (width -> D), one :class:`MultiShapeConv` per V-V layer and the :class:`Adapter`."""

    def __init__(self, width: int, token_width: int, dim: int, n_ctx: int, n_qk: int, n_vv: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(int(seed))
        with torch.random.fork_rng(devices=[]):  # torch's default initialisations, seeded, the global state kept
            torch.manual_seed(int(seed))
            self.normal = ConditionalContext(token_width, dim, n_ctx, generator)
            self.anomalous = ConditionalContext(token_width, dim, n_ctx, generator)
            self.linear = nn.ModuleList([nn.Linear(width, dim) for _ in range(n_qk)])
            self.conv = nn.ModuleList([MultiShapeConv(width, dim) for _ in range(n_vv)])
            self.adapter = Adapter(dim)


class FiLoTrained(FiLo):
    """FiLo with its trained parts: conditional learnable context, MMCI decoders, adapter (module docstring)."""

    name = "filo_trained"
    trains_network = True
    grid = {"positions": [None, ("center",)]}

    def __init__(self, model=None, auxiliary=None, auxiliary_object: str | None = None, object_name: str = "object",
                 descriptions: Sequence[str] | None = None, positions: Sequence[str] | None = None,
                 layers: Sequence[int] = (6, 12, 18, 24), dpam_depth: int | None = None, n_ctx: int = 12,
                 epochs: int = 15, adapter_epochs: int = 5, lr: float = 1e-3, decoder_lr: float = 1e-4,
                 adapter_lr: float = 1e-5, batch_size: int = 1, seed: int = 0, grounding=None,
                 box_threshold: float = 0.25, text_threshold: float = 0.25, max_box_area: float = 0.7,
                 outside_weight: float = 0.7, device: str = "cpu", checkpoint: str | None = None):
        super().__init__(model=model, object_name=object_name, descriptions=descriptions, positions=positions,
                         layers=layers, dpam_depth=dpam_depth, grounding=grounding, box_threshold=box_threshold,
                         text_threshold=text_threshold, max_box_area=max_box_area, outside_weight=outside_weight,
                         device=device)
        self.auxiliary = auxiliary
        self.auxiliary_object = auxiliary_object
        self.checkpoint = checkpoint  # a file: saved after every epoch of each stage; an interrupted fit resumes
        self.n_ctx = n_ctx
        self.epochs = epochs
        self.adapter_epochs = adapter_epochs
        self.lr = lr
        self.decoder_lr = decoder_lr
        self.adapter_lr = adapter_lr
        self.batch_size = batch_size
        self.seed = seed

    def _check_params(self) -> None:
        super()._check_params()
        from ..detectors._shaping import check_positive
        from ..detectors.anomaly._base import check_int

        for key in ("n_ctx", "epochs", "batch_size"):
            check_int(self.name, key, getattr(self, key))
        check_int(self.name, "adapter_epochs", self.adapter_epochs, minimum=0)
        for key in ("lr", "decoder_lr", "adapter_lr"):
            check_positive(self.name, key, getattr(self, key))
        if self.auxiliary is None:
            raise ValueError(f"{self.name}: pass auxiliary= an annotated anomaly set (an MVTec-layout folder or an "
                             "ImageSet with masks) to train on; the paper trains on VisA to test MVTec AD")
        self._auxiliary_prompts()

    # -- prompts and maps ----------------------------------------------------------------------------------------
    def _auxiliary_prompts(self) -> tuple[str, list[str]]:
        """The object word and descriptions of the training prompts: the authors prompt each auxiliary image with
        its own category. ``auxiliary_object`` names it (a built-in MVTec AD / VisA category); by default the
        auxiliary folder's name when that is one; otherwise the target's own prompts."""
        name = self.auxiliary_object
        if name is None and isinstance(self.auxiliary, (str, os.PathLike)):
            folder = Path(self.auxiliary).name.replace("_", " ")
            name = folder if folder in DESCRIPTIONS else None
        if name is None:
            return self._prompt_name(), self._descriptions()
        category = str(name).strip().replace("_", " ")
        if category not in DESCRIPTIONS:
            raise ValueError(f"{self.name}: auxiliary_object {name!r} has no built-in descriptions; use one of the "
                             f"MVTec AD / VisA categories: {', '.join(DESCRIPTIONS)} (or None: the target's prompts)")
        return PROMPT_NAMES.get(category, category), list(DESCRIPTIONS[category])

    def _prompt_ids(self, clip, name: str | None = None, descriptions: Sequence[str] | None = None,
                    positions: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of ``X ... X <state>.`` (normal) and ``X ... X <state> at <position>.`` (anomalous, states x
        positions), the authors' prompts without templates (the context stands for them), for the target object
        unless ``name`` and ``descriptions`` are given, at ``positions`` (default: the ``positions`` setting)."""
        from .locoop import prompt_ids

        name = self._prompt_name() if name is None else name
        descriptions = self._descriptions() if descriptions is None else descriptions
        positions = self._positions() if positions is None else positions
        normal = [s.format(name) for s in NORMAL_STATES]
        anomalous = [f"{s.format(name)} at {p}" for s in anomalous_states(descriptions) for p in positions]
        return (prompt_ids(clip, normal, int(self.n_ctx), self.name),
                prompt_ids(clip, anomalous, int(self.n_ctx), self.name))

    @staticmethod
    def _texts(clip, nets: FiLoNetworks, ids: tuple[torch.Tensor, torch.Tensor], image: torch.Tensor
               ) -> torch.Tensor:
        """``(2, D)``: ``[g_n, g_a]`` for one unit-norm image embedding, each the normalised mean of its unit-norm
        prompt embeddings, the pair divided by its joint norm (the authors' ``text_features / norm``)."""
        pair = []
        for context, prompt_ids in ((nets.normal, ids[0]), (nets.anomalous, ids[1])):
            texts = nn.functional.normalize(clip.context_text_forward(prompt_ids, context(image)).float(), dim=-1)
            pair.append(nn.functional.normalize(texts.mean(dim=0), dim=-1))
        pair = torch.stack(pair)
        return pair / pair.norm()

    @staticmethod
    def _maps(clip, nets: FiLoNetworks, qk: list[torch.Tensor], vv: list[torch.Tensor], texts: torch.Tensor
              ) -> list[torch.Tensor]:
        """Per decoded layer ``(1, 2, size, size)``: softmax over [normal, anomalous] of ``100 cos(decoded patch,
        text)``, upsampled bilinearly (``align_corners=True``) to the model's input size; Q-K layers first."""
        decoded = [linear(t) for linear, t in zip(nets.linear, qk)] + \
            [conv(t, clip.grid) for conv, t in zip(nets.conv, vv)]
        maps = []
        for d in decoded:
            logits = 100.0 * nn.functional.normalize(d, dim=-1) @ texts.T  # (1, P, 2)
            logits = logits.transpose(1, 2).reshape(len(d), 2, *clip.grid)
            maps.append(torch.softmax(nn.functional.interpolate(logits, size=(clip.image_size,) * 2,
                                                                mode="bilinear", align_corners=True), dim=1))
        return maps

    def _tokens(self, clip, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Unit-norm image embeddings and the raw Q-K tokens of ``layers`` and V-V tokens of the layers inside the
        dual path (``index > blocks - dpam_depth``)."""
        from .anomalyclip import dual_path_tokens

        global_, vv, qk = dual_path_tokens(clip, pixels, tuple(self.layers), self.dpam_depth_)
        return nn.functional.normalize(global_.float(), dim=-1), qk, [vv[i] for i in self._dual_layers(clip)]

    def _has_position_prompts(self) -> bool:
        return True  # the prompts of any position are built from the trained context at prediction time

    def _dual_layers(self, clip) -> list[int]:
        """Positions in ``layers`` of the blocks inside the dual path (the last ``dpam_depth_``)."""
        first_dual = len(clip.vision_blocks()) - self.dpam_depth_
        return [i for i, layer in enumerate(self.layers) if layer > first_dual]

    # -- fit and predict ----------------------------------------------------------------------------------------
    def _init_networks(self) -> None:
        super()._init_networks()
        if hasattr(self, "network_shape_"):
            self.networks_ = FiLoNetworks(*self.network_shape_, seed=int(self.seed)).eval()

    def _fit(self, images: np.ndarray) -> None:
        from ._train import digest_arrays, run_epochs
        from .anomalyclip import dice_loss, focal_loss, load_auxiliary

        clip, device = self._check_model(images), self._device()  # the hand-written prompts are not embedded
        if not hasattr(clip, "context_text_forward"):
            raise ValueError(f"{self.name}: the backbone {type(clip).__name__} has no context_text_forward "
                             "(prompt learning needs the Hugging Face CLIP backbone)")
        aux, labels, masks = load_auxiliary(self.auxiliary, clip.image_size, self.name)
        self.network_shape_ = (int(clip.vision_width), int(clip.token_width),
                               int(clip.model.visual_projection.out_features), int(self.n_ctx), len(self.layers),
                               len(self._dual_layers(clip)))
        nets = FiLoNetworks(*self.network_shape_, seed=int(self.seed)).to(device)
        ids = tuple(i.to(device) for i in self._prompt_ids(clip, *self._auxiliary_prompts()))
        aux_t, y, gt = (torch.from_numpy(a).to(device) for a in (aux, labels, masks))
        generator = torch.Generator().manual_seed(int(self.seed))
        key = digest_arrays(aux, labels, masks, np.concatenate([i.cpu().numpy().ravel() for i in ids]))

        def tokens(batch: torch.Tensor):  # CLIP runs on each batch (frozen): no bank of every layer's tokens
            with torch.no_grad():
                return self._tokens(clip, clip.preprocess(aux_t[batch]))

        def segmentation_loss(batch: torch.Tensor) -> torch.Tensor:  # stage 1: focal + 2 Dice over every map
            f, qk, vv = tokens(batch)
            loss = torch.zeros((), device=device)
            for i, row in enumerate(batch):  # the context is conditioned on each image (CoCoOp)
                texts = self._texts(clip, nets, ids, f[i])
                for s in self._maps(clip, nets, [t[i:i + 1] for t in qk], [t[i:i + 1] for t in vv], texts):
                    target = gt[row:row + 1]
                    loss = loss + focal_loss(s, target) + dice_loss(s[:, 1], target) + dice_loss(s[:, 0], 1 - target)
            return loss / len(batch)

        groups = [{"params": [*nets.normal.parameters(), *nets.anomalous.parameters()], "lr_scale": 1.0},
                  {"params": [*nets.linear.parameters(), *nets.conv.parameters()],
                   "lr_scale": float(self.decoder_lr) / float(self.lr)}]
        optimiser = torch.optim.AdamW(groups, lr=float(self.lr), betas=(0.5, 0.999))
        with placed(clip, device):
            self.history_ = run_epochs(segmentation_loss, optimiser, len(aux), int(self.batch_size),
                                       [float(self.lr)] * int(self.epochs), generator, device, self.name,
                                       checkpoint=self.checkpoint, key=key)
            for p in [*nets.normal.parameters(), *nets.anomalous.parameters(), *nets.linear.parameters(),
                      *nets.conv.parameters()]:
                p.requires_grad_(False)

            def classification_loss(batch: torch.Tensor) -> torch.Tensor:  # stage 2: the adapter, by CE
                f, _, _ = tokens(batch)
                adapted = nn.functional.normalize(nets.adapter(f), dim=-1)
                logits = torch.stack([adapted[i] @ self._texts(clip, nets, ids, adapted[i]).T
                                      for i in range(len(batch))])
                return nn.functional.cross_entropy(logits, y[batch])

            adapter_optimiser = torch.optim.AdamW(nets.adapter.parameters(), lr=float(self.adapter_lr),
                                                  betas=(0.5, 0.999))
            stage_key = digest_arrays(np.frombuffer(key.encode(), dtype=np.uint8),  # and what stage 1 learned
                                      *[p.detach().cpu().numpy() for p in nets.parameters() if not p.requires_grad])
            self.adapter_history_ = run_epochs(
                classification_loss, adapter_optimiser, len(aux), int(self.batch_size),
                [float(self.adapter_lr)] * int(self.adapter_epochs), generator, device, f"{self.name} adapter",
                checkpoint=None if self.checkpoint is None else f"{self.checkpoint}.adapter", key=stage_key)
        self.networks_ = nets.cpu().eval()
        for p in self.networks_.parameters():
            p.requires_grad_(False)

    def _predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        clip, device = self.clip(), self._device()
        nets = self.networks_.to(device)
        located = self._locate(images)
        by_position = {None: self._prompt_ids(clip)} if located is None else \
            {p: self._prompt_ids(clip, positions=[p]) for p in set(located[0])}  # HQ-Loc: one position per image
        by_position = {p: tuple(i.to(device) for i in ids) for p, ids in by_position.items()}
        scores, maps = [], []
        with placed(clip, device), torch.no_grad():
            for start in range(0, len(images), clip.batch_size):
                batch = torch.from_numpy(images[start:start + clip.batch_size]).to(device)
                n = len(batch)  # every batch at one size (backbone._fill_rows): scores independent of batching
                f, qk, vv = self._tokens(clip, _fill_rows(clip.preprocess(batch), clip.batch_size))
                adapted = nn.functional.normalize(nets.adapter(f[:n]), dim=-1)
                for i in range(n):
                    ids = by_position[None if located is None else located[0][start + i]]
                    texts = self._texts(clip, nets, ids, adapted[i])
                    scores.append(float(adapted[i] @ texts[1]))  # the authors' raw <f, g_a> / sqrt(2)
                    layer_maps = [small_gaussian_blur((s[:, 1] - s[:, 0] + 1) / 2) for s in
                                  self._maps(clip, nets, [t[i:i + 1] for t in qk], [t[i:i + 1] for t in vv], texts)]
                    maps.append(torch.stack(layer_maps).mean(dim=0).double().cpu())
        self.networks_.cpu()
        full = torch.cat(maps)
        if full.shape[1:] != images.shape[2:]:
            full = nn.functional.interpolate(full[:, None], size=images.shape[2:], mode="bilinear",
                                             align_corners=False)[:, 0]
        full = full.numpy()
        image_scores = (np.asarray(scores, dtype=np.float64) + full.reshape(len(full), -1).max(axis=1)) / 2
        return image_scores, self._weight_outside(full, None if located is None else located[1])
