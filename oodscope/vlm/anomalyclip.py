"""AnomalyCLIP: object-agnostic prompt learning for zero-shot anomaly detection and localisation.

Zhou, Pang, Tian, He & Chen, "AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection", ICLR
2024 (facts from the paper and the authors' released code: ``train.py``, ``test.py``, ``loss.py``,
``prompt_ensemble.py``, ``AnomalyCLIP_lib/AnomalyCLIP.py``).

* **Object-agnostic prompts**: ``[V_1 ... V_E] object.`` (normal) and ``[W_1 ... W_E] damaged object.``
  (anomalous), ``E = n_ctx = 12`` learnable context vectors each, from ``N(0, 0.02^2)``.
* **Deep text prompt tuning**: in text blocks ``1 .. depth - 1`` (``depth = 9``) the token positions ``1 .. t``
  (``t = t_n_ctx = 4``) are replaced by learnable vectors of that block before it runs.
* **DPAM** (diagonally prominent attention maps): in the last ``dpam_depth`` vision blocks (19 of ViT-L/14's 24
  in the authors' code, ``DPAM_layer = 20``) a second path runs beside the original: both attend from the original
  path's normalised input, the new path with V-V attention ``softmax(s V V^T) V`` and without the MLP, the original
  with CLIP's Q-K attention and MLP. Patch features are the new path's tokens after the blocks ``layers`` (1-based,
  ``(6, 12, 18, 24)``), each through the final layer norm and the visual projection; the global feature is the
  original path's class token (with the final layer norm: the authors' code projects it without; CLIP's own image
  embedding has it).
* **Training** on an auxiliary annotated set (the paper trains on VisA's test split to test on MVTec AD and the
  reverse): CLIP frozen, the prompts trained with Adam (lr 1e-3, betas (0.5, 0.999)), 15 epochs, batch 8. Loss
  ``CE(cos(global, [g_n, g_a]) / 0.07, label) + 4 sum_layers [focal(S, mask) + dice(S_a, mask) + dice(S_n, 1 -
  mask)]`` with ``S = softmax(cos(patch, [g_n, g_a]) / 0.07)`` upsampled bilinearly to the image; focal loss with
  ``gamma = 2`` and label smoothing 1e-5, Dice with smoothing 1 (both as the authors' ``loss.py``).
* **Inference**: image score ``softmax(cos(global, [g_n, g_a]) / 0.07)_a``; anomaly map ``sum_layers (S_a + 1 -
  S_n) / 2``, Gaussian-smoothed with ``sigma = 4`` pixels.

``auxiliary`` names the training set: an MVTec-layout folder (its ``test`` split: normal and defect images with
masks, read at the model's input size) or an :class:`~oodscope.data.mvtec.ImageSet` with masks. ``fit(images)``
on the target's defect-free images only fixes the image size: the method is zero-shot on the target. Needs the
Hugging Face backbone (its learned prompts run transformers' text tower; the DPAM image path,
:func:`dual_path_tokens`, runs on open_clip's blocks too).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..imagead.base import ImageDetector, as_images, gaussian_blur
from .backbone import _fill_rows, _layer, causal_mask, placed, resolve_clip

TEMPERATURE = 0.07  # the authors' fixed temperature for image-text similarities


def focal_loss(probabilities: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
               ) -> torch.Tensor:
    """The authors' focal loss on class probabilities ``(N, C, H, W)`` and an integer mask ``(N, H, W)``."""
    n_classes = probabilities.shape[1]
    p = probabilities.permute(0, 2, 3, 1).reshape(-1, n_classes)
    one_hot = nn.functional.one_hot(target.reshape(-1).long(), n_classes).to(p.dtype)
    one_hot = one_hot.clamp(smooth / (n_classes - 1), 1.0 - smooth)
    pt = (one_hot * p).sum(dim=1) + smooth
    return (-(1 - pt) ** gamma * pt.log()).mean()


