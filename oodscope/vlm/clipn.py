"""CLIPN: CLIP taught to say "no", with learnable "no" prompts and a "no" text encoder.

Wang, Li, Yang, Cheng & Li, "CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No", ICCV 2023 (facts from the
paper and the authors' released code: initialisation, which parameters train, the loss normalisation, the scores).

* **"No" text encoder**: a copy of CLIP's text encoder (token and position embeddings, transformer, final layer
  norm, projection), initialised with CLIP's text weights and trained; ``n_prompts = 16`` learnable "no" prompts,
  each a ``(context length, width)`` tensor initialised to zero and **added** to the token + position
  embeddings. In training each text draws one of the 16 prompts or their mean (seeded); at inference the mean
  prompt is used. CLIP's image and text encoders and its logit scale stay frozen.
* **Image-text binary-opposite loss** (ITBO): for image ``i`` and text ``j``, ``p_yes(i, j)`` and ``p_no(i, j) =
  1 - p_yes`` are the softmax of ``s <f_i, g_j>`` and ``s <f_i, h_j>`` (``g`` the standard, ``h`` the "no" text
  embedding, ``s`` CLIP's logit scale); ``L_yes = -mean over matched pairs log p_yes``, ``L_no = -mean over
  unmatched pairs log p_no``. The authors' batches pair image ``i`` with caption ``i`` (matched = the diagonal);
  here the texts are the ID class prompts and image ``i`` matches the prompt of its label, every other class
  prompt is unmatched.
* **Text semantic-opposite loss** (TSO): ``L_tso = mean_j (2 - ||g_j - h_j||_2)`` (with the authors' 1e-4 inside
  the square root), pushing each "no" text away from its standard text.
* The loss is ``(L_yes + L_no + L_tso) / 2``, minimised with AdamW (learning rate 3e-4, betas (0.9, 0.98), eps
  1e-6, weight decay 0.2 on matrices only, none on biases, gains and the prompts), as in the authors' code; a
  cosine schedule over ``epochs``; batches from a seeded generator; image features computed once (no
  augmentation).
* **Scores** with ``p_yes_c = softmax(s <f, g_c>, s <f, h_c>)_yes`` and ``p_c = softmax_c(s <f, g_c>)``:
  competing-to-win ``CTW = p_yes`` of the predicted class ``argmax_c p_c``; agreeing-to-differ ``ATD = sum_c
  p_yes_c p_c``. The OOD score is ``-CTW`` or ``-ATD`` (``scoring="atd"`` by default).

The authors train on CC3M image-caption pairs; ``fit(classes, images, labels)`` trains on labelled ID images with
their class prompts instead (the open-world pre-training of the paper is not reproduced). Only the class
embeddings that the trained "no" encoder produces are kept (``no_text_embeddings_``), not the encoder itself.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from ._train import cosine_rates, digest_arrays, run_epochs
from .backbone import _layer, causal_mask
from .base import VLMDetector, check_images, class_names, l2_normalise, softmax
from .mcm import DEFAULT_PROMPT

SCORES = ("atd", "ctw")


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


def _decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as the authors' code: no decay on 1-d parameters (gains, biases) and on the prompts."""
    decay, plain = [], []
    for name, p in module.named_parameters():
        (plain if p.ndim < 2 or "prompt" in name or "norm" in name or "bias" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


class CLIPN(VLMDetector):
    """CLIPN's "no" encoder trained on labelled ID images, scored by ATD or CTW (see module docstring)."""

    name = "clipn"
    trains_network = True
    grid = {"scoring": list(SCORES)}

    def __init__(self, model=None, prompt: str = DEFAULT_PROMPT, n_prompts: int = 16, epochs: int = 10,
                 lr: float = 3e-4, weight_decay: float = 0.2, batch_size: int = 64, scoring: str = "atd",
                 seed: int = 0, device: str = "cpu", checkpoint: str | None = None):
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

    def _check_params(self) -> None:
        super()._check_params()
        for key in ("n_prompts", "epochs", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{self.name}: {key} must be a positive integer, got {value!r}")
        if self.scoring not in SCORES:
            raise ValueError(f"{self.name}: scoring must be one of {SCORES}, got {self.scoring!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"{self.name}: lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"{self.name}: weight_decay must be >= 0, got {self.weight_decay!r}")

    def fit(self, classes: Any, images: Any = None, labels: Any = None) -> "CLIPN":
        """Train the "no" encoder and prompts on labelled ID ``images`` of the ``classes``."""
        if images is None and isinstance(classes, tuple) and len(classes) == 3:
            classes, images, labels = classes
        names = class_names(classes, self.name)
        self._check_params()
        if images is None or labels is None:
            raise ValueError(f"{self.name}: fit needs labelled ID images: fit(classes, images, labels)")
        images = check_images(images, f"{self.name}: ID images")
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
            raise ValueError(f"{self.name}: labels must be {len(images)} integer class indices, got "
                             f"{labels.dtype} {labels.shape}")
        if labels.min() < 0 or labels.max() >= len(names):
            raise ValueError(f"{self.name}: labels must lie in 0..{len(names) - 1} ({len(names)} classes), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        self._reset_fitted()
        clip = self.clip()
        if not hasattr(clip.model, "text_model"):
            raise ValueError(f"{self.name}: the backbone {type(clip).__name__} is not a Hugging Face CLIP "
                             "(the \"no\" encoder copies its text_model)")
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
