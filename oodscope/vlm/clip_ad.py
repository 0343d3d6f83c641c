"""CLIP-AD: zero-shot anomaly detection with representative text vectors and a staged dual-path (SDP) model.

Chen, Zhang, Tian, He, Zhang, Wang, Wang & Liu, "CLIP-AD: A Language-Guided Staged Dual-Path Model for Zero-shot
Anomaly Detection", arXiv 2311.00453 (2023/2024); facts and defaults from the paper and the authors' released code
(``test.py``, ``util/prompt_ensemble.py``, ``util/surgery.py``, ``open_clip/transformer.py``, ``test_SDP.sh``).
The training-free SDP is ``clip_ad``; the fine-tuned SDP+ (linear layers trained on an auxiliary set) is
:class:`CLIPADPlus` (``clip_ad_plus``).

* **Representative text vectors** (RVS, Sec. 3.2): the prompts are the 22 templates of :data:`TEMPLATES` filled
  with the 9 normal (:data:`NORMAL_STATES`) or 10 anomalous (:data:`ANOMALOUS_STATES`) state words of
  ``object_name``; each state's vector is a representative of its normalised prompt embeddings, normalised:
  ``representative="mean"`` (their mean, the authors' default) or ``"dbscan"`` (the mean of the largest DBSCAN
  cluster, ``eps = 0.5``, ``min_samples = 15``, the authors' MVTec AD setting; VisA: 1.5 and 25).
* **Staged dual path** (SDP, Sec. 3.3): every ViT block runs two paths from the original path's normalised input
  ``LN_1(x)``: the original path is CLIP's block (Q-K attention, MLP, residuals); the new path adds the block's V-V
  attention output ``out_proj(softmax(V V^T / sqrt(d)) V)`` without the MLP (architecture surgery, as CLIP
  Surgery). The blocks form ``stages`` (4) equal stages and the new path restarts at each: its state at the end of
  stage ``s`` is the sum of the V-V outputs of the blocks of that stage only (the original tokens never enter it).
  The features of ``layers`` (default: the stage ends, the authors' ``3 6 9 12`` on ViT-B) are the new path's patch
  tokens with the original path's class token, through the final layer norm and the visual projection.
* **Feature surgery** (CLIP Surgery's, the authors' ``clip_feature_surgery``): for normalised tokens ``f_i`` of a
  layer with class token ``f_0`` and the text vectors ``g = [g_n, g_a]``, ``w_t = p_t / mean(p)`` with ``p =
  softmax_t(<f_0, g_t>)`` (no temperature), ``s_{i,t} = w_t <f_i, g_t> - mean_t' w_t' <f_i, g_t'>``; the
  similarities of the layers are summed.
* **Anomaly map**: the patch similarities to ``g_a`` on the patch grid, upsampled bilinearly to the model's input
  size, Gaussian-smoothed with ``sigma = 8`` pixels (``scipy.ndimage.gaussian_filter``, as the authors), then
  resized to the input images. **Image score** (``image_score="cls"``): ``softmax(100 <f, [g_n, g_a]>)_a`` of
  CLIP's image embedding ``f``; ``"map_max"``: the maximum of the map. The authors' evaluation min-max normalises
  both over each category's test set and adds them, a statistic of a whole test set rather than of one image:
  :func:`minmax_fusion` computes it from :meth:`CLIPAD.score_parts` of that set.

Two differences from the released code: the class token of an intermediate layer is that layer's original-path
token (the authors' in-place ``x_ori +=`` adds the next block's attention residual to the stored intermediate
tokens); images are read at the model's own input size. The authors' backbone is open_clip's
``ViT-B-16-plus-240`` (``laion400m_e31``) at 240 px: ``model="open_clip:ViT-B-16-plus-240/laion400m_e31"`` runs
the dual path on open_clip's blocks, as on a Hugging Face CLIP (:class:`~oodscope.vlm.backbone.VisionBlock`).
``fit`` takes defect-free images and only fixes the image size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..imagead.base import ImageDetector
from .backbone import _fill_rows, placed, resolve_clip
from .base import l2_normalise, softmax
from .winclip import state_prompts

NORMAL_STATES = ("flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage", "{} without scratch", "{} without crack", "{} without contamination")
ANOMALOUS_STATES = ("damaged {}", "imperfect {}", "blemished {}", "broken {}", "{} with flaw", "{} with defect",
                    "{} with damage", "{} with scratch", "{} with crack", "{} with contamination")
TEMPLATES = (
    "a cropped photo of the {}.", "a cropped photo of a {}.", "a close-up photo of a {}.",
    "a close-up photo of the {}.", "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of the {}.", "a photo of a {}.", "a photo of a large {}.", "a photo of the small {}.",
    "a photo of the large {}.", "a photo of a small {}.", "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.", "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)
REPRESENTATIVES = ("mean", "dbscan")
IMAGE_SCORES = ("cls", "map_max")
CLS_SCALE = 100.0  # the authors' fixed scale of the image-level softmax


def representative_vector(embeddings: np.ndarray, method: str = "mean", eps: float = 0.5,
                          min_samples: int = 15) -> np.ndarray:
    """The unit representative ``(D,)`` of normalised prompt embeddings ``(M, D)``: their mean, or the mean of the
    largest DBSCAN cluster (``method="dbscan"``)."""
    if method == "mean":
        return l2_normalise(embeddings.mean(axis=0))
    from sklearn.cluster import DBSCAN

    labels = DBSCAN(eps=eps, min_samples=min_samples).fit(embeddings).labels_
    if not (labels >= 0).any():
        raise ValueError(f"clip_ad: DBSCAN (eps={eps}, min_samples={min_samples}) finds no cluster among the "
                         f"{len(embeddings)} prompt embeddings; raise dbscan_eps, lower dbscan_min_samples or use "
                         "representative='mean'")
    largest = np.bincount(labels[labels >= 0]).argmax()
    return l2_normalise(embeddings[labels == largest].mean(axis=0))


def staged_dual_path(clip, pixels: torch.Tensor, layers: Sequence[int], stages: int
                     ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """CLIP's image embedding ``(N, D)``, the SDP features ``[(N, 1 + P, D)]`` of ``layers`` (1-based) and the
    original path's hidden states there ``[(N, 1 + P, width)]`` (SDP+'s input) of normalised pixels, on a Hugging
    Face CLIP (module docstring)."""
    blocks = clip.vision_blocks()
    stage = len(blocks) // stages
    x_ori = clip.vision_input(pixels)
    x = torch.zeros_like(x_ori)
    out, hidden = [], []
    for index, block in enumerate(blocks):
        vv, qk = block.attention(x_ori)
        x = vv if index % stage == 0 else x + vv  # a stage's first block restarts the new path
        x_ori = x_ori + qk
        x_ori = x_ori + block.mlp_branch(x_ori)
        if index + 1 in layers:
            out.append(clip._project(torch.cat([x_ori[:, :1], x[:, 1:]], dim=1)))
            hidden.append(x_ori)
    return clip._project(x_ori[:, 0]), out, hidden


def feature_surgery(features: Sequence[np.ndarray], texts: np.ndarray) -> np.ndarray:
    """``(N, 1 + P, T)``: the feature-surgery similarities of normalised tokens (class token first) ``[(N, 1 + P,
    D)]`` to normalised texts ``(T, D)``, summed over the layers."""
    total = 0.0
    for f in features:
        similarity = f @ texts.T  # (N, 1 + P, T)
        p = softmax(similarity[:, :1], axis=-1)  # the class token's, (N, 1, T)
        weighted = similarity * (p / p.mean(axis=-1, keepdims=True))
        total = total + weighted - weighted.mean(axis=-1, keepdims=True)
    return total


def minmax_fusion(cls_scores: np.ndarray, map_max: np.ndarray) -> np.ndarray:
    """The authors' image score over one category's whole test set: both parts min-max normalised, then added."""
    def scaled(x):
        x = np.asarray(x, dtype=np.float64)
        span = x.max() - x.min()
        if not span > 0:
            raise ValueError("minmax_fusion: a score part is constant over the test set; min-max scaling needs a "
                             "spread (pass the scores of a whole test set)")
        return (x - x.min()) / span

    return scaled(cls_scores) + scaled(map_max)


class CLIPAD(ImageDetector):
    """Training-free CLIP-AD (SDP): representative text vectors, staged dual-path features, feature-surgery map."""

    name = "clip_ad"
    needs_clip = True
    grid = {"representative": list(REPRESENTATIVES), "sigma": [4.0, 8.0]}

    def __init__(self, model=None, object_name: str = "object", layers: Sequence[int] | None = None,
                 stages: int = 4, representative: str = "mean", dbscan_eps: float = 0.5,
                 dbscan_min_samples: int = 15, sigma: float = 8.0, image_score: str = "cls", device: str = "cpu"):
        self.model = model
        self.object_name = object_name
        self.layers = layers
        self.stages = stages
        self.representative = representative
        self.dbscan_eps = dbscan_eps
        self.dbscan_min_samples = dbscan_min_samples
        self.sigma = sigma
        self.image_score = image_score
        self.device = device

    def _check_params(self) -> None:
        if not isinstance(self.object_name, str) or not self.object_name.strip():
            raise ValueError(f"{self.name}: object_name must be a non-empty string such as 'bottle', "
                             f"got {self.object_name!r}")
        for key in ("stages", "dbscan_min_samples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{self.name}: {key} must be a positive integer, got {value!r}")
        if self.representative not in REPRESENTATIVES:
            raise ValueError(f"{self.name}: representative must be one of {REPRESENTATIVES}, got "
                             f"{self.representative!r}")
        if self.image_score not in IMAGE_SCORES:
            raise ValueError(f"{self.name}: image_score must be one of {IMAGE_SCORES}, got {self.image_score!r}")
        if not (isinstance(self.dbscan_eps, (int, float)) and self.dbscan_eps > 0):
            raise ValueError(f"{self.name}: dbscan_eps must be > 0, got {self.dbscan_eps!r}")
        if not (isinstance(self.sigma, (int, float)) and self.sigma >= 0):
            raise ValueError(f"{self.name}: sigma must be >= 0 (0: no smoothing), got {self.sigma!r}")

    def clip(self):
        from ..extraction.extract import resolve_device

        return resolve_clip(self.model, device=str(resolve_device(self.device)))

    def _device(self) -> torch.device:
        from ..extraction.extract import resolve_device

        return resolve_device(self.device)

    def _resolve_layers(self, clip) -> tuple[int, ...]:
        if not hasattr(clip, "vision_blocks"):
            raise ValueError(f"{self.name}: the backbone {type(clip).__name__} exposes no vision blocks (the staged "
                             "dual path runs them); load a Hugging Face CLIP folder or an open_clip model")
        blocks = len(clip.vision_blocks())
        if blocks % self.stages:
            raise ValueError(f"{self.name}: stages={self.stages} does not divide the model's {blocks} vision blocks")
        stage = blocks // self.stages
        layers = tuple(range(stage, blocks + 1, stage)) if self.layers is None else tuple(self.layers)
        if not layers or not set(layers) <= set(range(1, blocks + 1)) or len(set(layers)) != len(layers):
            raise ValueError(f"{self.name}: layers must be distinct block numbers in 1..{blocks} (the model has "
                             f"{blocks} vision blocks), got {self.layers!r}")
        return tuple(sorted(int(l) for l in layers))

    def _fit(self, images: np.ndarray) -> None:
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"{self.name}: images must be square (CLIP crops the centre), got "
                             f"{images.shape[2]} x {images.shape[3]}; resize them (load_mvtec(size=...))")
        clip = self.clip()
        self.layers_ = self._resolve_layers(clip)
        vectors = []
        for states in (NORMAL_STATES, ANOMALOUS_STATES):
            prompts = state_prompts(states, self.object_name.strip(), TEMPLATES)
            embeddings = l2_normalise(clip.encode_texts(prompts, device=str(self._device()), name="clip-ad-prompts"))
            vectors.append(representative_vector(embeddings, self.representative, float(self.dbscan_eps),
                                                 int(self.dbscan_min_samples)))
        self.text_embeddings_ = np.stack(vectors)  # (2, D): normal, anomalous

    def _forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``p_a (N,)`` and the smoothed map at the model's input size ``(N, S, S)``."""
        clip = self.clip()
        device = self._device()
        scores, maps = [], []
        with placed(clip, device), torch.no_grad():
            for start in range(0, len(images), clip.batch_size):
                batch = torch.from_numpy(images[start:start + clip.batch_size]).to(device)
                n = len(batch)  # every batch at one size (backbone._fill_rows): scores independent of batching
                global_, features, hidden = staged_dual_path(clip, _fill_rows(clip.preprocess(batch),
                                                                              clip.batch_size),
                                                             self.layers_, int(self.stages))
                image = l2_normalise(global_[:n].double().cpu().numpy())
                scores.append(softmax(CLS_SCALE * image @ self.text_embeddings_.T)[:, 1])
                maps.append(self._batch_map(clip, [f[:n] for f in features], [x[:n] for x in hidden]))
        maps = np.concatenate(maps)
        if self.sigma > 0:
            from scipy.ndimage import gaussian_filter

            maps = gaussian_filter(maps, sigma=(0, float(self.sigma), float(self.sigma)))
        return np.concatenate(scores), maps

    def _batch_map(self, clip, features: list[torch.Tensor], hidden: list[torch.Tensor]) -> np.ndarray:
        """The unsmoothed ``(n, S, S)`` map of one batch: the surgery similarities to ``g_a``, upsampled."""
        tokens = [l2_normalise(f.double().cpu().numpy()) for f in features]
        grid = feature_surgery(tokens, self.text_embeddings_)[:, 1:, 1].reshape(len(tokens[0]), 1, *clip.grid)
        return nn.functional.interpolate(torch.from_numpy(grid), size=(clip.image_size, clip.image_size),
                                         mode="bilinear", align_corners=False)[:, 0].numpy()

    def score_parts(self, images) -> tuple[np.ndarray, np.ndarray]:
        """``(p_a, max of the map)`` per image: the two parts :func:`minmax_fusion` combines over a test set."""
        from ..imagead.base import as_images

        scores, maps = self.score_and_map(images)
        if self.image_score != "cls":
            scores = self._forward(as_images(images, f"{self.name}: test images"))[0]
        return scores, maps.reshape(len(maps), -1).max(axis=1)

    def _predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self._forward(images)
        if maps.shape[1:] != images.shape[2:]:
            maps = nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=images.shape[2:],
                                             mode="bilinear", align_corners=False)[:, 0].numpy()
        if self.image_score == "map_max":
            scores = maps.reshape(len(maps), -1).max(axis=1)
        return scores, maps


