"""Tiny CLIP models for the vision-language tests: a random Hugging Face CLIP saved to a folder, and a toy backbone
whose image and text embeddings are aligned by construction.

* :func:`save_tiny_clip`: a seeded random ``transformers.CLIPModel`` (hidden 32, 2 layers, 32 x 32 images, patch 8)
  with a character-level CLIP tokenizer (byte-level vocabulary, no merges), written with ``save_pretrained`` so
  tests load it back through :func:`oodscope.vlm.load_clip`.
* :class:`AlignedClip`: images are coloured patches; each concept (a class name, "normal", "anomalous") has a
  colour and a unit prototype vector shared by the two towers. A patch (8 x 8 pixels) embeds to the prototypes weighted by
  a softmax of the negative squared distance of its mean colour to each concept colour, an image or a window to
  the mean of its patches' embeddings; a text embeds to the sum
  of the prototypes of its known words (other words to a fixed pseudo-random direction from their crc32).
"""

from __future__ import annotations

import json
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from oodscope.vlm.backbone import ClipBackbone, _window_embeddings


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def save_tiny_clip(folder: str | Path, seed: int = 0, projection_dim: int = 16) -> Path:
    """Write a seeded random tiny CLIP (model + tokenizer files) to ``folder``; returns it."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=40,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@lru_cache(maxsize=None)
def tiny_clip_folder(seed: int = 0) -> Path:
    """One tiny CLIP folder per seed for the whole test session (a temporary directory)."""
    import tempfile

    return save_tiny_clip(Path(tempfile.mkdtemp(prefix="oodscope-tiny-clip-")) / f"seed{seed}", seed=seed)


def tiny_clip(seed: int = 0, **options):
    """The tiny CLIP loaded through :func:`oodscope.vlm.load_clip` (no cache unless asked)."""
    from oodscope.vlm import load_clip

    return load_clip(tiny_clip_folder(seed), **{"use_cache": False, **options})


# -- a tiny Grounding DINO --------------------------------------------------------------------------------------
GROUNDING_WORDS = ["anomaly", "damage", "broken", "defect", "contamination", "crack", "scratch", "hole"]


def save_tiny_grounding_dino(folder: str | Path, seed: int = 0) -> Path:
    """Write a seeded random tiny ``GroundingDinoForObjectDetection`` (Swin backbone of embedding 16, BERT text
    encoder of width 32, 12 queries) with a word-level BERT tokenizer and its processor to ``folder``."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessorPil, GroundingDinoProcessor, SwinConfig)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + GROUNDING_WORDS
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                                 decoder_attention_heads=2, num_queries=12, num_feature_levels=3, encoder_n_points=2,
                                 decoder_n_points=2, max_text_len=32, use_timm_backbone=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config)
    model.save_pretrained(folder)
    images = GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64})
    GroundingDinoProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@lru_cache(maxsize=None)
def tiny_grounding_folder(seed: int = 0) -> Path:
    """One tiny Grounding DINO folder per seed for the whole test session (a temporary directory)."""
    import tempfile

    return save_tiny_grounding_dino(Path(tempfile.mkdtemp(prefix="oodscope-tiny-gdino-")) / f"seed{seed}", seed)


# -- the aligned toy backbone ----------------------------------------------------------------------------------
COLOURS = {  # concept -> RGB in [0, 1]
    "apple": (0.9, 0.1, 0.1), "leaf": (0.1, 0.8, 0.1), "sky": (0.1, 0.2, 0.9),
    "banana": (0.9, 0.9, 0.1), "normal": (0.5, 0.5, 0.5), "anomalous": (1.0, 1.0, 1.0),
}
NORMAL_WORDS = {"flawless", "perfect", "unblemished"}
ANOMALY_WORDS = {"damaged", "broken", "flaw", "defect", "damage"}


