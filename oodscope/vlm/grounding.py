"""Grounding DINO box localisation of anomalies, as FiLo's HQ-Loc uses it (Gu et al., ACM MM 2024, Sec. 3.3).

Grounding DINO (Liu et al., "Grounding DINO: Marrying DINO with Grounded Pre-Training for Open-Set Object
Detection", ECCV 2024) predicts, for each of its queries, a box (normalised ``cx, cy, w, h``) and a probability per
token of the caption (the sigmoid of its logits). FiLo's released ``test.py`` uses it at test time only, as follows
(facts from that file; the weights there are the authors' own fine-tuning, not released in the Hugging Face format):

* caption (:func:`anomaly_caption`): the five general words ``anomaly, damage, broken, defect, contamination`` and
  the object's fine-grained descriptions, joined by ``" . "``, lower-cased, ending in ``"."`` (no object name);
* the image: the original image with its shorter side resized to 518 (bilinear), ImageNet mean / std;
* boxes (:func:`select_boxes`): a query is kept when its largest token probability exceeds ``box_threshold``
  (0.25) **and** its area ``w h`` is under ``max_area`` (0.7 of the image); when none is kept, the single query of
  highest probability is (whatever its area). Its phrase is the caption's tokens of probability above
  ``text_threshold`` (0.25), decoded; the box counts as an anomaly box when one of the caption's words or
  descriptions is a substring of its phrase. No NMS, no top-k;
* position (:func:`position_of`): the centre of the highest-scoring anomaly box (ties: the later one) in a 3 x 3
  grid of the image, ``"center"`` when there is no anomaly box;
* map (:func:`weight_outside`): pixels outside every anomaly box are multiplied by 0.7 (all of them when there is
  none); the image score is taken before this.

Differences from the authors' code: the boxes' scores are compared exactly (theirs are read back from the phrase
string, cut to about two decimals); Grounding DINO sees the images the detector is given (``oodscope ad --size``),
resized to a shorter side of ``size``, not the original files; the box corners are truncated at the map's
resolution (theirs at 518 pixels), and a box reaching past the top or left edge protects nothing, as in their
``int()`` slicing; the descriptions are matched in lower case.

The model is transformers' ``GroundingDinoForObjectDetection`` (:func:`load_grounding_dino`, from a local folder
or a model id in the Hugging Face cache, offline; :func:`download_grounding_dino` fetches
``IDEA-Research/grounding-dino-tiny``, the Swin-T architecture the authors fine-tuned).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

GENERAL_WORDS = ("anomaly", "damage", "broken", "defect", "contamination")  # FiLo's test.py
GRID = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


@dataclass
class Detections:
    """Grounding DINO's raw output for one image: every query's normalised ``(cx, cy, w, h)`` box, its token
    probabilities ``(queries, tokens)``, and the caption's token ids."""

    boxes: np.ndarray
    token_probs: np.ndarray
    input_ids: np.ndarray


def anomaly_caption(descriptions: Sequence[str]) -> tuple[str, list[str]]:
    """FiLo's caption of the general words and ``descriptions``, and the words an anomaly phrase is matched by,
    all lower case (the authors match the descriptions as written, so one with a capital letter never matches the
    lower-case phrase of an uncased BERT tokenizer; here it does)."""
    words = [w.lower() for w in list(GENERAL_WORDS) + [d.strip() for d in descriptions]]
    caption = " . ".join(words).strip()
    return (caption if caption.endswith(".") else caption + "."), words


