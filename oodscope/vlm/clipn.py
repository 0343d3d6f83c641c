"""CLIPN: CLIP taught to say "no", with learnable "no" prompts and a "no" text encoder.

Wang, Li, Yang, Cheng & Li, "CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No", ICCV 2023 (facts from the
paper and the authors' released code, GitHub ``xmed-lab/CLIPN``, folder ``src/``: initialisation, which parameters
train, the loss normalisation, the scores).

* **"No" text encoder**: a copy of CLIP's text encoder (token and position embeddings, transformer, final layer
  norm, projection), initialised with CLIP's text weights and trained; ``n_prompts = 16`` learnable "no" prompts,
  each a ``(context length, width)`` tensor initialised to zero and **added** to the token + position
  embeddings. In training each text draws one of the 16 prompts or their mean (seeded); at inference the mean
  prompt is used. CLIP's image and text encoders and its logit scale stay frozen.
* **Image-text binary-opposite loss** (ITBO): for image ``i`` and text ``j``, ``p_yes(i, j)`` and ``p_no(i, j) =
  1 - p_yes`` are the softmax of ``s <f_i, g_j>`` and ``s <f_i, h_j>`` (``g`` the standard, ``h`` the "no" text
  embedding, ``s`` CLIP's logit scale); ``L_yes = -mean over matched pairs log p_yes``, ``L_no = -mean over
  unmatched pairs log p_no``.
* **Text semantic-opposite loss** (TSO): ``L_tso = mean_j (2 - ||g_j - h_j||_2)`` (with the authors' 1e-4 inside
  the square root), pushing each "no" text away from its standard text.
* The loss is ``(L_yes + L_no + L_tso) / 2``, minimised with AdamW (learning rate 3e-4, betas (0.9, 0.98), eps
  1e-6, weight decay 0.2), a cosine schedule over ``epochs``; batches from a seeded generator; image features
  computed once (no augmentation).
* **Scores** with ``p_yes_c = softmax(s <f, g_c>, s <f, h_c>)_yes`` and ``p_c = softmax_c(s <f, g_c>)``:
  competing-to-win ``CTW = p_yes`` of the predicted class ``argmax_c p_c``; agreeing-to-differ ``ATD = sum_c
  p_yes_c p_c``. The OOD score is ``-CTW`` or ``-ATD`` (``scoring="atd"`` by default).

Two ways to train the "no" encoder:

**Open-world pre-training (the paper's mode).** :func:`pretrain_no_encoder` trains it on image-caption pairs
(CC3M in the paper, read by :func:`load_captioned_images` from an img2dataset ``files`` folder) and writes it to a
file; ``CLIPN(no_encoder=that file).fit(class_names)`` is then zero-shot on any ID class names (no ID images), as
in the paper. What the authors' code does (paths in ``xmed-lab/CLIPN``):

* data: CC3M downloaded with img2dataset as **webdataset** tar shards (``README.md``; ``src/run.sh``:
  ``--train-data '/tmp/gcc3m/gcc-train-{00000..00331}.tar' --train-num-samples 2891445 --dataset-type
  webdataset``), read in ``src/training/data.py`` (``get_wds_dataset``: samples without a ``txt`` caption dropped,
  ``jpg;png`` decoded to RGB, the caption tokenized to 77 tokens with the end token kept on truncation,
  ``src/open_clip/tokenizer.py``; a csv/tsv reader with ``filepath`` / ``title`` columns exists too). Training
  batches are full (``wds.batched(batch_size, partial=False)``); shards and samples are shuffled.
* a batch is image ``i`` with caption ``i``: ``src/open_clip/loss.py`` (``ClipLoss``) builds the ``N x N`` image /
  caption logits of both encoders, ``eyes = torch.eye(N)`` marks the matched (diagonal) pairs, ``L_yes = sum over
  the diagonal / N``, ``L_no = sum off the diagonal / (N^2 - N)``, TSO over the batch's captions; ``src/training/
  train.py`` takes ``(L_yes + L_no + L_tso) * 0.5``. Features are gathered over the 4 GPUs (without gradient
  through the other ranks), so the loss matrix spans the global batch ``4 x 512 = 2048``.
* ``src/run.sh``: ViT-B-16 (``laion2b_s34b_b88k``, open_clip), ``--batch-size 512`` per GPU on 4 GPUs,
  ``--epochs 10``, ``--precision amp``; ``src/training/params.py``: lr 3e-4, betas (0.9, 0.98), eps 1e-6,
  ``--wd 0.2``, ``--warmup`` 0 steps (the default; ``run.sh`` sets none); ``src/training/scheduler.py``
  (``cosine_lr``): cosine decay per step over all steps after the warm-up; ``src/training/main.py``: AdamW
  without weight decay on parameters with ``ndim < 2`` or ``bn`` / ``ln`` / ``bias`` / ``logit_scale`` in their
  name (so the 3-d ``prompt_no`` **is** decayed).
* which parameters train: ``src/open_clip/factory.py`` (``create_model``) freezes the whole image tower and every
  parameter whose name lacks ``_no``: only ``transformer_no``, ``token_embedding_no``, ``positional_embedding_no``,
  ``ln_final_no``, ``text_projection_no`` and ``prompt_no`` train; ``load_state_dict`` there copies CLIP's text
  weights into the ``_no`` copies. ``src/open_clip/model.py``: ``prompt_no`` is ``zeros(16, 77, width)``;
  ``encode_text(text, "no")`` in training adds ``cat([prompt_no, prompt_no.mean(0)])[randint(0, 17, batch)]``
  (one draw per text, numpy's global RNG) to the token + position embeddings, in evaluation the mean prompt.
* image augmentation: ``src/open_clip/transform.py`` (``image_transform(is_train=True)``):
  ``RandomResizedCrop(image_size, scale=(0.9, 1.0), bicubic)``, RGB, normalisation with the model's mean / std
  (OpenAI CLIP's by default, ``src/open_clip/factory.py``).

What differs here: the image tower is frozen, so the image features are computed **once** with the backbone's own
``encode_images`` (in chunks; its preprocessing: bicubic shorter-side resize, centre crop, normalisation), without
the random resized crop; the standard caption embeddings likewise (the "yes" tower is frozen too). One process:
the loss matrix is one batch (``batch_size=512`` by default, the authors' per-GPU size; pass 2048 for their global
loss batch where memory allows); float32 instead of mixed precision; the cosine rate is set per epoch
(:func:`~oodscope.vlm._train.cosine_rates`), not per step; the last batch of an epoch is kept (a batch of one pair
has no unmatched pair, its loss is ``(L_yes + L_tso) / 2``); the prompts are drawn from the run's seeded
generator. Decay as the authors' ``main.py`` (the prompts decayed). The CLIP backbone must be a Hugging Face CLIP
(:class:`~oodscope.vlm.backbone.HFClip`: the encoder copies its ``text_model``). On CPU, pre-training a ViT-B
text tower on all of CC3M (2.9 M pairs, 10 epochs) is not practical; take a subset (``limit=``) or a GPU
(``device="cuda"``).

The file holds the trained parameters of :class:`NoTextEncoder` (prompts + the text-tower copy), the losses, the
settings and a fingerprint of the CLIP model it was trained from (a digest of all of CLIP's parameters, its text
configuration and its tokenizer's ids of a probe text), written atomically with ``torch.save`` and read back
with ``torch.load(weights_only=True)``; a file from another CLIP, another program, a truncated or a damaged file
is refused with a ``ValueError``.

Zero-shot scoring: the authors' ``src/classification.py`` (``merge_yes_no_feature``) averages each class's unit
"yes" and "no" embeddings over the templates of their ``src/prompt/prompt.txt`` and renormalises them;
``templates=`` takes such a list (default: the single ``prompt``), and the logit scale is CLIP's own (100 for
OpenAI's CLIP, the authors' fixed 100).

**Few-shot ID adaptation.** Without ``no_encoder``, ``fit(classes, images, labels)`` trains a fresh "no" encoder
on labelled ID images with their class prompts instead (image ``i`` matches the prompt of its label, every other
class prompt is unmatched); there the prompts get no weight decay (1-d parameters, norms, biases and prompts
excluded). Only the class embeddings that the "no" encoder produces are kept (``no_text_embeddings_``), not the
encoder itself.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ._train import cosine_rates, digest_arrays, run_epochs
from .backbone import _layer, causal_mask, resolve_clip
from .base import VLMDetector, check_images, class_names, l2_normalise, softmax
from .mcm import DEFAULT_PROMPT

SCORES = ("atd", "ctw")
NO_ENCODER_FORMAT = "oodscope.clipn.no_encoder"  # the "format" entry of a pretrain_no_encoder file
NO_ENCODER_VERSION = 1
IMAGE_CHUNK = 1024  # images encoded (and converted to float32) at a time by pretrain_no_encoder
CAPTION_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # img2dataset's --encode_format choices


def clipn_losses(image: torch.Tensor, text_yes: torch.Tensor, text_no: torch.Tensor, match: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L_yes, L_no, L_tso)`` of normalised ``image (N, D)``, ``text_yes``/``text_no (M, D)``, ``match (N, M)``."""
    logits = torch.stack([scale * image @ text_yes.T, scale * image @ text_no.T], dim=-1)
    log_p = torch.log_softmax(logits, dim=-1)
    match = match.bool()
    loss_yes = -log_p[..., 0][match].mean()
    loss_no = -log_p[..., 1][~match].mean()
    loss_tso = (2.0 - torch.sqrt(2.0 - 2.0 * (text_yes * text_no).sum(dim=-1) + 1e-4)).mean()
    return loss_yes, loss_no, loss_tso