def plus_maps(adapters: nn.ModuleList, hidden: Sequence[torch.Tensor], texts: torch.Tensor, grid: tuple[int, int],
              size: int) -> list[torch.Tensor]:
    """SDP+'s per-layer ``(N, 2, size, size)`` maps: ``softmax`` over [normal, anomalous] of ``100 cos(linear(patch
    token), g)``, the logits upsampled bilinearly (``align_corners=True``) first, as the authors' code."""
    maps = []
    for linear, tokens in zip(adapters, hidden):
        features = nn.functional.normalize(linear(tokens[:, 1:]), dim=-1)
        logits = (CLS_SCALE * features @ texts.T).transpose(1, 2).reshape(len(tokens), 2, *grid)
        maps.append(torch.softmax(nn.functional.interpolate(logits, size=(size, size), mode="bilinear",
                                                            align_corners=True), dim=1))
    return maps


class CLIPADPlus(CLIPAD):
    """SDP+: the SDP map plus the maps of linear layers trained on an auxiliary annotated set.

    Chen et al. (arXiv 2311.00453, Sec. 3.4; the authors' ``train.py``, ``test_ft.py``, ``models/model.py``,
    ``train_SDP_plus.sh``): one linear layer per feature layer maps the original path's patch tokens (the hidden
    states of ``layers``, before the final norm) to the joint space; ``softmax(100 cos(linear(token), [g_n, g_a]))``
    is upsampled to the image and trained with ``focal + Dice(S_a, mask)`` summed over the layers (Adam, lr 1e-4, 5
    epochs, batch 8, the authors' script; CLIP and the text vectors frozen). At test the ``S_a`` of every layer are
    added to the SDP surgery map before the smoothing; the image score is SDP's. ``auxiliary`` is the annotated set
    (an MVTec-layout folder whose ``test`` split is read at the model's input size, or an
    :class:`~oodscope.data.mvtec.ImageSet` with masks; the paper trains on VisA to test MVTec AD and the reverse).
    The authors' in-place update makes their stored intermediate hidden states include the next block's attention
    output; here each layer's own hidden state is used. The focal and Dice losses are AnomalyCLIP's
    (:func:`~oodscope.vlm.anomalyclip.focal_loss`, :func:`~oodscope.vlm.anomalyclip.dice_loss`): the authors'
    ``util/losses.py`` is not in their released repository, and these are the losses of the code it descends from.
    """

    name = "clip_ad_plus"
    trains_network = True
    grid = {"epochs": [5]}

    def __init__(self, model=None, auxiliary=None, object_name: str = "object", layers: Sequence[int] | None = None,
                 stages: int = 4, representative: str = "mean", dbscan_eps: float = 0.5,
                 dbscan_min_samples: int = 15, sigma: float = 8.0, image_score: str = "cls", epochs: int = 5,
                 lr: float = 1e-4, batch_size: int = 8, seed: int = 0, device: str = "cpu",
                 checkpoint: str | None = None):
        super().__init__(model=model, object_name=object_name, layers=layers, stages=stages,
                         representative=representative, dbscan_eps=dbscan_eps,
                         dbscan_min_samples=dbscan_min_samples, sigma=sigma, image_score=image_score, device=device)
        self.auxiliary = auxiliary
        self.checkpoint = checkpoint  # a file: the fit saves after every epoch and an interrupted fit resumes
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed

    def _check_params(self) -> None:
        super()._check_params()
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{self.name}: {key} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"{self.name}: lr must be > 0, got {self.lr!r}")
        if self.auxiliary is None:
            raise ValueError(f"{self.name}: pass auxiliary= an annotated anomaly set (an MVTec-layout folder or an "
                             "ImageSet with masks) to train the linear layers on; the paper trains on VisA to test "
                             "MVTec AD")

    def _new_adapters(self) -> nn.ModuleList:
        count, width, dim = self.adapter_shape_
        return nn.ModuleList([nn.Linear(width, dim) for _ in range(count)])

    def _init_networks(self) -> None:
        super()._init_networks()
        if hasattr(self, "adapter_shape_"):
            self.adapters_ = self._new_adapters()

    def _fit(self, images: np.ndarray) -> None:
        from ._train import digest_arrays, run_epochs
        from .anomalyclip import dice_loss, focal_loss, load_auxiliary

        super()._fit(images)
        clip, device = self.clip(), self._device()
        aux, _, masks = load_auxiliary(self.auxiliary, clip.image_size, self.name)
        parts = []  # the original path's hidden states of the auxiliary images, once (CLIP is frozen)
        with placed(clip, device), torch.no_grad():
            for chunk in torch.from_numpy(aux).split(clip.batch_size):
                pixels = _fill_rows(clip.preprocess(chunk.to(device)), clip.batch_size)
                parts.append([h[:len(chunk)] for h in staged_dual_path(clip, pixels, self.layers_,
                                                                       int(self.stages))[2]])
        hidden = [torch.cat(layer) for layer in zip(*parts)]
        self.adapter_shape_ = (len(self.layers_), int(hidden[0].shape[-1]), int(self.text_embeddings_.shape[1]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            adapters = self._new_adapters().to(device)
        optimiser = torch.optim.Adam(adapters.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(int(self.seed))
        texts = torch.from_numpy(self.text_embeddings_).float().to(device)
        gt = torch.from_numpy(masks).to(device)

        def step(batch: torch.Tensor) -> torch.Tensor:
            loss = torch.zeros((), device=device)
            for s in plus_maps(adapters, [h[batch] for h in hidden], texts, clip.grid, clip.image_size):
                loss = loss + focal_loss(s, gt[batch]) + dice_loss(s[:, 1], gt[batch])
            return loss

        self.history_ = run_epochs(step, optimiser, len(aux), int(self.batch_size), [float(self.lr)] * self.epochs,
                                   generator, device, self.name, checkpoint=self.checkpoint,
                                   key=digest_arrays(aux, masks, self.text_embeddings_))
        self.adapters_ = adapters.cpu().eval()
        for p in self.adapters_.parameters():
            p.requires_grad_(False)

    def _batch_map(self, clip, features: list[torch.Tensor], hidden: list[torch.Tensor]) -> np.ndarray:
        sdp = super()._batch_map(clip, features, hidden)
        adapters = self.adapters_.to(hidden[0].device)
        texts = torch.from_numpy(self.text_embeddings_).float().to(hidden[0].device)
        plus = plus_maps(adapters, [h.float() for h in hidden], texts, clip.grid, clip.image_size)
        self.adapters_.cpu()
        return sdp + torch.stack([s[:, 1] for s in plus]).sum(dim=0).double().cpu().numpy()