def dice_loss(prediction: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - mean_n (2 |P T| + 1) / (|P| + |T| + 1)`` per image (the authors' BinaryDiceLoss)."""
    p, t = prediction.reshape(len(prediction), -1), target.reshape(len(target), -1)
    return 1 - ((2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def dual_path_tokens(clip, pixels: torch.Tensor, layers: Sequence[int], dpam_depth: int
                     ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """CLIP's projected image embedding ``(N, D)`` and, after each block in ``layers``, the raw residual-stream patch
    tokens ``(N, P, width)`` (no layer norm, no projection) of the new V-V path and of CLIP's own Q-K path; before
    the last ``dpam_depth`` blocks the two paths are one (module docstring)."""
    blocks = clip.vision_blocks()
    first_dual = len(blocks) - dpam_depth
    x = x_ori = clip.vision_input(pixels)
    vv_tokens, qk_tokens = [], []
    for index, block in enumerate(blocks, start=1):
        vv, qk = block.attention(x_ori)  # the attention written out (VisionBlock)
        x_ori = x_ori + qk
        x_ori = x_ori + block.mlp_branch(x_ori)
        x = x_ori if index - 1 < first_dual else x + vv  # the new path skips the MLP
        if index in layers:
            vv_tokens.append(x[:, 1:])
            qk_tokens.append(x_ori[:, 1:])
    return clip._project(x_ori[:, 0]), vv_tokens, qk_tokens


def dpam_features(clip, pixels: torch.Tensor, layers: Sequence[int], dpam_depth: int
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Global ``(N, D)`` and per-layer patch features ``[(N, P, D)]`` of normalised pixels (module docstring)."""
    global_, vv_tokens, _ = dual_path_tokens(clip, pixels, layers, dpam_depth)
    return global_, [clip._project(tokens) for tokens in vv_tokens]


class PromptLearner(nn.Module):
    """AnomalyCLIP's learnable normal/anomalous context vectors and deep text prompts on a Hugging Face CLIP."""

    def __init__(self, width: int, n_ctx: int, depth: int, t_n_ctx: int, generator: torch.Generator):
        super().__init__()
        self.ctx = nn.Parameter(torch.randn(2, n_ctx, width, generator=generator) * 0.02)  # normal, anomalous
        self.deep = nn.Parameter(torch.randn(max(depth - 1, 0), t_n_ctx, width, generator=generator) * 0.02)

    def forward(self, clip, ids: torch.Tensor) -> torch.Tensor:
        """Normalised ``(2, D)`` text features ``[g_n, g_a]`` of the prompt ids ``(2, L)``."""
        text = clip.model.text_model
        n = self.ctx.shape[1]
        tokens = text.embeddings.token_embedding(ids)
        tokens = torch.cat([tokens[:, :1], self.ctx.to(tokens.dtype), tokens[:, 1 + n:]], dim=1)
        h = text.embeddings(inputs_embeds=tokens)
        mask = causal_mask(h.shape[1], h.dtype, h.device)
        t = self.deep.shape[1] if len(self.deep) else 0
        for index, layer in enumerate(text.encoder.layers):
            if 1 <= index <= len(self.deep):
                h = torch.cat([h[:, :1], self.deep[index - 1].expand(len(h), t, -1).to(h.dtype), h[:, 1 + t:]], dim=1)
            h = _layer(layer, h, mask)
        h = text.final_layer_norm(h)
        eos_id = clip.model.config.text_config.eos_token_id
        eos = ids.argmax(dim=-1) if eos_id == 2 else (ids == eos_id).int().argmax(dim=-1)
        return nn.functional.normalize(clip.model.text_projection(h[torch.arange(len(h), device=h.device), eos]),
                                       dim=-1)


def similarity_maps(patches: list[torch.Tensor], texts: torch.Tensor, grid: tuple[int, int], size: int
                    ) -> list[torch.Tensor]:
    """Per layer ``(N, 2, size, size)``: softmax over [normal, anomalous] of ``cos / 0.07``, upsampled bilinearly."""
    maps = []
    for p in patches:
        s = torch.softmax(nn.functional.normalize(p, dim=-1) @ texts.T / TEMPERATURE, dim=-1)
        s = s.transpose(1, 2).reshape(len(p), 2, *grid)
        maps.append(nn.functional.interpolate(s, size=(size, size), mode="bilinear", align_corners=False))
    return maps


def load_auxiliary(data: Any, size: int, who: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images ``(N, 3, H, W)``, labels ``(N,)`` and binary masks ``(N, H, W)`` of an annotated auxiliary set: an
    MVTec-layout folder (its ``test`` split, read at ``size``) or an :class:`~oodscope.data.mvtec.ImageSet` with
    labels and masks."""
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        from ..data.mvtec import load_mvtec

        data = load_mvtec(data, size=size).test
    masks = getattr(data, "masks", None)
    if masks is None or getattr(data, "labels", None) is None:
        raise ValueError(f"{who}: the auxiliary set needs labels and masks (an MVTec-layout test split)")
    images = as_images(data, f"{who}: auxiliary images")
    masks = np.asarray(masks, dtype=np.float32)
    if masks.shape[-2:] != images.shape[-2:]:
        masks = nn.functional.interpolate(torch.from_numpy(masks)[:, None], size=images.shape[-2:],
                                          mode="nearest")[:, 0].numpy()
    return images, np.asarray(data.labels, dtype=np.int64), (masks > 0.5).astype(np.float32)


class AnomalyCLIP(ImageDetector):
    """Object-agnostic learned prompts, DPAM patch features, trained on an auxiliary set (module docstring)."""

    name = "anomalyclip"
    needs_clip = True
    trains_network = True

    def __init__(self, model=None, auxiliary=None, n_ctx: int = 12, depth: int = 9, t_n_ctx: int = 4,
                 layers: Sequence[int] = (6, 12, 18, 24), dpam_depth: int = 19, epochs: int = 15, lr: float = 1e-3,
                 batch_size: int = 8, sigma: float = 4.0, seed: int = 0, device: str = "cpu"):
        self.model = model
        self.auxiliary = auxiliary
        self.n_ctx = n_ctx
        self.depth = depth
        self.t_n_ctx = t_n_ctx
        self.layers = layers
        self.dpam_depth = dpam_depth
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.sigma = sigma
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        for key in ("n_ctx", "depth", "t_n_ctx", "epochs", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{self.name}: {key} must be a positive integer, got {value!r}")
        if self.t_n_ctx > self.n_ctx:
            raise ValueError(f"{self.name}: t_n_ctx={self.t_n_ctx} deep tokens cannot exceed n_ctx={self.n_ctx}")
        if self.auxiliary is None:
            raise ValueError(f"{self.name}: pass auxiliary= an annotated anomaly set (an MVTec-layout folder or an "
                             "ImageSet with masks) to learn the prompts on; the paper trains on VisA to test MVTec AD")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0) or self.sigma < 0:
            raise ValueError(f"{self.name}: lr must be > 0 and sigma >= 0, got lr={self.lr!r}, sigma={self.sigma!r}")

    def clip(self):
        from ..extraction.extract import resolve_device

        return resolve_clip(self.model, device=str(resolve_device(self.device)))

    def _auxiliary(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return load_auxiliary(self.auxiliary, size, self.name)

    def _fit(self, images: np.ndarray) -> None:
        from tqdm.auto import tqdm

        from ..extraction.extract import resolve_device

        clip = self.clip()
        if not hasattr(getattr(clip, "model", None), "text_model"):
            raise ValueError(f"{self.name}: the backbone {type(clip).__name__} is not a Hugging Face CLIP (the "
                             "learned prompts run transformers' CLIPTextModel); load a CLIP folder")
        blocks = len(clip.vision_blocks())
        if not 0 <= self.dpam_depth <= blocks or not set(self.layers) <= set(range(1, blocks + 1)):
            raise ValueError(f"{self.name}: dpam_depth must be in 0..{blocks} and layers in 1..{blocks} (the "
                             f"model has {blocks} vision blocks), got {self.dpam_depth}, {tuple(self.layers)}")
        if self.depth > len(clip.model.text_model.encoder.layers):
            raise ValueError(f"{self.name}: depth={self.depth} exceeds the text encoder's blocks")
        device = resolve_device(self.device)
        aux, labels, masks = self._auxiliary(clip.image_size)
        generator = torch.Generator().manual_seed(int(self.seed))
        learner = PromptLearner(clip.token_width, self.n_ctx, self.depth, self.t_n_ctx, generator).to(device)
        optimiser = torch.optim.Adam(learner.parameters(), lr=self.lr, betas=(0.5, 0.999))
        ids = self._prompt_ids(clip).to(device)
        self.history_ = []
        with placed(clip, device):
            with torch.no_grad():
                pixels = clip.preprocess(torch.from_numpy(aux).to(device))
                global_, patches = dpam_features(clip, pixels, self.layers, self.dpam_depth)
                global_ = nn.functional.normalize(global_, dim=-1)
            y, gt = torch.from_numpy(labels).to(device), torch.from_numpy(masks).to(device)
            for _ in tqdm(range(self.epochs), desc="anomalyclip", unit="epoch", leave=False, disable=None):
                total = 0.0
                for batch in torch.randperm(len(y), generator=generator).split(self.batch_size):
                    batch = batch.to(device)
                    texts = learner(clip, ids)
                    image_loss = nn.functional.cross_entropy(global_[batch] @ texts.T / TEMPERATURE, y[batch])
                    local = 0.0
                    for s in similarity_maps([p[batch] for p in patches], texts, clip.grid, clip.image_size):
                        local = local + focal_loss(s, gt[batch]) + dice_loss(s[:, 1], gt[batch]) + \
                            dice_loss(s[:, 0], 1 - gt[batch])
                    loss = 4.0 * local + image_loss
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    total += float(loss.detach()) * len(batch)
                self.history_.append(total / len(y))
            with torch.no_grad():
                self.text_embeddings_ = learner(clip, ids).double().cpu().numpy()  # (2, D): normal, anomalous

    def _prompt_ids(self, clip) -> torch.Tensor:
        prefix = " ".join(["x"] * self.n_ctx)
        ids = torch.as_tensor(clip.tokenize([f"{prefix} object.", f"{prefix} damaged object."])["input_ids"])
        if not (ids[:, 1:1 + self.n_ctx] == ids[0, 1]).all():
            raise ValueError(f"{self.name}: the tokenizer does not turn the placeholder 'x' into one token each")
        return ids

    def _predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from ..extraction.extract import resolve_device

        clip = self.clip()
        device = resolve_device(self.device)
        texts = torch.from_numpy(self.text_embeddings_).float().to(device)
        scores, maps = [], []
        with placed(clip, device), torch.no_grad():
            for start in range(0, len(images), clip.batch_size):
                batch = torch.from_numpy(images[start:start + clip.batch_size]).to(device)
                n = len(batch)  # every batch at one size (see backbone._fill_rows): scores independent of batching
                pixels = _fill_rows(clip.preprocess(batch), clip.batch_size)
                global_, patches = dpam_features(clip, pixels, self.layers, self.dpam_depth)
                global_, patches = global_[:n], [p[:n] for p in patches]
                probs = torch.softmax(nn.functional.normalize(global_, dim=-1) @ texts.T / TEMPERATURE, dim=-1)
                scores.append(probs[:, 1].double().cpu())
                layer_maps = [(s[:, 1] + 1 - s[:, 0]) / 2 for s in similarity_maps(patches, texts, clip.grid,
                                                                                   clip.image_size)]
                maps.append(torch.stack(layer_maps).sum(dim=0).double().cpu())
        full = nn.functional.interpolate(torch.cat(maps)[:, None], size=images.shape[2:], mode="bilinear",
                                         align_corners=False)[:, 0]
        return torch.cat(scores).numpy(), gaussian_blur(full, self.sigma).numpy()
