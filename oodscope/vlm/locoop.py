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
* **Training** (CoOp's schedule): SGD, learning rate 0.002, momentum 0.9, weight decay 5e-4, batch 32, cosine
  decay ``lr_e = lr (1 + cos(pi e / E)) / 2`` over ``E = epochs`` (50), epoch 0 a warm-up at 1e-5; batches drawn from a seeded generator. Image
  features (global and local, :mod:`oodscope.vlm.backbone`) are computed once through the extraction cache, so
  CoOp's random-crop/flip augmentation is not applied.
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

from ._train import cosine_rates, digest_arrays, run_epochs
from .backbone import placed
from .base import VLMDetector, check_images, class_names, l2_normalise
from .mcm import mcm_probability

SCORES = ("gl_mcm", "mcm")


def locoop_loss(global_logits: torch.Tensor, local_logits: torch.Tensor, labels: torch.Tensor, top_k: int,
                lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, L_CE, L_ood)`` of LoCoOp (Eq. 4-6): ``global_logits (B, K)``, ``local_logits (B, P, K)``, labels ``(B,)``."""
    ce = torch.nn.functional.cross_entropy(global_logits, labels)
    top = local_logits.topk(top_k, dim=-1).indices  # (B, P, top_k)
    is_ood = ~(top == labels[:, None, None]).any(dim=-1)  # the label is not in the region's top-k
    log_p = torch.log_softmax(local_logits[is_ood], dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    ood = -entropy.mean() if len(entropy) else local_logits.sum() * 0.0
    return ce + lam * ood, ce, ood


class LoCoOp(VLMDetector):
    """CoOp prompts trained with LoCoOp's local OOD regularisation, scored by GL-MCM (see module docstring)."""

    name = "locoop"
    trains_network = True
    uses_patches = True
    grid = {"lam": [0.25], "top_k": [200]}

    def __init__(self, model=None, n_ctx: int = 16, lam: float = 0.25, top_k: int = 200, epochs: int = 50,
                 lr: float = 0.002, batch_size: int = 32, scoring: str = "gl_mcm", temperature: float = 1.0,
                 seed: int = 0, device: str = "cpu", checkpoint: str | None = None):
        self.model = model
        self.checkpoint = checkpoint  # a file: the fit saves after every epoch and an interrupted fit resumes
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
        global_, local = clip.encode_images(images, device=str(device), name="locoop-train")
        self.classes_ = names
        with placed(clip, device):  # the text tower runs (and back-propagates) on the detector's device
            self.context_ = self._train(clip, names, l2_normalise(global_), l2_normalise(local), labels, device)
            with torch.no_grad():
                texts = self._prompt_features(clip, self._prompt_ids(clip, names, device),
                                              torch.from_numpy(self.context_).to(device))
        self.text_embeddings_ = l2_normalise(texts.double().cpu().numpy())
        self._check_reserved()
        self.input_dims_ = {"classes": (len(names),)}
        return self

    def _prompt_ids(self, clip, names: list[str], device: torch.device) -> torch.Tensor:
        ids = torch.as_tensor(clip.tokenize([" ".join(["x"] * self.n_ctx) + f" {n}." for n in names])["input_ids"])
        if not (ids[:, 1:1 + self.n_ctx] == ids[0, 1]).all():
            raise ValueError(f"{self.name}: the tokenizer does not turn the placeholder 'x' into one token each")
        return ids.to(device)

    @staticmethod
    def _prompt_features(clip, ids: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(clip.context_text_forward(ids, context).float(), dim=-1)

    def _train(self, clip, names: list[str], global_: np.ndarray, local: np.ndarray, labels: np.ndarray,
               device: torch.device) -> np.ndarray:
        generator = torch.Generator().manual_seed(int(self.seed))
        context = (torch.randn(self.n_ctx, clip.token_width, generator=generator) * 0.02).to(device)
        context.requires_grad_(True)
        optimiser = torch.optim.SGD([context], lr=self.lr, momentum=0.9, weight_decay=5e-4)
        ids = self._prompt_ids(clip, names, device)
        g, p, y = (torch.from_numpy(global_).float().to(device), torch.from_numpy(local).float().to(device),
                   torch.from_numpy(labels.astype(np.int64)).to(device))
        scale = clip.logit_scale

        def step(batch: torch.Tensor) -> torch.Tensor:
            texts = self._prompt_features(clip, ids, context)
            return locoop_loss(scale * g[batch] @ texts.T, scale * p[batch] @ texts.T, y[batch], int(self.top_k),
                               float(self.lam))[0]

        # epoch 0: CoOp's constant warm-up at 1e-5; then cosine decay from lr: lr_e = lr (1 + cos(pi e / E)) / 2
        self.history_ = run_epochs(step, optimiser, len(y), self.batch_size,
                                   cosine_rates(self.lr, self.epochs, warmup=1e-5), generator, device, "locoop",
                                   checkpoint=self.checkpoint, key=digest_arrays(global_, local, labels))
        return context.detach().cpu().numpy().astype(np.float32)

    def _score_embeddings(self, image: np.ndarray, patches: np.ndarray | None) -> np.ndarray:
        s = mcm_probability(image, self.text_embeddings_, self.temperature)
        if self.scoring == "gl_mcm":
            s = s + mcm_probability(patches, self.text_embeddings_, self.temperature).max(axis=1)
        return -s