class AlignedClip(ClipBackbone):
    """Toy CLIP whose towers share concept prototypes (see the module docstring); patch 8 pixels."""

    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self, dim: int = 32, sharpness: float = 40.0, image_size: int = 32, **options):
        super().__init__(**{"use_cache": False, **options})
        self.image_size, self.grid = image_size, (image_size // 8, image_size // 8)
        self.concepts = list(COLOURS)
        generator = torch.Generator().manual_seed(0)
        basis = torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0]
        self.register_buffer("prototypes", basis[: len(self.concepts)].clone())  # orthonormal rows
        self.register_buffer("colours", torch.tensor([COLOURS[c] for c in self.concepts]))
        self.dim, self.sharpness = dim, sharpness

    @property
    def logit_scale(self) -> float:
        return 100.0

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        words = [t.lower().replace(".", " ").replace(",", " ").split() for t in texts]
        length = max(max(len(w) for w in words), 1)
        ids = np.zeros((len(texts), length), np.int64)
        mask = np.zeros_like(ids)
        for i, ws in enumerate(words):  # ids: crc32 of the word (0 is padding)
            ids[i, :len(ws)] = [zlib.crc32(w.encode()) % (2**31 - 1) + 1 for w in ws]
            mask[i, :len(ws)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _word_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        known = {zlib.crc32(c.encode()) % (2**31 - 1) + 1: i for i, c in enumerate(self.concepts)}
        for w in NORMAL_WORDS:
            known[zlib.crc32(w.encode()) % (2**31 - 1) + 1] = self.concepts.index("normal")
        for w in ANOMALY_WORDS:
            known[zlib.crc32(w.encode()) % (2**31 - 1) + 1] = self.concepts.index("anomalous")
        out = torch.zeros(*ids.shape, self.dim)
        for index in torch.unique(ids).tolist():
            if index == 0:
                continue
            if index in known:
                vector = self.prototypes[known[index]]
            else:  # an unknown word: a fixed small pseudo-random direction
                vector = 0.3 * torch.randn(self.dim, generator=torch.Generator().manual_seed(index)) / self.dim**0.5
            out[ids == index] = vector
        return out

    def text_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        vectors = self._word_vectors(input_ids.cpu()) * attention_mask.cpu()[..., None]
        without = input_ids.cpu() == zlib.crc32(b"without") % (2**31 - 1) + 1
        if without.any():  # "<object> without defect": the defect words after "without" mean normal
            anomalous = self.prototypes[self.concepts.index("anomalous")]
            normal = self.prototypes[self.concepts.index("normal")]
            after = without.long().cumsum(dim=1) > 0
            is_anomaly = (vectors @ anomalous > 0.99) & after
            vectors[is_anomaly] = normal
        return vectors.sum(dim=1).to(input_ids.device)

    def _embed_colours(self, rgb: torch.Tensor) -> torch.Tensor:
        distance = ((rgb[..., None, :] - self.colours) ** 2).sum(-1)
        return torch.softmax(-self.sharpness * distance, dim=-1) @ self.prototypes

    def _patch_colours(self, pixels: torch.Tensor) -> torch.Tensor:
        n = len(pixels)
        patches = nn.functional.avg_pool2d(pixels, self.image_size // self.grid[0])  # (N, 3, 4, 4)
        return patches.flatten(2).transpose(1, 2).reshape(n, -1, 3)

    def image_forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = self._embed_colours(self._patch_colours(pixels))
        return local.mean(dim=1), local

    def token_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._patch_colours(pixels)  # the "tokens": each patch's mean colour

    def window_forward(self, pixels: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        local = self._embed_colours(self._patch_colours(pixels))
        tokens = torch.cat([local.mean(dim=1, keepdim=True), local], dim=1)
        # the "class token" of a window: the mean embedding of the window's patches only
        return _window_embeddings(tokens, windows, lambda t: t[:, 1:].mean(dim=1))


def coloured_images(concepts: Sequence[str], noise: float = 0.03, seed: int = 0, size: int = 32) -> np.ndarray:
    """``(N, 3, size, size)`` float32 images in [0, 1], one per concept name, its colour plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    base = np.array([COLOURS[c] for c in concepts], dtype=np.float32)[:, :, None, None]
    return np.clip(base + rng.normal(0, noise, (len(concepts), 3, size, size)), 0, 1).astype(np.float32)


@lru_cache(maxsize=None)
def tiny_mvtec_folder(size: int = 32, n: int = 4) -> Path:
    """An MVTec-layout folder of ``size`` px grey-noise images (``n`` train/good, ``n`` test/good, ``n`` test/crack
    with a bright 8 x 8 square and its mask), written once per session: an auxiliary set for AnomalyCLIP."""
    import tempfile

    from PIL import Image

    rng = np.random.default_rng(11)
    root = Path(tempfile.mkdtemp(prefix="oodscope-tiny-mvtec-")) / "tile"
    for folder in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (root / folder).mkdir(parents=True)

    def noise():
        return rng.normal(128, 10, (size, size, 3)).clip(0, 255).astype(np.uint8)

    for i in range(n):
        Image.fromarray(noise()).save(root / f"train/good/{i:03d}.png")
        Image.fromarray(noise()).save(root / f"test/good/{i:03d}.png")
        image, mask = noise(), np.zeros((size, size), np.uint8)
        top = 4 + 4 * (i % 4)
        image[top:top + 8, 8:16], mask[top:top + 8, 8:16] = 255, 255
        Image.fromarray(image).save(root / f"test/crack/{i:03d}.png")
        Image.fromarray(mask).save(root / f"ground_truth/crack/{i:03d}_mask.png")
    return root
