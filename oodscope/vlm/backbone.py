"""The CLIP backbone interface: image encoder (global and patch embeddings), text encoder, logit scale.

:class:`ClipBackbone` is what every vision-language detector consumes. A subclass implements four methods on
torch tensors; the base class turns them into cached, batched numpy encoders:

* ``tokenize(texts) -> {"input_ids", "attention_mask"}`` (int64 arrays, one row per text);
* ``text_forward(input_ids, attention_mask) -> (M, D)`` projected text embeddings;
* ``image_forward(pixels) -> ((N, D) global, (N, P, D) patch)`` projected embeddings of normalised
  ``(N, 3, S, S)`` pixels, ``P = grid[0] * grid[1]`` patches in row-major order;
* ``window_forward(pixels, windows) -> (N, W, D)``: the embedding of each window, an image seen through the
  patches of one window only (WinCLIP).

The patch embeddings are the *local features* of GL-MCM (Miyai et al. 2023), taken as MaskCLIP does (Zhou et
al., ECCV 2022): the last transformer block is run with every token attending to itself only, i.e. its
attention output is ``out_proj(v_proj(LN1(h)))`` of the token itself, then the block's residual, MLP, the
final layer norm and the visual projection follow as for the class token. Window embeddings (WinCLIP, Jeong et
al. 2023, Sec. 4.2) are the class-token embeddings of the transformer fed with the class token and the patch
tokens of the window only, each keeping its own position embedding.

:class:`HFClip` wraps Hugging Face ``transformers.CLIPModel`` with its tokenizer, loaded from a local folder or a
model id in the local Hugging Face cache with ``local_files_only=True`` (:func:`load_clip`); :class:`OpenClip`
wraps ``open_clip`` (imported lazily; it downloads weights itself when asked to, never in oodscope's tests).
:func:`download_clip` fetches a Hugging Face model into a folder for users with network access; nothing in
oodscope calls it.

Embeddings go through :func:`oodscope.extract` (:meth:`ClipBackbone.encode_texts`,
:meth:`ClipBackbone.encode_images`): a second call with the same weights and inputs reads the on-disk cache.
Text prompts are keyed by their token ids, i.e. by the strings and the tokenizer that turned them into ids
(the ids are the data digest, the text tower's weights and code the model key). Set ``use_cache=False`` on
the backbone to skip the cache, ``cache_dir`` to move it.
"""