class GroundingDino:
    """A Hugging Face ``GroundingDinoForObjectDetection`` with its tokenizer and image normalisation."""

    def __init__(self, model: nn.Module, tokenizer: Any, mean: Sequence[float], std: Sequence[float],
                 size: int = 518, batch_size: int = 8):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.size = int(size)
        self.batch_size = int(batch_size)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` images in [0, 1], the shorter side resized to ``size`` (bilinear, antialiased: as
        PIL's resize in the authors' transform), normalised."""
        h, w = images.shape[-2:]
        scale = self.size / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if size != (h, w):
            images = nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                               antialias=True).clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def detect(self, images: np.ndarray, caption: str, device: str | torch.device = "cpu") -> list[Detections]:
        """The raw detections of ``caption`` on every image (``(N, 3, H, W)`` in [0, 1]). A caption longer than
        the model's ``max_text_len`` tokens is cut there, as Grounding DINO's own code cuts it (with a warning)."""
        limit = int(getattr(self.model.config, "max_text_len", 256))
        tokens = self.tokenizer([caption], return_tensors="pt", truncation=True, max_length=limit)
        ids = tokens["input_ids"]
        if len(self.tokenizer(caption)["input_ids"]) > limit:
            import warnings

            warnings.warn(f"Grounding DINO reads {limit} tokens; the caption {caption[:60]!r}... is longer and is cut "
                          "(pass fewer descriptions to keep them all)", stacklevel=2)
        found: list[Detections] = []
        from .backbone import _fill_rows, placed

        with placed(self.model, device), torch.no_grad():
            text = {k: v.to(device) for k, v in tokens.items()}
            for start in range(0, len(images), self.batch_size):
                batch = self.pixels(torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size]))
                                    .float().to(device))
                n = len(batch)  # every batch at one size: detections independent of batching
                batch = _fill_rows(batch, self.batch_size)
                out = self.model(pixel_values=batch, pixel_mask=torch.ones_like(batch[:, 0], dtype=torch.long),
                                 **{k: v.expand(len(batch), -1) for k, v in text.items()})
                probs = out.logits[:n].sigmoid()[..., :ids.shape[1]].double().cpu().numpy()
                boxes = out.pred_boxes[:n].double().cpu().numpy()
                found += [Detections(boxes[i], probs[i], ids[0].numpy()) for i in range(n)]
        return found

    def phrase(self, detection: Detections, query: int, text_threshold: float) -> str:
        """The caption's tokens of probability above ``text_threshold`` for ``query``, decoded, the first ([CLS])
        left out (Grounding DINO's ``get_phrases_from_posmap``, in its own code and in transformers')."""
        chosen = detection.token_probs[query] > text_threshold
        chosen[0] = False
        return self.tokenizer.decode(detection.input_ids[chosen].tolist())


def select_boxes(grounding: GroundingDino, detection: Detections, words: Sequence[str], box_threshold: float = 0.25,
                 text_threshold: float = 0.25, max_area: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """FiLo's anomaly boxes of one image: normalised ``(x0, y0, x1, y1)`` and their scores (module docstring)."""
    scores = detection.token_probs.max(axis=1)
    area = detection.boxes[:, 2] * detection.boxes[:, 3]
    kept = np.flatnonzero((scores > box_threshold) & (area < max_area))
    if len(kept) == 0:
        kept = np.array([int(np.argmax(scores))])
    anomalous = [q for q in kept if any(w in grounding.phrase(detection, q, text_threshold) for w in words)]
    cx, cy, w, h = detection.boxes[anomalous].T if anomalous else np.zeros((4, 0))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1), scores[anomalous]


def position_of(boxes: np.ndarray, scores: np.ndarray) -> str:
    """The grid cell (:data:`GRID`) of the centre of the highest-scoring box (ties: the later one); ``"center"``
    without a box. The cells are the image's thirds (the authors' integer pixel ranges over 518 pixels)."""
    if len(boxes) == 0:
        return "center"
    best = len(scores) - 1 - int(np.argmax(scores[::-1]))
    x0, y0, x1, y1 = boxes[best]
    column, row = (min(max(int(3 * (a + b) / 2), 0), 2) for a, b in ((x0, x1), (y0, y1)))
    return GRID[3 * row + column]


def weight_outside(anomaly_map: torch.Tensor, boxes: np.ndarray, weight: float = 0.7) -> torch.Tensor:
    """``(H, W)`` map with every pixel outside all ``boxes`` (normalised ``x0, y0, x1, y1``) multiplied by
    ``weight``; the box corners are scaled to pixels and truncated (the authors' ``int()``, half-open slices)."""
    h, w = anomaly_map.shape
    inside = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        top, bottom = int(y0 * h), int(y1 * h)
        left, right = int(x0 * w), int(x1 * w)
        if top >= 0 and left >= 0:  # a negative start slices from the end in the authors' code: usually empty
            inside[top:bottom, left:right] = True
    return torch.where(inside.to(anomaly_map.device), anomaly_map, anomaly_map * weight)


# -- loading --------------------------------------------------------------------------------------------------
def load_grounding_dino(source: str | os.PathLike, device: str = "cpu", **options: Any) -> GroundingDino:
    """A :class:`GroundingDino` from a local Hugging Face folder (``config.json`` of ``model_type:
    grounding-dino``, weights, tokenizer and ``preprocessor_config.json`` / ``processor_config.json``) or a model
    id in the Hugging Face cache, offline (``local_files_only=True``). ``options``: ``size``, ``batch_size``."""
    from .backbone import cached_snapshot, is_model_id

    text = str(source)
    path = Path(source)
    if not path.is_dir():
        if not is_model_id(text):
            raise ValueError(f"Grounding DINO model {text!r} is not a folder; pass a local Hugging Face folder (see "
                             "oodscope.vlm.grounding.download_grounding_dino) or a model id in the Hugging Face cache")
        path = cached_snapshot(text, "Grounding DINO model", "oodscope.vlm.grounding.download_grounding_dino")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (ValueError, OSError) as error:
        raise ValueError(f"Grounding DINO folder {path}: no readable config.json ({error})") from None
    if model_type != "grounding-dino":
        raise ValueError(f"Grounding DINO folder {path} holds a {model_type!r} model, not a Grounding DINO "
                         "(config.json model_type must be 'grounding-dino')")
    try:
        from transformers import AutoProcessor, GroundingDinoForObjectDetection
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('Grounding DINO needs transformers: pip install "oodscope[vlm]"') from error
    try:
        model = GroundingDinoForObjectDetection.from_pretrained(path, local_files_only=True)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - corrupted weights raise library-specific errors
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise ValueError(f"Grounding DINO folder {path} cannot be loaded ({type(error).__name__}: {first}); "
                         "check that its weight, tokenizer and processor files are complete") from None
    images = processor.image_processor
    return GroundingDino(model.to(device), processor.tokenizer, images.image_mean, images.image_std, **options)


def download_grounding_dino(repo_id: str = "IDEA-Research/grounding-dino-tiny",
                            folder: str | os.PathLike | None = None) -> Path:
    """Download a Hugging Face Grounding DINO into ``folder`` (for users with network access; oodscope never
    calls this). Returns the folder, which :func:`load_grounding_dino` then reads offline."""
    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    folder = Path(folder or repo_id.replace("/", "--"))
    GroundingDinoForObjectDetection.from_pretrained(repo_id).save_pretrained(folder)
    AutoProcessor.from_pretrained(repo_id).save_pretrained(folder)
    return folder


_LOADED: dict[tuple[str, str], GroundingDino] = {}


def resolve_grounding(source: str | os.PathLike | GroundingDino, device: str = "cpu") -> GroundingDino:
    """A :class:`GroundingDino` from a detector's ``grounding`` parameter (loaded folders are remembered)."""
    if isinstance(source, GroundingDino):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"grounding must be a Grounding DINO folder, a model id in the Hugging Face cache or an "
                         f"oodscope.vlm.grounding.GroundingDino, got {type(source).__name__}")
    # loaded models are kept for the process (keyed by folder or by id and cache); clear_loaded() frees them
    from .backbone import hub_cache_dir

    key = (str(Path(source).resolve()) if Path(source).is_dir() else f"{source} in {hub_cache_dir()}", str(device))
    if key not in _LOADED:
        _LOADED[key] = load_grounding_dino(source, device=str(device))
    return _LOADED[key]


def clear_loaded() -> None:
    """Forget the Grounding DINO models :func:`resolve_grounding` loaded (a changed folder is then read again)."""
    _LOADED.clear()