class NoTextEncoder(nn.Module):
    """CLIPN's "no" text encoder: a trainable copy of a Hugging Face CLIP text tower plus additive "no" prompts."""

    def __init__(self, clip_model: nn.Module, n_prompts: int = 16):
        super().__init__()
        self.text_model = copy.deepcopy(clip_model.text_model)
        self.text_projection = copy.deepcopy(clip_model.text_projection)
        self.eos_token_id = int(clip_model.config.text_config.eos_token_id)
        length = int(clip_model.config.text_config.max_position_embeddings)
        width = int(self.text_model.embeddings.token_embedding.weight.shape[1])
        self.prompt_no = nn.Parameter(torch.zeros(n_prompts, length, width))
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, prompt_index: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised "no" embeddings of full-length token ids; ``prompt_index`` per text (``n_prompts`` = the
        mean prompt), or ``None`` for the mean prompt (inference)."""
        text = self.text_model
        length = input_ids.shape[1]
        prompts = torch.cat([self.prompt_no, self.prompt_no.mean(dim=0, keepdim=True)])[:, :length]
        added = prompts[-1:] if prompt_index is None else prompts[prompt_index]
        h = text.embeddings(input_ids=input_ids) + added
        mask = causal_mask(length, h.dtype, h.device)
        for layer in text.encoder.layers:
            h = _layer(layer, h, mask)
        h = text.final_layer_norm(h)
        eos = input_ids.argmax(dim=-1) if self.eos_token_id == 2 else (input_ids == self.eos_token_id).int().argmax(-1)
        return nn.functional.normalize(self.text_projection(h[torch.arange(len(h), device=h.device), eos]), dim=-1)


def _decay_groups(module: nn.Module, weight_decay: float, decay_prompts: bool = False) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-d parameters (gains, biases), norms and (unless ``decay_prompts``, as the
    authors' ``src/training/main.py`` does) on the prompts."""
    decay, plain = [], []
    for name, p in module.named_parameters():
        skip = p.ndim < 2 or "norm" in name or "bias" in name or (not decay_prompts and "prompt" in name)
        (plain if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


# -- open-world pre-training ----------------------------------------------------------------------------------
def _hf_clip(clip, who: str):
    if not hasattr(getattr(clip, "model", None), "text_model"):
        raise ValueError(f"{who}: the backbone {type(clip).__name__} is not a Hugging Face CLIP "
                         "(the \"no\" encoder copies its text_model)")
    return clip


def clip_fingerprint(clip) -> str:
    """A digest of the Hugging Face CLIP a "no" encoder belongs to: all its parameters (both towers, projections,
    logit scale; names, dtypes, shapes and values, not the buffers, whose persistence varies between transformers
    versions), its text configuration and its tokenizer's ids of a probe text."""
    config = clip.model.config.text_config
    fields = {key: getattr(config, key, None) for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id")}
    probe = np.asarray(clip.tokenize(["a photo of a dog.", "This is not a photo of a cat!"])["input_ids"], np.int64)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, p in clip.model.named_parameters():
        values = p.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {values.dtype} {tuple(p.shape)}".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes())
    digest.update(probe.tobytes())
    return digest.hexdigest()


def _positive_int(value: Any, key: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{who}: {key} must be a positive integer, got {value!r}")
    return int(value)


def _check_rates(lr: Any, weight_decay: Any, who: str) -> None:
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
        raise ValueError(f"{who}: lr must be > 0, got {lr!r}")
    if isinstance(weight_decay, bool) or not (isinstance(weight_decay, (int, float)) and np.isfinite(weight_decay)
                                              and weight_decay >= 0):
        raise ValueError(f"{who}: weight_decay must be >= 0, got {weight_decay!r}")


def _check_captions(captions: Any, n_images: int, who: str) -> list[str]:
    if isinstance(captions, (str, bytes)):
        raise ValueError(f"{who}: captions must be a list of strings (one per image), not a single string")
    try:
        captions = list(captions)
    except TypeError:
        raise ValueError(f"{who}: captions must be a list of strings, got {type(captions).__name__}") from None
    wrong = [i for i, c in enumerate(captions) if not isinstance(c, (str, np.str_))]
    if wrong:
        raise ValueError(f"{who}: captions at positions {wrong[:8]} are not strings "
                         f"({type(captions[wrong[0]]).__name__})")
    empty = [i for i, c in enumerate(captions) if not str(c).strip()]
    if empty:
        raise ValueError(f"{who}: captions at positions {empty[:8]} are empty; every image needs its caption")
    if len(captions) != n_images:
        raise ValueError(f"{who}: {n_images} images but {len(captions)} captions; image i goes with caption i")
    if len(captions) < 2:
        raise ValueError(f"{who}: {len(captions)} image-caption pair; the ITBO loss needs unmatched pairs, pass at "
                         "least 2")
    return [str(c) for c in captions]


def _image_features(clip, images: Any, device: str, who: str) -> np.ndarray:
    """Normalised global CLIP features of ``images``, checked and encoded ``IMAGE_CHUNK`` at a time."""
    patch = clip.image_size // max(clip.grid)
    for start in range(0, len(images), IMAGE_CHUNK):  # check everything first: no encoding wasted on bad data
        check_images(images[start:start + IMAGE_CHUNK], f"{who}: images[{start}:{start + IMAGE_CHUNK}]",
                     min_side=patch)
    chunks = []
    for start in range(0, len(images), IMAGE_CHUNK):
        chunk = check_images(images[start:start + IMAGE_CHUNK], f"{who}: images")
        chunks.append(clip.encode_images(chunk, device=device, name="clipn-pretrain", patches=False)[0])
    return l2_normalise(np.concatenate(chunks))


def pretrain_no_encoder(model: Any, images: Any, captions: Sequence[str], out: str | os.PathLike, *,
                        n_prompts: int = 16, epochs: int = 10, lr: float = 3e-4, weight_decay: float = 0.2,
                        batch_size: int = 512, seed: int = 0, device: str = "cpu",
                        checkpoint: str | os.PathLike | None = None) -> list[float]:
    """Pre-train CLIPN's "no" encoder on image-caption pairs (the paper's CC3M mode) and write it to ``out``.

    ``model`` is the CLIP (a :class:`~oodscope.vlm.backbone.HFClip`, a Hugging Face CLIP folder or model id);
    ``images`` ``(N, 3, H, W)`` uint8 or float in [0, 1] (e.g. from :func:`load_captioned_images`), resized and
    normalised by the backbone's own preprocessing; ``captions`` ``N`` non-empty strings, caption ``i`` describing
    image ``i``. Each batch pairs its images with its captions, matched on the diagonal (the authors' ``eyes``);
    the loss is ``(L_yes + L_no + L_tso) / 2`` (:func:`clipn_losses`). The frozen CLIP towers encode the images
    (in chunks of ``IMAGE_CHUNK``) and the captions once; only the :class:`NoTextEncoder` trains, AdamW (betas
    (0.9, 0.98), eps 1e-6, ``weight_decay`` on matrices and prompts), a cosine rate per epoch from ``lr``, seeded
    batches and prompt draws, a tqdm bar. Defaults are the authors' (``epochs=10``, ``lr=3e-4``, ``weight_decay=0.2``,
    ``batch_size=512`` per GPU; see the module docstring for what differs).

    ``out`` receives the encoder's parameters, the per-epoch losses, the settings and :func:`clip_fingerprint`
    of ``model`` (``torch.save``, written to a temporary file in the same folder, then renamed: a killed run never
    leaves half a file); ``CLIPN(no_encoder=out)`` reads it. With ``checkpoint`` (a path) the state is saved after
    every epoch and a rerun of the same pre-training resumes after the last saved epoch with the same result.
    Returns the mean loss of each epoch.
    """
    from ..extraction.extract import resolve_device
    from ..safeio import write_atomic

    who = "clipn pre-training"
    n_prompts, epochs = _positive_int(n_prompts, "n_prompts", who), _positive_int(epochs, "epochs", who)
    batch_size = _positive_int(batch_size, "batch_size", who)
    _check_rates(lr, weight_decay, who)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{who}: seed must be an integer, got {seed!r}")
    if not isinstance(out, (str, os.PathLike)) or not str(out) or Path(out).is_dir():
        raise ValueError(f"{who}: out must be the path of the file to write, got {out!r}")
    images = getattr(images, "images", images)
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not hasattr(images, "__len__") or not hasattr(images, "__getitem__") or isinstance(images, (str, bytes)):
        raise ValueError(f"{who}: images must be an array (N, 3, H, W), got {type(images).__name__}")
    if not isinstance(images, np.ndarray):
        images = np.asarray(images)
    captions = _check_captions(captions, len(images), who)
    device_ = resolve_device(device)
    clip = _hf_clip(resolve_clip(model, device=str(device_)), who)
    image = _image_features(clip, images, str(device_), who)
    text_yes = l2_normalise(clip.encode_texts(captions, device=str(device_), name="clipn-captions"))
    ids = np.asarray(clip.tokenize(captions)["input_ids"], np.int64)

    with torch.random.fork_rng(devices=[]):  # the copy draws nothing, but keep the caller's RNG untouched
        encoder = NoTextEncoder(clip.model, n_prompts).to(device_).train()
    optimiser = torch.optim.AdamW(_decay_groups(encoder, float(weight_decay), decay_prompts=True), lr=float(lr),
                                  betas=(0.9, 0.98), eps=1e-6)
    generator = torch.Generator().manual_seed(int(seed))
    f = torch.from_numpy(image).float().to(device_)
    g = torch.from_numpy(text_yes).float().to(device_)
    tokens = torch.from_numpy(ids).to(device_)
    scale = clip.logit_scale

    def step(batch: torch.Tensor) -> torch.Tensor:  # image i with caption i: the diagonal is matched
        pick = torch.randint(0, n_prompts + 1, (len(batch),), generator=generator).to(device_)
        match = torch.eye(len(batch), dtype=torch.bool, device=device_)
        loss_yes, loss_no, loss_tso = clipn_losses(f[batch], g[batch], encoder(tokens[batch], pick), match, scale)
        if len(batch) == 1:  # one pair: no unmatched pair, L_no is undefined
            return 0.5 * (loss_yes + loss_tso)
        return 0.5 * (loss_yes + loss_no + loss_tso)

    settings = {"n_prompts": n_prompts, "epochs": epochs, "lr": float(lr), "weight_decay": float(weight_decay),
                "batch_size": batch_size, "seed": int(seed), "n_pairs": len(captions)}
    key = hashlib.sha256((digest_arrays(image, text_yes, ids) + json.dumps(settings, sort_keys=True)).encode())
    history = run_epochs(step, optimiser, len(captions), batch_size, cosine_rates(float(lr), epochs), generator,
                         device_, "clipn-pretrain", checkpoint=checkpoint, key=key.hexdigest())
    payload = {"format": NO_ENCODER_FORMAT, "version": NO_ENCODER_VERSION, "clip": clip_fingerprint(clip),
               "n_prompts": n_prompts, "settings": settings,
               "history": torch.tensor(history, dtype=torch.float64),
               "params": {name: p.detach().cpu().clone() for name, p in encoder.named_parameters()}}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, buffer.getvalue())
    return history


def load_no_encoder(path: str | os.PathLike, model: Any, device: str = "cpu") -> NoTextEncoder:
    """The :class:`NoTextEncoder` written by :func:`pretrain_no_encoder` to ``path``, for the CLIP ``model`` (in
    evaluation mode, on ``device``). A ``ValueError`` says why a file is refused: not a PyTorch file or truncated,
    pickled objects, not a "no"-encoder file, one pre-trained from another CLIP model, missing or misshapen
    tensors."""
    from ..extraction.extract import resolve_device
    from ..safeio import load_torch

    path = Path(path)
    what = 'CLIPN "no" encoder file'
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist; write one with "
                                "oodscope.vlm.clipn.pretrain_no_encoder")
    device_ = resolve_device(device)
    clip = _hf_clip(resolve_clip(model, device=str(device_)), "clipn")
    state = load_torch(path, what=what)  # ValueError for a corrupt file or pickled objects
    if not isinstance(state, dict) or state.get("format") != NO_ENCODER_FORMAT:
        raise ValueError(f"{what} {path} is not a \"no\" encoder written by oodscope.vlm.clipn.pretrain_no_encoder "
                         "(no 'format' entry of that kind)")
    if state.get("version") != NO_ENCODER_VERSION:
        raise ValueError(f"{what} {path} has format version {state.get('version')!r}; this oodscope reads version "
                         f"{NO_ENCODER_VERSION}")
    expected = clip_fingerprint(clip)
    if state.get("clip") != expected:
        raise ValueError(f"{what} {path} was pre-trained from another CLIP model (fingerprint "
                         f"{str(state.get('clip'))[:12]}..., this model's {expected[:12]}...): a \"no\" encoder only "
                         "works with the CLIP it was trained against; pre-train one for this model")
    n_prompts, params = state.get("n_prompts"), state.get("params")
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1 or not isinstance(params, dict):
        raise ValueError(f"{what} {path} is damaged: no valid 'n_prompts' / 'params' entries")
    with torch.random.fork_rng(devices=[]):
        encoder = NoTextEncoder(clip.model, n_prompts)
    own = dict(encoder.named_parameters())
    missing, unexpected = sorted(set(own) - set(params)), sorted(set(params) - set(own))
    if missing or unexpected:
        raise ValueError(f"{what} {path} is damaged: missing tensors {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for name, p in own.items():
            saved = params[name]
            if not isinstance(saved, torch.Tensor) or saved.shape != p.shape or not saved.is_floating_point() \
                    or not torch.isfinite(saved).all():
                raise ValueError(f"{what} {path} is damaged: tensor {name} is not a finite float tensor of shape "
                                 f"{tuple(p.shape)}")
            p.copy_(saved)
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.to(device_).eval()


def load_captioned_images(folder: str | os.PathLike, size: int, limit: int | None = None
                          ) -> tuple[np.ndarray, list[str]]:
    """Image-caption pairs of an img2dataset ``--output_format files`` folder (CC3M as in CLIPN's README).

    img2dataset writes ``<folder>/<shard>/<key>.jpg`` with the caption in ``<key>.txt`` next to it (and
    ``<key>.json``, ``<shard>.parquet``, ``<shard>_stats.json``, ignored here); images directly in ``folder`` are
    read too. Pairs come in sorted order (shard, then key); ``limit`` keeps the first ``limit``. Each image is
    read as RGB, its shorter side resized to ``size`` (bilinear) and centre-cropped
    (:func:`oodscope.data.spec.read_image`); pass the backbone's ``image_size`` (224 for ViT-B/16), which then only
    normalises. Returns ``(images, captions)``: uint8 ``(N, 3, size, size)`` and ``N`` stripped captions.

    Every image is held in memory: ``3 size^2`` bytes each (147 KiB at 224, so 2.9 M CC3M images would take
    ~420 GiB); use ``limit`` for a subset. A missing folder, no pairs, an image without its ``.txt``, an empty or
    non-UTF-8 caption and an unreadable image are refused with an error naming the file.
    """
    from ..data.spec import read_image

    size = _positive_int(size, "size", "load_captioned_images")
    if limit is not None:
        limit = _positive_int(limit, "limit", "load_captioned_images")
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"caption folder {root} does not exist (expected img2dataset's 'files' output: "
                                "<folder>/<shard>/<key>.jpg with <key>.txt)")
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    paths = [p for sub in folders for p in sorted(sub.iterdir())
             if p.is_file() and p.suffix.lower() in CAPTION_IMAGE_SUFFIXES and not p.name.startswith(".")]
    if not paths:
        raise ValueError(f"caption folder {root} holds no images ({', '.join(CAPTION_IMAGE_SUFFIXES)}) in it or its "
                         "shard sub-folders; expected img2dataset's 'files' output (<shard>/<key>.jpg + <key>.txt)")
    if limit is not None:
        paths = paths[:limit]
    captions = []
    for path in paths:
        text_file = path.with_suffix(".txt")
        if not text_file.is_file():
            raise ValueError(f"image {path} has no caption file {text_file.name} next to it")
        try:
            caption = text_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as error:
            raise ValueError(f"caption file {text_file} is not UTF-8 text ({error.reason})") from None
        if not caption:
            raise ValueError(f"caption file {text_file} is empty; drop the pair or add its caption")
        captions.append(caption)
    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):  # decoding is per file; read_image names a corrupt file
        images[i] = read_image(path, size).transpose(2, 0, 1)
    return images, captions


