"""LoCoOp: few-shot OOD detection by CoOp prompt learning with local OOD regularisation.

Miyai, Yu, Irie & Aizawa, "LoCoOp: Few-Shot Out-of-Distribution Detection via Prompt Learning", NeurIPS 2023.

* **Prompts** (CoOp, Zhou et al., IJCV 2022): ``n_ctx = 16`` context vectors shared by all classes, in the text
  encoder's token-embedding space, initialised from ``N(0, 0.02^2)`` (seeded), put before the class name:
  ``[SOS] v_1 ... v_16 <class name>. [EOS]``; only the context vectors are trained, CLIP stays frozen.
* **Loss** (Eq. 6): ``L = L_CE + lambda L_ood``. ``L_CE`` is the cross-entropy of ``logit_scale * cos(global
  image feature, prompt_k)`` against the label. ``L_ood`` (Eq. 4-5): a local (patch) feature whose label is not
  among the ``top_k`` classes of its own prediction ``p_i = softmax(logit_scale * cos(local_i, prompts))`` is an
  OOD region (background); ``L_ood = -mean_{i in J} H(p_i)`` over those regions ``J`` (their entropy is
  maximised; no region selected gives 0). ``lambda = 0.25`` and ``top_k = 200`` (for ImageNet-1k's 1,000
  classes) as in the paper; ``top_k`` must be below the number of ID classes.
* **Training** with the training engine (:func:`oodscope.training.finetune`, objective ``locoop_reg`` of
  :mod:`oodscope.training.objectives.locoop_reg`): the model is a :class:`PromptLearner`, the context vectors over
  the frozen CLIP text tower, whose forward gives the global image-text logits and whose ``local_logits`` module
  the patch-level logits that the objective reads through the engine's ``feature_map_module`` hook. CoOp's
  schedule: SGD (plain momentum 0.9), learning rate 0.002, weight decay 5e-4, batch 32, 50 epochs, epoch 0 a
  constant warm-up at 1e-5, then cosine decay (per step here, per epoch in CoOp). The engine seeds the batch
  order, writes a checkpoint after every epoch to ``checkpoint`` (a folder) from which an interrupted fit resumes
  to the uninterrupted result, shows a tqdm bar and runs on ``device``. Image features (global and local,
  :mod:`oodscope.vlm.backbone`) are computed once through the extraction cache and are the engine's training
  inputs, so CoOp's random-crop/flip augmentation is not applied; with ``augment=True`` it is: the engine draws
  CoOp's random resized crop (scale 0.08-1, aspect 3/4-4/3) and flip of every image each epoch
  (``finetune(augmentation="resized_crop")``) and :class:`ImagePromptLearner` re-encodes them (CPU cost: one image
  forward per image per epoch instead of one in all).
* **Score**: GL-MCM (``scoring="gl_mcm"``, the paper's best) or MCM with the learned prompts, ``T = 1``;
  ``-S`` (higher = more OOD).

``fit(classes, images, labels)`` takes the ID class names and the few-shot labelled ID images (or one tuple
``(classes, images, labels)``). The model must be a :class:`~oodscope.vlm.backbone.HFClip` (or another backbone
with ``context_text_forward``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..training.objectives.locoop_reg import LOCAL_LOGITS, locoop_loss  # noqa: F401 - locoop_loss: public here too
from .backbone import placed
from .base import VLMDetector, check_images, class_names, l2_normalise
from .mcm import mcm_probability

SCORES = ("gl_mcm", "mcm")


def prompt_ids(clip, names: list[str], n_ctx: int, who: str = "locoop") -> torch.Tensor:
    """``(K, L)`` token ids of ``[SOS] x ... x <name>. [EOS]``: ``n_ctx`` placeholders that the context replaces."""
    ids = torch.as_tensor(clip.tokenize([" ".join(["x"] * n_ctx) + f" {n}." for n in names])["input_ids"])
    if not (ids[:, 1:1 + n_ctx] == ids[0, 1]).all():
        raise ValueError(f"{who}: the tokenizer does not turn the placeholder 'x' into one token each")
    return ids


def pack_features(global_: np.ndarray, local: np.ndarray) -> np.ndarray:
    """``(N, 1, 1 + P, D)`` float32: the normalised global feature, then the ``P`` patch features, of each image;
    the engine's training inputs (one "channel" of ``1 + P`` rows)."""
    return np.concatenate([l2_normalise(global_)[:, None], l2_normalise(local)], axis=1)[:, None].astype(np.float32)