from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipBackbone(nn.Module):
    """Base class of CLIP-type backbones (see the module docstring). Subclasses set the attributes below."""

    cache_ignore = ("tokenizer", "cache_dir", "use_cache", "batch_size", "progress")

    image_size: int = 224
    grid: tuple[int, int] = (7, 7)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __init__(self, cache_dir: str | Path | None = None, use_cache: bool = True, batch_size: int = 64,
                 progress: bool = False):
        super().__init__()
        self.cache_dir, self.use_cache, self.batch_size, self.progress = cache_dir, use_cache, batch_size, progress

    # -- what a subclass implements ------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def text_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def window_forward(self, pixels: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def token_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, P, width)`` patch tokens of the last block after the final layer norm, not projected (WinCLIP+'s
        patch-level reference features, as open_clip's ``output_tokens`` gives them)."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> float:
        """CLIP's learned inverse temperature ``exp(t)`` (100 for the released OpenAI models)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's preprocessing of ``(N, 3, H, W)`` images in [0, 1]: bicubic resize of the shorter side to
        ``image_size`` (antialiased), centre crop, normalisation with ``mean`` / ``std``."""
        h, w = images.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            size = (max(s, round(h * scale)), max(s, round(w * scale)))
            images = nn.functional.interpolate(images, size=size, mode="bicubic", align_corners=False,
                                               antialias=True).clamp(0.0, 1.0)
            top, left = (size[0] - s) // 2, (size[1] - s) // 2
            images = images[..., top:top + s, left:left + s]
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def _extract(self, tower: nn.Module, data: Any, name: str, layers: Sequence[str], device: str):
        from ..extraction.extract import extract

        return extract(tower, data, name=name, layers=layers, layer_reduce="none", head=None,
                       batch_size=self.batch_size, device=device, cache_dir=self.cache_dir,
                       use_cache=self.use_cache, progress=self.progress)

    def encode_texts(self, texts: Sequence[str], device: str = "cpu", name: str = "prompts") -> np.ndarray:
        """``(M, D)`` float32 text embeddings (not normalised) of ``texts``, through the extraction cache."""
        tokens = self.tokenize(list(texts))
        return self._extract(_TextTower(self), tokens, name, (), device).logits

    def encode_images(self, images: np.ndarray, device: str = "cpu", name: str = "images", patches: bool = True
                      ) -> tuple[np.ndarray, np.ndarray | None]:
        """Global ``(N, D)`` and (with ``patches``) patch ``(N, P, D)`` embeddings of ``(N, 3, H, W)`` images in
        [0, 1], through the extraction cache (not normalised)."""
        out = self._extract(_ImageTower(self, patches), images, name, ("patches",) if patches else (), device)
        return out.logits, out.layers.get("patches")

    def encode_tokens(self, images: np.ndarray, device: str = "cpu", name: str = "tokens") -> np.ndarray:
        """``(N, P, width)`` unprojected patch tokens (:meth:`token_forward`), through the extraction cache."""
        out = self._extract(_TokenTower(self), images, name, (), device).logits
        return out.reshape(len(images), self.grid[0] * self.grid[1], -1)

    def encode_windows(self, images: np.ndarray, windows: np.ndarray, device: str = "cpu",
                       name: str = "windows") -> np.ndarray:
        """``(N, W, D)`` window embeddings (not normalised); ``windows`` is a ``(W, P)`` boolean patch mask."""
        tower = _WindowTower(self, torch.as_tensor(np.asarray(windows, dtype=bool)))
        out = self._extract(tower, images, name, (), device).logits
        return out.reshape(len(images), len(windows), -1)