# -- the detector ---------------------------------------------------------------------------------------------
class CLIPN(VLMDetector):
    """CLIPN scored by ATD or CTW (see module docstring): zero-shot with a pre-trained ``no_encoder`` (the paper's
    mode, :func:`pretrain_no_encoder`), or its "no" encoder trained on labelled ID images."""

    name = "clipn"
    trains_network = True
    grid = {"scoring": list(SCORES)}

    def __init__(self, model=None, prompt: str = DEFAULT_PROMPT, n_prompts: int = 16, epochs: int = 10,
                 lr: float = 3e-4, weight_decay: float = 0.2, batch_size: int = 64, scoring: str = "atd",
                 seed: int = 0, device: str = "cpu", checkpoint: str | None = None, no_encoder: str | None = None,
                 templates: Sequence[str] | None = None):
        self.model = model
        self.checkpoint = checkpoint  # a file: the fit saves after every epoch and an interrupted fit resumes
        self.prompt = prompt
        self.n_prompts = n_prompts
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.scoring = scoring
        self.seed = seed
        self.device = device
        # a file of pretrain_no_encoder: fit(classes) is then zero-shot and the training parameters are unused
        self.no_encoder = no_encoder
        self.templates = templates  # zero-shot: both embeddings of a class averaged over these prompt templates

    def _check_params(self) -> None:
        super()._check_params()
        for key in ("n_prompts", "epochs", "batch_size"):
            _positive_int(getattr(self, key), key, self.name)
        if self.scoring not in SCORES:
            raise ValueError(f"{self.name}: scoring must be one of {SCORES}, got {self.scoring!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"{self.name}: lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"{self.name}: weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.no_encoder is not None and (not isinstance(self.no_encoder, str) or not self.no_encoder):
            raise ValueError(f"{self.name}: no_encoder must be None or the path (a string) of a file written by "
                             f"oodscope.vlm.clipn.pretrain_no_encoder, got {self.no_encoder!r}")
        if self.templates is not None:
            if self.no_encoder is None:
                raise ValueError(f"{self.name}: templates= applies to the zero-shot fit with a pre-trained "
                                 "no_encoder=; the few-shot fit trains on the single prompt=")
            if isinstance(self.templates, str) or not list(self.templates) or any(
                    not isinstance(t, str) or "{}" not in t for t in self.templates):
                raise ValueError(f"{self.name}: templates must be a non-empty list of strings with a '{{}}' for the "
                                 f"class name (e.g. ['a photo of a {{}}.', 'a sketch of a {{}}.']), got "
                                 f"{self.templates!r}")

    def fit(self, classes: Any, images: Any = None, labels: Any = None) -> "CLIPN":
        """Zero-shot with ``no_encoder``: encode the ``classes``' prompts with it (no images). Otherwise train the
        "no" encoder and prompts on labelled ID ``images`` of the ``classes``."""
        if images is None and isinstance(classes, tuple) and len(classes) == 3 and not isinstance(classes[0], str):
            classes, images, labels = classes
        names = class_names(classes, self.name)
        self._check_params()
        if self.no_encoder is not None:
            if images is not None or labels is not None:
                raise ValueError(f"{self.name}: no_encoder={str(self.no_encoder)!r} makes the fit zero-shot: call "
                                 "fit(class_names) without images (or set no_encoder=None to train on them)")
            return self._fit_zero_shot(names)
        if images is None or labels is None:
            raise ValueError(f"{self.name}: fit needs labelled ID images: fit(classes, images, labels), or a "
                             "pre-trained no_encoder= for the zero-shot fit(classes)")
        images = check_images(images, f"{self.name}: ID images")
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
            raise ValueError(f"{self.name}: labels must be {len(images)} integer class indices, got "
                             f"{labels.dtype} {labels.shape}")
        if labels.min() < 0 or labels.max() >= len(names):
            raise ValueError(f"{self.name}: labels must lie in 0..{len(names) - 1} ({len(names)} classes), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        self._reset_fitted()
        clip = _hf_clip(self.clip(), self.name)
        from ..extraction.extract import resolve_device

        device = resolve_device(self.device)
        prompts = [self.prompt.format(n) for n in names]
        self.classes_ = names
        self.text_embeddings_ = l2_normalise(self._encode_texts(clip, prompts))
        image = l2_normalise(clip.encode_images(images, device=str(device), name="clipn-train", patches=False)[0])
        ids = torch.as_tensor(clip.tokenize(prompts)["input_ids"]).to(device)
        self.no_text_embeddings_ = self._train(clip, ids, image, labels, device)
        self._check_reserved()
        self.input_dims_ = {"classes": (len(names),)}
        return self

    def _fit_zero_shot(self, names: list[str]) -> "CLIPN":
        from ..extraction.extract import resolve_device

        self._reset_fitted()
        clip = _hf_clip(self.clip(), self.name)
        device = resolve_device(self.device)
        encoder = load_no_encoder(self.no_encoder, clip, device=str(device))
        templates = [self.prompt] if self.templates is None else list(self.templates)
        prompts = [t.format(n) for n in names for t in templates]  # class-major
        self.classes_ = names
        yes = l2_normalise(self._encode_texts(clip, prompts))
        ids = torch.as_tensor(clip.tokenize(prompts)["input_ids"]).to(device)
        with torch.no_grad():  # in chunks: classes x templates texts can be many (1,000 x 80 for ImageNet)
            no = l2_normalise(torch.cat([encoder(chunk).double().cpu() for chunk in ids.split(256)]).numpy())
        # the authors' merge_yes_no_feature: each class's unit embeddings averaged over the templates, renormalised
        self.text_embeddings_, self.no_text_embeddings_ = (
            l2_normalise(e.reshape(len(names), len(templates), -1).mean(axis=1)) for e in (yes, no))
        self._check_reserved()
        self.input_dims_ = {"classes": (len(names),)}
        return self

    def _train(self, clip, ids: torch.Tensor, image: np.ndarray, labels: np.ndarray, device: torch.device
               ) -> np.ndarray:
        with torch.random.fork_rng(devices=[]):  # the copy draws nothing, but keep the caller's RNG untouched
            encoder = NoTextEncoder(clip.model, int(self.n_prompts)).to(device).train()
        optimiser = torch.optim.AdamW(_decay_groups(encoder, float(self.weight_decay)), lr=self.lr,
                                      betas=(0.9, 0.98), eps=1e-6)
        generator = torch.Generator().manual_seed(int(self.seed))
        f = torch.from_numpy(image).float().to(device)
        g = torch.from_numpy(self.text_embeddings_).float().to(device)
        y = torch.from_numpy(labels.astype(np.int64)).to(device)
        classes = torch.arange(len(ids), device=device)
        scale = clip.logit_scale

        def step(batch: torch.Tensor) -> torch.Tensor:  # each text draws one of the prompts or their mean
            pick = torch.randint(0, self.n_prompts + 1, (len(ids),), generator=generator).to(device)
            losses = clipn_losses(f[batch], g, encoder(ids, pick), y[batch, None] == classes[None], scale)
            return 0.5 * sum(losses)

        self.history_ = run_epochs(step, optimiser, len(y), self.batch_size, cosine_rates(self.lr, self.epochs),
                                   generator, device, "clipn", checkpoint=self.checkpoint,
                                   key=digest_arrays(image, labels, self.text_embeddings_, ids.cpu().numpy()))
        with torch.no_grad():
            return l2_normalise(encoder.eval()(ids).double().cpu().numpy())

    def _score_embeddings(self, image: np.ndarray, patches: np.ndarray | None) -> np.ndarray:
        scale = self.clip().logit_scale
        yes, no = scale * image @ self.text_embeddings_.T, scale * image @ self.no_text_embeddings_.T
        p_yes = softmax(np.stack([yes, no], axis=-1), axis=-1)[..., 0]
        p = softmax(yes, axis=-1)
        if self.scoring == "ctw":
            return -p_yes[np.arange(len(p)), p.argmax(axis=1)]
        return -(p_yes * p).sum(axis=1)