class PromptLearner(nn.Module):
    """CoOp's learnable context over a frozen CLIP, the network :func:`oodscope.training.finetune` trains for LoCoOp.

    ``context`` ``(n_ctx, width)`` is the only parameter, initialised from ``N(0, 0.02^2)`` with ``seed``.
    ``forward(features)`` takes :func:`pack_features` rows ``(B, 1, 1 + P, D)`` and returns the global logits
    ``logit_scale * cos(global feature, prompt_k)`` ``(B, K)``; the patch logits ``(B, P, K)`` pass through the
    ``local_logits`` module, where the ``locoop_reg`` objective reads them (the engine's ``feature_map_module``
    hook). The CLIP backbone is held outside the module tree: it is not in the ``state_dict`` (a checkpoint holds
    the context only) and ``.to()`` does not move it (put it on the device yourself, e.g. with
    :func:`oodscope.vlm.backbone.placed`); ``checkpoint_key`` digests what the learner depends on outside its
    state (the prompt tokens, the text tower's weights, the logit scale), so a checkpoint resumes only into the
    same prompts and text tower.
    """

    def __init__(self, clip, names: list[str], n_ctx: int = 16, seed: int = 0):
        super().__init__()
        object.__setattr__(self, "clip", clip)  # not a submodule: frozen, outside the state_dict
        generator = torch.Generator().manual_seed(int(seed))
        self.context = nn.Parameter(torch.randn(n_ctx, clip.token_width, generator=generator) * 0.02)
        self.register_buffer("prompt_ids", prompt_ids(clip, names, n_ctx), persistent=False)
        self.scale = float(clip.logit_scale)
        self.n_classes = len(names)
        setattr(self, LOCAL_LOGITS, nn.Identity())

    @property
    def checkpoint_key(self) -> str:
        import hashlib

        from ..extraction.extract import model_digest

        text = self.clip.model if hasattr(self.clip, "model") else self.clip
        digest = hashlib.sha256(self.prompt_ids.cpu().numpy().tobytes())
        digest.update(f"{model_digest(text)} {self.scale!r}".encode())
        return digest.hexdigest()[:16]

    def text_features(self) -> torch.Tensor:
        """``(K, D)`` unit-norm embeddings of the class prompts with the current context."""
        out = self.clip.context_text_forward(self.prompt_ids, self.context)
        return nn.functional.normalize(out.float(), dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        rows = features[:, 0]  # (B, 1 + P, D): global, then patches
        logits = self.scale * rows @ self.text_features().T.to(rows.dtype)  # (B, 1 + P, K)
        getattr(self, LOCAL_LOGITS)(logits[:, 1:])
        return logits[:, 0]


class ImagePromptLearner(PromptLearner):
    """:class:`PromptLearner` on images instead of features: ``forward`` takes ``(B, H, W, 3)`` channels-last
    images in [0, 1] (the engine's augmented batches), runs CLIP's image tower on them without gradients (CLIP's
    preprocessing, then the global and MaskCLIP patch embeddings of :meth:`~oodscope.vlm.backbone.HFClip.image_forward`)
    and scores them as the parent does. For CoOp's per-epoch augmentation (``LoCoOp(augment=True)``): every epoch
    re-encodes every image."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            global_, local = self.clip.image_forward(self.clip.preprocess(images.permute(0, 3, 1, 2).float()))
        rows = nn.functional.normalize(torch.cat([global_[:, None], local], dim=1).float(), dim=-1)
        return super().forward(rows[:, None])


class LoCoOp(VLMDetector):
    """CoOp prompts trained with LoCoOp's local OOD regularisation, scored by GL-MCM (see module docstring)."""

    name = "locoop"
    trains_network = True
    uses_patches = True
    grid = {"lam": [0.25], "top_k": [200]}

    def __init__(self, model=None, n_ctx: int = 16, lam: float = 0.25, top_k: int = 200, epochs: int = 50,
                 lr: float = 0.002, batch_size: int = 32, scoring: str = "gl_mcm", temperature: float = 1.0,
                 seed: int = 0, device: str = "cpu", checkpoint: str | None = None, augment: bool = False):
        self.model = model
        self.augment = augment  # CoOp's random resized crop + flip, re-encoding every image every epoch
        self.checkpoint = checkpoint  # a folder: the engine's checkpoint after every epoch; a rerun resumes
        self.n_ctx = n_ctx
        self.lam = lam
        self.top_k = top_k
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.scoring = scoring
        self.temperature = temperature
        self.seed = seed
        self.device = device

    prompt = "{}"  # the learned context replaces a hand-written template

    def _check_params(self) -> None:
        for key in ("n_ctx", "top_k", "epochs", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{self.name}: {key} must be a positive integer, got {value!r}")
        if self.scoring not in SCORES:
            raise ValueError(f"{self.name}: scoring must be one of {SCORES}, got {self.scoring!r}")
        for key in ("lr", "temperature"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{self.name}: {key} must be > 0, got {value!r}")
        if not (isinstance(self.lam, (int, float)) and self.lam >= 0):
            raise ValueError(f"{self.name}: lam must be >= 0, got {self.lam!r}")
        if not isinstance(self.augment, (bool, np.bool_)):
            raise ValueError(f"{self.name}: augment must be True or False, got {self.augment!r}")

    def fit(self, classes: Any, images: Any = None, labels: Any = None) -> "LoCoOp":
        """Learn the context vectors from labelled few-shot ID ``images`` of the ``classes``."""
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
        if self.top_k >= len(names):
            raise ValueError(f"{self.name}: top_k={self.top_k} must be smaller than the number of ID classes "
                             f"({len(names)}); the paper's 200 is for ImageNet-1k")
        self._reset_fitted()
        clip = self.clip()
        if not hasattr(clip, "context_text_forward"):
            raise ValueError(f"{self.name}: the backbone {type(clip).__name__} has no context_text_forward "
                             "(prompt learning needs the Hugging Face CLIP backbone)")
        from ..extraction.extract import resolve_device

        device = resolve_device(self.device)
        self.classes_ = names
        if self.augment:  # the engine augments channels-last images; the learner encodes them every step
            learner = ImagePromptLearner(clip, names, self.n_ctx, self.seed)
            inputs = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        else:  # features once, through the extraction cache
            global_, local = clip.encode_images(images, device=str(device), name="locoop-train")
            learner, inputs = PromptLearner(clip, names, self.n_ctx, self.seed), pack_features(global_, local)
        with placed(clip, device):  # the text tower runs (and back-propagates) on the detector's device
            learner = self._train(learner, inputs, labels, device)
            with torch.no_grad():
                texts = learner.text_features()
        self.context_ = learner.context.detach().cpu().numpy().astype(np.float32)
        self.text_embeddings_ = l2_normalise(texts.double().cpu().numpy())
        self._check_reserved()
        self.input_dims_ = {"classes": (len(names),)}
        return self

    def _train(self, learner: PromptLearner, features: np.ndarray, labels: np.ndarray,
               device: torch.device) -> PromptLearner:
        """The engine's fit of the context with the ``locoop_reg`` objective, on CoOp's schedule (module docstring)."""
        import sys

        from ..detectors import create
        from ..training import finetune

        objective = create("locoop_reg", lam=float(self.lam), top_k=int(self.top_k))
        learner, history = finetune(
            learner, (features, labels.astype(np.int64)), objective, epochs=int(self.epochs), lr=float(self.lr),
            batch_size=int(self.batch_size), momentum=0.9, nesterov=False, weight_decay=5e-4, warmup_epochs=1,
            warmup_lr=1e-5, seed=int(self.seed), device=str(device), checkpoint_dir=self.checkpoint,
            augmentation="resized_crop" if self.augment else False, copy=False, progress=sys.stderr.isatty())
        self.history_ = [float(epoch["loss"]) for epoch in history.epochs]
        return learner

    def _score_embeddings(self, image: np.ndarray, patches: np.ndarray | None) -> np.ndarray:
        s = mcm_probability(image, self.text_embeddings_, self.temperature)
        if self.scoring == "gl_mcm":
            s = s + mcm_probability(patches, self.text_embeddings_, self.temperature).max(axis=1)
        return -s