@contextmanager
def placed(module: nn.Module, device: str | torch.device):
    """Run ``module`` on ``device`` inside the block and put it back where it was afterwards (for training)."""
    home = next(itertools.chain(module.parameters(), module.buffers()), torch.empty(0)).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def _fill_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with its first row repeated up to ``rows`` rows: every batch goes through the transformer at one size,
    because float32 matrix products pick their kernel (and rounding) by shape, and an embedding must not depend on
    the batch it was computed in (scoring a subset gives the subset of the scores)."""
    if len(x) >= rows:
        return x
    return torch.cat([x, x[:1].expand(rows - len(x), *x.shape[1:])], dim=0)


class _TextTower(nn.Module):
    """``forward(input_ids=, attention_mask=) -> (B, D)``: what :func:`oodscope.extract` runs on prompts."""

    def __init__(self, backbone: ClipBackbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = max(int(attention_mask.sum(dim=1).max()), 1)  # trims padding: the mask makes it irrelevant
        n, rows = len(input_ids), self.backbone.batch_size
        ids = _fill_rows(input_ids[:, :length].long(), rows)
        return self.backbone.text_forward(ids, _fill_rows(attention_mask[:, :length].long(), rows))[:n]


class _ImageTower(nn.Module):
    """``forward(images) -> (B, D)`` global embeddings; patch embeddings reach the ``patches`` hook."""

    def __init__(self, backbone: ClipBackbone, patches: bool = True):
        super().__init__()
        self.backbone = backbone
        self.with_patches = patches
        self.patches = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = len(images)
        pixels = _fill_rows(self.backbone.preprocess(images.float()), self.backbone.batch_size)
        global_, local = self.backbone.image_forward(pixels)
        if self.with_patches:
            self.patches(local[:n])
        return global_[:n]


class _TokenTower(nn.Module):
    def __init__(self, backbone: ClipBackbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = _fill_rows(self.backbone.preprocess(images.float()), self.backbone.batch_size)
        return self.backbone.token_forward(pixels)[:len(images)].flatten(1)


class _WindowTower(nn.Module):
    def __init__(self, backbone: ClipBackbone, windows: torch.Tensor):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("windows", windows)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = _fill_rows(self.backbone.preprocess(images.float()), self.backbone.batch_size)
        return self.backbone.window_forward(pixels, self.windows)[:len(images)].flatten(1)


# -- Hugging Face transformers --------------------------------------------------------------------------------
def _layer(layer: nn.Module, h: torch.Tensor, causal: torch.Tensor | None = None) -> torch.Tensor:
    """One CLIP encoder layer, optionally with an additive causal mask ``(1, 1, L, L)`` (transformers 4.x takes it
    as ``causal_attention_mask``, 5.x as the one ``attention_mask``)."""
    import inspect

    if "causal_attention_mask" in inspect.signature(layer.forward).parameters:
        out = layer(h, None, causal)
    else:
        out = layer(h, causal)
    return out[0] if isinstance(out, (tuple, list)) else out


class VisionBlock:
    """One image-tower block as the dual paths (AnomalyCLIP's DPAM, CLIP-AD's SDP, FiLo) run it, the same for the
    Hugging Face and the open_clip towers: :meth:`attention` gives the V-V and the Q-K outputs of its attention on
    its layer-normed input, written out (transformers' fused attention rounds a row by its batch position), and
    :meth:`mlp_branch` its MLP branch; each output is what the block adds to the residual stream (after open_clip's
    layer scale where the block has one)."""

    def __init__(self, projections: Sequence[Callable[[torch.Tensor], torch.Tensor]], out: nn.Module, heads: int,
                 norm1: nn.Module, norm2: nn.Module, mlp: nn.Module, scale1: Callable | None = None,
                 scale2: Callable | None = None):
        self.q, self.k, self.v = projections
        self.out, self.heads = out, int(heads)
        self.norm1, self.norm2, self.mlp = norm1, norm2, mlp
        self.scale1 = scale1 or (lambda t: t)
        self.scale2 = scale2 or (lambda t: t)

    @classmethod
    def hf(cls, layer: nn.Module) -> "VisionBlock":
        attention = layer.self_attn
        return cls((attention.q_proj, attention.k_proj, attention.v_proj), attention.out_proj, attention.num_heads,
                   layer.layer_norm1, layer.layer_norm2, layer.mlp)

    @classmethod
    def open_clip(cls, block: nn.Module) -> "VisionBlock":
        attention = block.attn  # nn.MultiheadAttention: q, k, v packed in in_proj_weight
        if getattr(attention, "in_proj_weight", None) is None:
            raise ValueError(f"the open_clip block's attention ({type(attention).__name__}) has no packed "
                             "in_proj_weight; the dual paths support open_clip's nn.MultiheadAttention blocks")
        width = attention.embed_dim
        weight, bias = attention.in_proj_weight, attention.in_proj_bias
        projections = [lambda t, i=i: nn.functional.linear(t, weight[i * width:(i + 1) * width],
                                                           None if bias is None else bias[i * width:(i + 1) * width])
                       for i in range(3)]
        return cls(projections, attention.out_proj, attention.num_heads, block.ln_1, block.ln_2, block.mlp,
                   getattr(block, "ls_1", None), getattr(block, "ls_2", None))

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V-V output, Q-K output)`` of the attention on ``norm1(x)``: ``softmax(v v^T / sqrt(d)) v`` and
        ``softmax(q k^T / sqrt(d)) v`` per head, through the output projection."""
        h = self.norm1(x)
        n, length, width = h.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        scale = (width // self.heads) ** -0.5
        outputs = []
        for a, b in ((v, v), (q, k)):
            weights = torch.softmax(a @ b.transpose(-1, -2) * scale, dim=-1)
            outputs.append(self.scale1(self.out((weights @ v).transpose(1, 2).reshape(h.shape))))
        return outputs[0], outputs[1]

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale2(self.mlp(self.norm2(x)))


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive ``(1, 1, L, L)`` mask: 0 on and below the diagonal, the dtype's minimum above it."""
    return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]


class HFClip(ClipBackbone):
    """A ``transformers.CLIPModel`` (ViT image tower) and its tokenizer as a :class:`ClipBackbone`."""

    def __init__(self, model: nn.Module, tokenizer: Any, cache_dir: str | Path | None = None,
                 use_cache: bool = True, batch_size: int = 64, progress: bool = False):
        super().__init__(cache_dir, use_cache, batch_size, progress)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        vision = model.config.vision_config
        self.image_size = int(vision.image_size)
        side = self.image_size // int(vision.patch_size)
        self.grid = (side, side)
        self.context_length = int(model.config.text_config.max_position_embeddings)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        out = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="np")
        return {"input_ids": out["input_ids"].astype(np.int64),
                "attention_mask": out["attention_mask"].astype(np.int64)}

    def text_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        return self.model.text_projection(pooled)

    def context_text_forward(self, input_ids: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Text embeddings ``(K, D)`` of prompts whose tokens ``1 .. n`` are replaced by the ``(n, width)`` vectors
        ``context`` (CoOp's learnable context; differentiable in ``context``). ``input_ids`` are full-length
        prompts ``[SOS] X ... X <name>. [EOS]`` from :meth:`tokenize`."""
        text = self.model.text_model
        tokens = text.embeddings.token_embedding(input_ids)
        n = context.shape[0]
        tokens = torch.cat([tokens[:, :1], context.to(tokens.dtype).expand(len(tokens), n, -1), tokens[:, 1 + n:]],
                           dim=1)
        h = text.embeddings(inputs_embeds=tokens)
        mask = causal_mask(h.shape[1], h.dtype, h.device)
        for layer in text.encoder.layers:
            h = _layer(layer, h, mask)
        h = text.final_layer_norm(h)
        eos_id = self.model.config.text_config.eos_token_id
        eos = input_ids.argmax(dim=-1) if eos_id == 2 else (input_ids == eos_id).int().argmax(dim=-1)
        return self.model.text_projection(h[torch.arange(len(h), device=h.device), eos])

    @property
    def token_width(self) -> int:
        return int(self.model.text_model.embeddings.token_embedding.weight.shape[1])

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.text_model.embeddings.token_embedding(input_ids)

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        return vision.embeddings(pixels.to(vision.embeddings.patch_embedding.weight.dtype))

    def vision_blocks(self) -> list[VisionBlock]:
        """The image tower's blocks for the dual paths (:class:`VisionBlock`)."""
        return [VisionBlock.hf(layer) for layer in self.model.vision_model.encoder.layers]

    def vision_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the first block: embedded tokens (class token first), pre-layer-normed."""
        return self.model.vision_model.pre_layrnorm(self._tokens(pixels))

    @property
    def vision_width(self) -> int:
        return int(self.model.vision_model.config.hidden_size)

    def _blocks(self, h: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor:
        for layer in layers:
            h = _layer(layer, h)
        return h

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        return self.model.visual_projection(vision.post_layernorm(tokens))

    def image_forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vision = self.model.vision_model
        layers = vision.encoder.layers
        h = self._blocks(vision.pre_layrnorm(self._tokens(pixels)), layers[:-1])
        last = layers[-1]
        global_ = self._project(_layer(last, h)[:, 0])
        # MaskCLIP local features: the last block with each token attending to itself only
        attention = last.self_attn
        y = h + attention.out_proj(attention.v_proj(last.layer_norm1(h)))
        y = y + last.mlp(last.layer_norm2(y))
        return global_, self._project(y[:, 1:])

    def token_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        h = self._blocks(vision.pre_layrnorm(self._tokens(pixels)), vision.encoder.layers)
        return vision.post_layernorm(h[:, 1:])

    def window_forward(self, pixels: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        tokens = self._tokens(pixels)  # (N, 1 + P, C), position embeddings added
        return _window_embeddings(tokens, windows, lambda t: self._project(
            self._blocks(vision.pre_layrnorm(t), vision.encoder.layers)[:, 0]))


def _window_embeddings(tokens: torch.Tensor, windows: torch.Tensor, run) -> torch.Tensor:
    """``(N, W, D)``: ``run`` on the class token plus each window's patch tokens; windows of one size batched."""
    n, _, c = tokens.shape
    sizes = windows.sum(dim=1)
    out: list[torch.Tensor | None] = [None] * len(windows)
    for size in torch.unique(sizes).tolist():
        chosen = torch.nonzero(sizes == size).flatten()
        index = torch.stack([torch.nonzero(windows[w]).flatten() for w in chosen.tolist()]) + 1  # (w, size)
        patches = tokens[:, index]  # (N, w, size, C)
        cls = tokens[:, :1, None].expand(n, len(chosen), 1, c)
        seq = torch.cat([cls, patches], dim=2).reshape(n * len(chosen), size + 1, c)
        emb = run(seq).reshape(n, len(chosen), -1)
        for j, w in enumerate(chosen.tolist()):
            out[w] = emb[:, j]
    return torch.stack(out, dim=1)


# -- open_clip ------------------------------------------------------------------------------------------------
class OpenClip(ClipBackbone):
    """An ``open_clip`` CLIP model (``VisionTransformer`` image tower) and its tokenizer as a :class:`ClipBackbone`.

    It follows open_clip's ``VisionTransformer`` (``conv1``, ``class_embedding``, ``positional_embedding``,
    ``ln_pre``, ``transformer.resblocks``, ``ln_post``, ``proj``) and ``nn.MultiheadAttention`` blocks.
    ``tests/test_vlm_open_clip.py`` checks the towers against open_clip's own ``encode_image`` / ``encode_text`` /
    ``output_tokens`` on a random tiny open_clip ``CLIP`` (open_clip 3.3, where open_clip imports; it needs
    torchvision).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, cache_dir: str | Path | None = None,
                 use_cache: bool = True, batch_size: int = 64, progress: bool = False):
        super().__init__(cache_dir, use_cache, batch_size, progress)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        visual = model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.grid = tuple(int(g) for g in visual.grid_size)
        mean, std = getattr(visual, "image_mean", None), getattr(visual, "image_std", None)
        self.mean, self.std = tuple(mean or CLIP_MEAN), tuple(std or CLIP_STD)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        ids = self.tokenizer(list(texts)).cpu().numpy().astype(np.int64)
        return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}

    def text_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        context = self.model.context_length if hasattr(self.model, "context_length") else input_ids.shape[1]
        ids = nn.functional.pad(input_ids, (0, max(0, context - input_ids.shape[1])))
        return self.model.encode_text(ids)

    def _batch_first(self) -> bool:
        return bool(getattr(self.model.visual.transformer, "batch_first", True))

    def _run(self, blocks: Sequence[nn.Module], h: torch.Tensor) -> torch.Tensor:
        first = self._batch_first()
        h = h if first else h.transpose(0, 1)
        for block in blocks:
            h = block(h)
        return h if first else h.transpose(0, 1)

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(len(x), 1, -1)
        return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)

    def vision_blocks(self) -> list[VisionBlock]:
        """The image tower's blocks for the dual paths (:class:`VisionBlock`)."""
        return [VisionBlock.open_clip(block) for block in self.model.visual.transformer.resblocks]

    def vision_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the first block: embedded tokens (class token first), ``ln_pre``-normed."""
        return self.model.visual.ln_pre(self._tokens(pixels))

    @property
    def vision_width(self) -> int:
        return int(self.model.visual.class_embedding.shape[-1])

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        out = visual.ln_post(tokens)
        return out @ visual.proj if visual.proj is not None else out

    def image_forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.model.visual
        blocks = visual.transformer.resblocks
        h = self._run(blocks[:-1], visual.ln_pre(self._tokens(pixels)))
        last = blocks[-1]
        global_ = self._project(self._run([last], h)[:, 0])
        attention = last.attn
        width = h.shape[-1]
        x = last.ln_1(h)
        v = nn.functional.linear(x, attention.in_proj_weight[2 * width:], attention.in_proj_bias[2 * width:])
        a = attention.out_proj(v)
        y = h + (last.ls_1(a) if hasattr(last, "ls_1") else a)
        m = last.mlp(last.ln_2(y))
        y = y + (last.ls_2(m) if hasattr(last, "ls_2") else m)
        return global_, self._project(y[:, 1:])

    def token_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        return visual.ln_post(self._run(visual.transformer.resblocks, visual.ln_pre(self._tokens(pixels)))[:, 1:])

    def window_forward(self, pixels: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        tokens = self._tokens(pixels)
        return _window_embeddings(tokens, windows, lambda t: self._project(
            self._run(visual.transformer.resblocks, visual.ln_pre(t))[:, 0]))


# -- loading --------------------------------------------------------------------------------------------------
def load_clip(source: str | os.PathLike, device: str = "cpu", **options: Any) -> ClipBackbone:
    """A :class:`ClipBackbone` from a local Hugging Face folder, a model id in the Hugging Face cache, or
    ``open_clip:ARCH[/PRETRAINED]``.

    * a folder holding a ``CLIPModel`` (``config.json`` with ``model_type: clip``, weights and tokenizer files),
      loaded with ``local_files_only=True`` (no network);
    * a Hugging Face model id (``openai/clip-vit-base-patch16``) that is not a folder: its snapshot in the local
      Hugging Face cache (:func:`hub_cache_dir`: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
      ``~/.cache/huggingface/hub``; ``models--ORG--NAME/snapshots/<revision>/`` with the revision in
      ``refs/main``), resolved offline (``local_files_only=True``, whatever ``HF_HUB_OFFLINE`` says); a missing
      one is a ``ValueError`` naming the id and the cache folder;
    * ``open_clip:ViT-B-16-plus-240/laion400m_e32`` (WinCLIP's backbone): open_clip's own loader, which reads
      its cache and downloads missing weights itself (needs ``pip install open_clip_torch``).

    ``options`` go to the backbone (``cache_dir``, ``use_cache``, ``batch_size``, ``progress``).
    """
    text = str(source)
    if text.startswith("open_clip:"):
        return load_open_clip(text[len("open_clip:"):], device=device, **options)
    path = Path(source)
    if not path.is_dir():
        if not is_model_id(text):
            raise ValueError(f"CLIP model {text!r} is not a folder; pass a local Hugging Face CLIP folder (see "
                             "oodscope.vlm.download_clip), a model id in the Hugging Face cache or "
                             "'open_clip:ARCH/PRETRAINED'")
        path = cached_snapshot(text)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"CLIP model folder {path} has no config.json: it is not a Hugging Face model folder")
    import json

    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, OSError) as error:
        raise ValueError(f"CLIP model folder {path}: config.json is unreadable ({error})") from None
    if model_type != "clip":
        raise ValueError(f"CLIP model folder {path} holds a {model_type!r} model, not a CLIP model "
                         "(config.json model_type must be 'clip')")
    try:
        from transformers import AutoTokenizer, CLIPModel
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('CLIP backbones need transformers: pip install "oodscope[vlm]"') from error
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - corrupted weights raise library-specific errors (safetensors, ...)
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise ValueError(f"CLIP model folder {path} cannot be loaded ({type(error).__name__}: {first}); "
                         "check that its weight and tokenizer files are complete") from None
    return HFClip(model.to(device), tokenizer, **options)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment now (as ``huggingface_hub`` does at import):
    ``HF_HUB_CACHE`` (or the legacy ``HUGGINGFACE_HUB_CACHE``), else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache`` by default)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def is_model_id(text: str) -> bool:
    """Whether ``text`` reads as a Hugging Face model id (``NAME`` or ``ORG/NAME``), not a file path."""
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", text) is not None and ".." not in text


def cached_snapshot(model_id: str, what: str = "CLIP model", download: str = "oodscope.vlm.download_clip"
                    ) -> Path:
    """The snapshot folder of ``model_id`` (its ``main`` revision) in the local Hugging Face cache, offline; a
    ``ValueError`` naming the id and the cache folder when it is not there (``what`` names the model's kind and
    ``download`` the function that fetches it in that message)."""
    cache = hub_cache_dir()
    entry = cache / f"models--{model_id.replace('/', '--')}"
    missing = (f"{what} {model_id!r} is neither a local folder nor in the Hugging Face cache {cache} (no "
               f"{entry.name}/snapshots for refs/main); download it once where there is network (e.g. "
               f"`hf download {model_id}`, or {download}), set HF_HUB_CACHE / HF_HOME to the cache "
               "that holds it, or pass the model's folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:  # pragma: no cover - transformers depends on it
        raise ImportError('CLIP backbones need transformers: pip install "oodscope[vlm]"') from error
    try:
        folder = Path(snapshot_download(model_id, cache_dir=cache, local_files_only=True))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, a malformed id or cache entry: one message
        raise ValueError(missing) from None
    if not folder.is_dir():
        raise ValueError(missing)
    return folder


def load_open_clip(name: str, device: str = "cpu", **options: Any) -> OpenClip:
    """``ARCH[/PRETRAINED]`` through ``open_clip.create_model_and_transforms`` (downloads when not cached)."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError('open_clip backbones need open_clip: pip install "oodscope[vlm]" open_clip_torch'
                          ) from error
    arch, _, pretrained = name.partition("/")
    model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None, device=device)
    return OpenClip(model, open_clip.get_tokenizer(arch), **options)


def download_clip(repo_id: str = "openai/clip-vit-base-patch16", folder: str | os.PathLike | None = None
                  ) -> Path:
    """Download a Hugging Face CLIP model into ``folder`` (for users with network access; oodscope never
    calls this). Returns the folder, which :func:`load_clip` then reads offline."""
    from transformers import AutoTokenizer, CLIPModel

    folder = Path(folder or repo_id.replace("/", "--"))
    CLIPModel.from_pretrained(repo_id).save_pretrained(folder)
    AutoTokenizer.from_pretrained(repo_id).save_pretrained(folder)
    return folder


def resolve_clip(model: str | os.PathLike | ClipBackbone | None, device: str = "cpu") -> ClipBackbone:
    """A :class:`ClipBackbone` from a detector's ``model`` parameter (loaded folders are remembered)."""
    if isinstance(model, ClipBackbone):
        return model
    if model is None:
        raise ValueError("no CLIP model: pass model= a local Hugging Face CLIP folder, a model id in the Hugging "
                         "Face cache, 'open_clip:ARCH/PRETRAINED' or an oodscope.vlm.ClipBackbone")
    if isinstance(model, (str, os.PathLike)):
        text = str(model)
        if text.startswith("open_clip:"):
            key = (text, device)
        elif Path(model).is_dir() or not is_model_id(text):
            key = (str(Path(model).resolve()), device)
        else:  # a model id: its snapshot in the cache the environment names now
            key = (f"{text} in {hub_cache_dir()}", device)
        if key not in _LOADED:
            _LOADED[key] = load_clip(model, device=device)
        return _LOADED[key]
    raise ValueError(f"model must be a CLIP folder, 'open_clip:ARCH/PRETRAINED' or an oodscope.vlm.ClipBackbone, "
                     f"got {type(model).__name__}")


_LOADED: dict[tuple[str, str], ClipBackbone] = {}
