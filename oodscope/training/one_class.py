"""One-class fine-tuning of a pretrained backbone for anomaly detection: MSC and UniCon-HA, scored by kNN.

The normal class is the only training data (no labels, no real outliers); the backbone is fine-tuned so that
normal images gather and everything else stays apart, then an image is scored by its kNN distance to the training
images' features. Two objectives:

**Mean-Shifted Contrastive loss** (``method="msc"``): Reiss & Hoshen, "Mean-Shifted Contrastive Loss for Anomaly
Detection", AAAI 2023, Sec. 4; defaults from the authors' code (github.com/talreiss/Mean-Shifted-Anomaly-Detection,
``main.py``). Features are L2-normalised, ``z = phi(x) / ||phi(x)||``; the centre ``c`` is the normalised mean of
the **pretrained** features of the training images, computed once before training. The mean-shifted
representation (Eq. 4) is ``theta(x) = (z - c) / ||z - c||``, and the mean-shifted contrastive loss (Eq. 5) is
NT-Xent over ``theta`` of two augmented views of each of the ``B`` images of a batch:

    ``L_msc(x_i') = -log( exp(theta_i' . theta_i'' / tau) / sum_{k != i'} exp(theta_i' . theta_k / tau) )``

averaged over the ``2B`` views (positive: the other view of the same image; denominator: the other ``2B - 1``
views). The angular center loss (Eq. 6) pulls the normalised features towards ``c``: the paper writes
``L_angular = -z . c``; the code adds ``||z - c||^2 = 2 - 2 z . c`` per view (mean over the batch, summed over the
two views), the same gradient direction at twice the scale; :func:`angular_center_loss` is the code's form. Total
(Eq. 7): ``L = L_msc + L_angular`` (``angular=False`` drops the second term). Code defaults: ``tau = 0.25``, SGD
without momentum, ``lr = 1e-5``, weight decay ``5e-5``, batch 64, 20 epochs, constant learning rate; the network
stays in eval mode throughout (the code calls ``model.eval()`` and never ``train()``: batch-norm statistics stay
the pretrained ones), the first stages are frozen (ResNet-152's ``conv1``, ``bn1``, ``layer1``, ``layer2``; for
EfficientNet-Lite0 here: the stem and stages 1-3, :data:`EFFICIENTNET_FROZEN`). The views use the MoCo v2
augmentation (random resized crop, scale (0.2, 1); colour jitter 0.4/0.4/0.4/0.1 with p 0.8; grayscale p 0.2;
Gaussian blur p 0.5; flip).

**UniCon-HA** (``method="unicon_ha"``): Wang et al., "Unilaterally Aggregated Contrastive Learning with
Hierarchical Augmentation for Anomaly Detection", ICCV 2023, Sec. 3. Virtual outliers are rotations of the normal
images by 90, 180 and 270 degrees (Sec. 3.2, the distribution-shifting transformation). With two augmented views
of every image, a supervised-contrastive term **aggregates all inlier views** (each inlier view's positives are all
other inlier views, its negatives the virtual outliers), and an unsupervised (SimCLR) term **disperses the
outliers** (each outlier view's positive is its own other view, its negatives everything else): the unilaterally
aggregated loss ``L_UniCLR`` (:func:`unilateral_aggregation_loss`). In both, the denominator runs over all other
views of the batch, ``-1/|P(a)| sum_{p in P(a)} log( exp(z_a . z_p / tau) / sum_{k != a} exp(z_a . z_k / tau) )``.
Soft aggregation (Sec. 3.2) re-weights each inlier view ``a`` by its mean affinity to the other inlier views,
``w_a = sum_{j != a} exp(z_a . z_j / tau_w) / sum_k sum_{j != k} exp(z_k . z_j / tau_w)`` (weights over the inlier
views sum to 1; :func:`soft_aggregation_weights`): a view that augmentation pushed away from the inliers counts
less. Here the weights multiply the inlier anchors' loss terms and are constants (no gradient): our reading of the
paper's text, the authors' code was not available. Hierarchical augmentation (Sec. 3.3): the loss is applied at
several depths ``i`` with its own projection head ``g_i`` (``Linear - ReLU - Linear``, 128-d) and augmentations
of increasing strength ``T_1 < ... < T_L``, ``L_all = 1/L sum_i lambda_i L_UniCLR(T_i)``. The paper uses the four
ResNet-18 stages, ``tau = tau_w = 0.5``, one inlier per three outliers (all three rotations), training from
scratch for 2048 epochs; the heads are dropped at test time and the last stage is scored.
**Reduced here** (CPU): a pretrained backbone is fine-tuned instead of trained from scratch (the issue's setting),
the default levels are EfficientNet-Lite0's ``stage4``, ``stage5``, ``stage6`` and ``head`` (stem and stages 1-3
frozen as for MSC) with strengths 0.25 / 0.5 / 0.75 / 1 (``strengths=``); ``virtual_outliers=1`` draws one random
rotation per image instead of all three; the learning-rate defaults (SGD, momentum 0.9, ``lr = 1e-4``, cosine)
are ours for fine-tuning, not the paper's.

**Augmentation** runs vectorised in torch (:func:`augment_views`): one affine resampling does the random resized
crop, the horizontal flip and the resize to ``image_size`` (e.g. CIFAR's 32 px upsampled to 64 px), then
brightness, contrast and saturation jitter (p 0.8) and grayscale (p 0.2). ``strength`` scales the crop's smallest
area (``1 - 0.8 s``), its aspect-ratio range and the jitter (``0.4 s``); ``s = 1`` is MoCo v2's crop and jitter.
Hue jitter and Gaussian blur are left out (CPU cost), and the jitter runs in a fixed order.

**Scoring** (:func:`one_class_scores`): the pooled ``layer`` features (no augmentation, resized) of the training
and test images, then the ``mean_shifted`` detector (kNN, ``k = 2``, summed squared distances between mean-shifted
features, Reiss & Hoshen's score) or any anomaly detector that takes ``k`` (``score="knn_distance"``).

**Training** (:func:`train_one_class`) follows :func:`oodscope.training.finetune`'s conventions and reuses its
helpers: seeded (data order and augmentation from one seed, torch's global RNG forked), resumable (an atomic
checkpoint after every epoch; a rerun with the same arguments resumes after the last finished epoch and gives the
same weights; another model, method, schedule or data is an error), a tqdm bar per epoch, ``device=``, a
non-finite loss stops with ``FloatingPointError``; the caller's backbone is not modified (``copy=False`` trains it
in place). The backbone needs EfficientNet-Lite0's ``forward_features(x, layers) -> {name: map}``.
"""

from __future__ import annotations

import copy as copying
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .engine import History, _as_images, _channels_last, _data_fingerprint, _resume, _save_atomic

CHECKPOINT = "one_class.pt"
METHODS = ("msc", "unicon_ha")
MSC_TEMPERATURE = 0.25  # the authors' contrastive_loss
UNICON_TEMPERATURE = 0.5  # tau of UniCon-HA (Sec. 4.1)
UNICON_WEIGHT_TEMPERATURE = 0.5  # tau_w of the soft aggregation
PROJECTION_DIM = 128
# the stem and stages 1-3 (blocks 0-4) of EfficientNet-Lite0: frozen like ResNet-152's conv1, bn1, layer1, layer2
EFFICIENTNET_FROZEN = ("_conv_stem", "_bn0") + tuple(f"_blocks.{i}" for i in range(5)) + ("_fc",)
EFFICIENTNET_LEVELS = ("stage4", "stage5", "stage6", "head")
DEFAULTS = {"msc": dict(lr=1e-5, momentum=0.0, weight_decay=5e-5, schedule="constant"),
            "unicon_ha": dict(lr=1e-4, momentum=0.9, weight_decay=5e-5, schedule="cosine")}
GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, torchvision's rgb_to_grayscale


# -- the losses -----------------------------------------------------------------------------------------------------
def mean_shifted_contrastive_loss(z1, z2, centre, temperature: float = MSC_TEMPERATURE):
    """Eq. 5: NT-Xent over the mean-shifted views ``theta = (z - c) / ||z - c||`` of two views ``z1``, ``z2``
    ``(B, D)`` (normalised first); mean over the ``2B`` views."""
    import torch
    from torch.nn import functional as F

    theta = F.normalize(torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)]) - centre, dim=1)
    n = len(z1)
    similarity = (theta @ theta.T / temperature).masked_fill(
        torch.eye(2 * n, dtype=torch.bool, device=theta.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(theta.device)
    positive = similarity[torch.arange(2 * n, device=theta.device), partner]
    return (torch.logsumexp(similarity, dim=1) - positive).mean()


def angular_center_loss(z1, z2, centre):
    """Eq. 6 in the authors' code's form: ``mean ||z1 - c||^2 + mean ||z2 - c||^2`` on normalised features
    (``= 4 - 2 mean(z1 . c) - 2 mean(z2 . c)``)."""
    from torch.nn import functional as F

    return sum(((F.normalize(z, dim=1) - centre) ** 2).sum(dim=1).mean() for z in (z1, z2))


def msc_loss(z1, z2, centre, temperature: float = MSC_TEMPERATURE, angular: bool = True):
    """Eq. 7: ``L_msc + L_angular``; returns ``(total, {term: value})``."""
    contrastive = mean_shifted_contrastive_loss(z1, z2, centre, temperature)
    terms = {"msc": float(contrastive.detach())}
    if not angular:
        return contrastive, terms
    centre_term = angular_center_loss(z1, z2, centre)
    terms["angular"] = float(centre_term.detach())
    return contrastive + centre_term, terms


def soft_aggregation_weights(z_in, weight_temperature: float = UNICON_WEIGHT_TEMPERATURE):
    """UniCon-HA's soft aggregation: ``w_a = sum_{j != a} exp(z_a . z_j / tau_w) / sum_k sum_{j != k} exp(z_k .
    z_j / tau_w)`` over the normalised inlier views ``z_in`` ``(N, D)``; the weights sum to 1."""
    import torch
    from torch.nn import functional as F

    z = F.normalize(z_in, dim=1)
    affinity = torch.exp(z @ z.T / weight_temperature)
    affinity = affinity.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), 0.0)
    row = affinity.sum(dim=1)
    return row / row.sum()


def unilateral_aggregation_loss(z_in1, z_in2, z_out1, z_out2, temperature: float = UNICON_TEMPERATURE,
                                weight_temperature: float = UNICON_WEIGHT_TEMPERATURE, soft: bool = True):
    """``L_UniCLR`` on two views of ``B`` inliers (``z_in1``, ``z_in2``: ``(B, D)``) and of ``M`` virtual outliers
    (``z_out1``, ``z_out2``: ``(M, D)``), all normalised first. Inlier views: positives all other inlier views;
    outlier views: the positive is the other view of the same outlier; denominators over every other view. The mean
    over all ``2B + 2M`` anchors, the inlier anchors weighted by :func:`soft_aggregation_weights` (times ``2B``, so
    equal weights give the plain mean) when ``soft``."""
    import torch
    from torch.nn import functional as F

    z_in = F.normalize(torch.cat([z_in1, z_in2]), dim=1)
    z_out = F.normalize(torch.cat([z_out1, z_out2]), dim=1)
    n_in, m = len(z_in), len(z_out1)
    z = torch.cat([z_in, z_out])
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = z @ z.T / temperature
    log_prob = log_prob - torch.logsumexp(log_prob.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    inlier_mask = (~eye[:n_in, :n_in]).to(z.dtype)
    inlier_terms = -(log_prob[:n_in, :n_in] * inlier_mask).sum(dim=1) / inlier_mask.sum(dim=1).clamp_min(1)
    rows = torch.arange(2 * m, device=z.device)
    partner = torch.cat([torch.arange(m, 2 * m), torch.arange(m)]).to(z.device)
    outlier_terms = -log_prob[n_in + rows, n_in + partner]
    weights = soft_aggregation_weights(z_in.detach(), weight_temperature) * n_in if soft else \
        torch.ones(n_in, dtype=z.dtype, device=z.device)
    return ((weights * inlier_terms).sum() + outlier_terms.sum()) / len(z)


# -- augmentation ---------------------------------------------------------------------------------------------------
def augment_views(x, generator, size: int, strength: float = 1.0):
    """Random resized crop + horizontal flip + resize to ``size`` (one affine resampling), then colour jitter
    (p 0.8) and grayscale (p 0.2), on a float ``(B, C, H, W)`` batch in [0, 1]; ``strength`` in [0, 1] scales the
    crop and the jitter (see the module docstring)."""
    import torch
    from torch.nn import functional as F

    b = len(x)
    u = torch.rand(b, 7, generator=generator)
    area = 1.0 - 0.8 * strength * u[:, 0]
    log_ratio = strength * math.log(4 / 3) * (2 * u[:, 1] - 1)
    width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = width * flip, height
    theta[:, 0, 2], theta[:, 1, 2] = (1 - width) * (2 * u[:, 3] - 1), (1 - height) * (2 * u[:, 4] - 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if strength > 0 and x.shape[1] == 3:
        out = _colour(out, generator, strength, jitter=u[:, 5] < 0.8, gray=u[:, 6] < 0.2)
    return out


def _colour(x, generator, strength: float, jitter, gray):
    """Brightness, contrast and saturation factors in ``[1 - 0.4 s, 1 + 0.4 s]`` on the ``jitter`` rows, then
    grayscale on the ``gray`` rows."""
    import torch

    factors = 1 + 0.4 * strength * (2 * torch.rand(len(x), 3, generator=generator) - 1)
    factors = torch.where(jitter[:, None], factors, torch.ones_like(factors)).to(x.device, x.dtype)
    factors = factors[:, :, None, None, None]
    luma = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x * factors[:, 0]).clamp(0, 1)
    mean = (x * luma).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * factors[:, 1] + mean).clamp(0, 1)
    grey = (x * luma).sum(dim=1, keepdim=True)
    x = ((x - grey) * factors[:, 2] + grey).clamp(0, 1)
    grey = (x * luma).sum(dim=1, keepdim=True).expand_as(x)
    return torch.where(gray.to(x.device)[:, None, None, None], grey, x)


def rotations(x, generator, n: int = 3):
    """UniCon-HA's virtual outliers: each image of ``(B, C, S, S)`` rotated by ``n`` distinct angles of {90, 180,
    270} degrees (all three for ``n = 3``; drawn per image otherwise); ``(n B, C, S, S)``, angle by angle."""
    import torch

    order = torch.argsort(torch.rand(len(x), 3, generator=generator), dim=1)[:, :n] + 1
    turned = [torch.rot90(x, k, dims=(2, 3)) for k in (1, 2, 3)]
    if n == 3:
        return torch.cat(turned)
    out = []
    for column in order.T:
        pick = torch.zeros_like(x)
        for k in (1, 2, 3):
            pick = torch.where((column == k).to(x.device)[:, None, None, None], turned[k - 1], pick)
        out.append(pick)
    return torch.cat(out)


# -- inputs and the backbone ----------------------------------------------------------------------------------------
def _unit_images(images: Any, who: str, channels: int) -> np.ndarray:
    """float32 ``(N, C, H, W)`` in [0, 1] from uint8 (or [0, 1] float), channels-last or channels-first."""
    array, _ = _as_images(images, who)
    if _channels_last(array):
        array = array.transpose(0, 3, 1, 2)
    if array.shape[1] != channels:
        raise ValueError(f"{who}: the backbone takes {channels}-channel images, got shape {array.shape} "
                         f"(channels: {array.shape[1]}); convert the images (e.g. grayscale to RGB) first")
    if array.dtype.kind == "f":
        if array.min() < 0 or array.max() > 1:
            raise ValueError(f"{who}: float images must lie in [0, 1], got {array.min():.3g}..{array.max():.3g}; "
                             "pass uint8 images or divide by 255")
        return np.ascontiguousarray(array, dtype=np.float32)
    if array.dtype != np.uint8:
        raise ValueError(f"{who}: images must be uint8 or float in [0, 1], got {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32) / 255.0


def _in_channels(backbone) -> int:
    import torch

    if not callable(getattr(backbone, "forward_features", None)):
        raise ValueError(f"train_one_class: the backbone ({type(backbone).__name__}) needs forward_features(x, "
                         "layers) -> {name: feature map}, like oodscope.models.efficientnet_lite.EfficientNetLite0")
    conv = next((m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if conv is None:
        raise ValueError("train_one_class: the backbone has no Conv2d layer to take images")
    return conv.in_channels


def _pooled(backbone, x, layer: str):
    from torch.nn import functional as F

    h = backbone.forward_features(x, [layer])[layer]
    return F.adaptive_avg_pool2d(h, 1).flatten(1) if h.ndim == 4 else h


def _normalise(x, mean: Sequence[float], std: Sequence[float]):
    import torch

    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _resize(x, size: int):
    from torch.nn import functional as F

    return x if x.shape[-1] == size and x.shape[-2] == size else \
        F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _default_mean_std() -> tuple[tuple[float, ...], tuple[float, ...]]:
    from ..models.efficientnet_lite import MEAN, STD

    return MEAN, STD


def embed(backbone, images: Any, *, layer: str = "head", image_size: int | None = None,
          mean: Sequence[float] | None = None, std: Sequence[float] | None = None, batch_size: int = 256,
          device: str = "cpu") -> np.ndarray:
    """Global-average-pooled ``layer`` features ``(N, D)`` of ``images`` (no augmentation, resized to
    ``image_size``), in eval mode without gradients; ``mean``/``std`` default to EfficientNet-Lite's 0.5 / 0.5."""
    import torch

    from ..extraction.extract import evaluation_mode

    default_mean, default_std = _default_mean_std()
    mean, std = mean or default_mean, std or default_std
    x = _unit_images(images, "embed: images", _in_channels(backbone))
    size = image_size or x.shape[-1]
    rows = []
    with evaluation_mode(backbone), torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = _resize(torch.from_numpy(x[start:start + batch_size]).to(device), size)
            rows.append(_pooled(backbone, _normalise(batch, mean, std), layer).double().cpu().numpy())
    return np.concatenate(rows)


def one_class_scores(backbone, train: Any, test: Any, *, k: int = 2, score: str = "mean_shifted",
                     **embedding: Any) -> np.ndarray:
    """Anomaly scores of ``test`` (higher = more anomalous): kNN (``k = 2``, the paper's) of the pooled features to
    those of the normal ``train`` images, by the registered detector ``score`` (``mean_shifted``: Reiss & Hoshen's
    score; ``knn_distance``: plain Euclidean). ``embedding`` goes to :func:`embed`."""
    import oodscope

    detector = oodscope.create(score, k=k)
    return detector.fit(embed(backbone, train, **embedding)).score(embed(backbone, test, **embedding))


# -- training -------------------------------------------------------------------------------------------------------
class _Trainee:
    """The backbone and (UniCon-HA) one projection head per level in one module, so one state dict holds both."""

    @staticmethod
    def build(backbone, method: str, levels: Sequence[str], probe, dim: int, seed: int):
        import torch
        from torch import nn

        heads = nn.ModuleDict()
        if method == "unicon_ha":
            with torch.no_grad():
                maps = backbone.forward_features(probe, list(levels))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for level in levels:
                    c = maps[level].shape[1]
                    heads[level] = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, dim))
        return nn.ModuleDict({"backbone": backbone, "heads": heads})


def _freeze(backbone, freeze: Sequence[str] | None) -> list[str]:
    """``requires_grad = False`` on parameters named ``p`` or ``p.*`` for ``p`` in ``freeze`` (default: the stem and
    stages 1-3 of EfficientNet-Lite0, nothing for other backbones); returns the frozen names."""
    from ..models.efficientnet_lite import EfficientNetLite0

    if freeze is None:
        freeze = EFFICIENTNET_FROZEN if isinstance(backbone, EfficientNetLite0) else ()
    frozen = []
    for name, parameter in backbone.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in freeze):
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def _check_options(method: str, epochs: int, batch_size: int, options: dict, levels: Sequence[str],
                   strengths: Sequence[float], level_weights: Sequence[float], virtual_outliers: int,
                   temperature: float, n: int) -> None:
    who = "train_one_class"
    if method not in METHODS:
        raise ValueError(f"{who}: method must be one of {METHODS}, got {method!r}")
    if n < 2:
        raise ValueError(f"{who}: got {n} training image; the contrastive losses and the kNN score (k = 2) need at "
                         "least 2 normal images")
    if not (isinstance(epochs, int) and epochs >= 1 and isinstance(batch_size, int) and batch_size >= 2):
        raise ValueError(f"{who}: need an integer epochs >= 1 and batch_size >= 2, got {epochs!r}, {batch_size!r}")
    if not (options["lr"] > 0 and options["momentum"] >= 0 and options["weight_decay"] >= 0 and temperature > 0):
        raise ValueError(f"{who}: need lr > 0, momentum >= 0, weight_decay >= 0 and temperature > 0, got {options}, "
                         f"temperature={temperature}")
    if options["schedule"] not in ("cosine", "constant"):
        raise ValueError(f"{who}: schedule must be 'cosine' or 'constant', got {options['schedule']!r}")
    if method == "unicon_ha":
        if not (len(levels) == len(strengths) == len(level_weights) >= 1):
            raise ValueError(f"{who}: levels, strengths and level_weights need one entry per level, got "
                             f"{len(levels)}, {len(strengths)}, {len(level_weights)}")
        if any(not 0 <= s <= 1 for s in strengths):
            raise ValueError(f"{who}: augmentation strengths must lie in [0, 1], got {list(strengths)}")
        if virtual_outliers not in (1, 2, 3):
            raise ValueError(f"{who}: virtual_outliers (rotations per image) must be 1, 2 or 3, got "
                             f"{virtual_outliers!r}")


def train_one_class(backbone: Any, images: Any, method: str = "msc", *, epochs: int = 20, batch_size: int = 64,
                    lr: float | None = None, momentum: float | None = None, weight_decay: float | None = None,
                    schedule: str | None = None, image_size: int | None = None, layer: str = "head",
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    freeze: Sequence[str] | None = None, temperature: float | None = None, angular: bool = True,
                    levels: Sequence[str] | None = None, strengths: Sequence[float] | None = None,
                    level_weights: Sequence[float] | None = None,
                    weight_temperature: float = UNICON_WEIGHT_TEMPERATURE, soft_aggregation: bool = True,
                    virtual_outliers: int = 3, seed: int = 0, device: str = "cpu",
                    checkpoint_dir: str | Path | None = None, copy: bool = True, progress: bool = True,
                    max_steps: int | None = None) -> tuple[Any, History]:
    """Fine-tune ``backbone`` on the normal ``images`` with ``method`` (``"msc"`` or ``"unicon_ha"``); returns the
    fine-tuned backbone (eval mode; UniCon-HA's projection heads dropped) and the :class:`History`.

    Args:
        backbone: a torch module with ``forward_features(x, layers)`` (EfficientNet-Lite0's API), e.g.
            ``oodscope.models.efficientnet_lite.efficientnet_lite0()`` (ImageNet weights).
        images: the normal training images: uint8 ``N x H x W x C`` (the ``.npz`` layout) or ``N x C x H x W``, or
            float in [0, 1]; at least 2.
        method: ``"msc"`` (Reiss & Hoshen) or ``"unicon_ha"`` (Wang et al.).
        epochs, batch_size: passes over the images and images per step (the last incomplete batch is dropped).
        lr, momentum, weight_decay, schedule: SGD and its ``"constant"``/``"cosine"`` (per step) schedule; ``None``
            takes the method's default (:data:`DEFAULTS`).
        image_size: side of the square network input (images are resized to it; default: their own size).
        layer: the feature layer that is scored (and MSC's embedding).
        mean, std: per-channel input normalisation (default EfficientNet-Lite's 0.5 / 0.5).
        freeze: parameter-name prefixes kept fixed (default: EfficientNet-Lite0's stem and stages 1-3).
        temperature: the contrastive temperature (default 0.25 for MSC, 0.5 for UniCon-HA).
        angular: MSC's angular center loss on or off.
        levels, strengths, level_weights: UniCon-HA's hierarchical levels (feature names), their augmentation
            strengths in [0, 1] and ``lambda_i`` (default: :data:`EFFICIENTNET_LEVELS`, 0.25 ... 1, ones; a
            single ``layer`` level for other backbones).
        weight_temperature, soft_aggregation: ``tau_w`` and whether the soft aggregation weights are used.
        virtual_outliers: rotations per image (3: all of 90/180/270 degrees, the paper; 1 or 2: drawn per image).
        seed: data order, augmentation and head initialisation.
        device: ``"cpu"``, ``"cuda"``, ...
        checkpoint_dir: where the per-epoch checkpoint lives; a rerun resumes from it.
        copy: train a copy of ``backbone`` (default) or ``backbone`` itself.
        progress: a progress bar per epoch with the loss terms.
        max_steps: stop each epoch after this many steps (short CPU schedules; part of the checkpoint identity).
    """
    import torch

    from ..models.efficientnet_lite import EfficientNetLite0

    x = _unit_images(images, "train_one_class: training images", _in_channels(backbone))
    options = {key: value if value is not None else DEFAULTS.get(method, DEFAULTS["msc"])[key]
               for key, value in dict(lr=lr, momentum=momentum, weight_decay=weight_decay, schedule=schedule).items()}
    if temperature is None:
        temperature = MSC_TEMPERATURE if method == "msc" else UNICON_TEMPERATURE
    if levels is None:
        levels = EFFICIENTNET_LEVELS if isinstance(backbone, EfficientNetLite0) else (layer,)
    strengths = tuple(strengths) if strengths is not None else tuple(np.linspace(1, 0, len(levels), endpoint=False)
                                                                     [::-1].round(6).tolist())
    level_weights = tuple(level_weights) if level_weights is not None else (1.0,) * len(levels)
    _check_options(method, epochs, batch_size, options, levels, strengths, level_weights, virtual_outliers,
                   temperature, len(x))
    if method == "unicon_ha" and x.shape[2] != x.shape[3]:
        raise ValueError(f"train_one_class: unicon_ha rotates the images and needs square ones, got {x.shape[2:]}")
    default_mean, default_std = _default_mean_std()
    mean, std = tuple(mean or default_mean), tuple(std or default_std)
    size = int(image_size or x.shape[-1])
    backbone = copying.deepcopy(backbone) if copy else backbone
    backbone.to(device)
    frozen = _freeze(backbone, freeze)
    probe = _normalise(_resize(torch.from_numpy(x[:1]).to(device), size), mean, std)
    trainee = _Trainee.build(backbone, method, levels, probe, PROJECTION_DIM, seed).to(device)
    centre = None
    if method == "msc":  # from the pretrained features, before any step (a resumed run gets the same centre)
        z = torch.nn.functional.normalize(torch.from_numpy(embed(backbone, x, layer=layer, image_size=size, mean=mean,
                                                                 std=std, device=device)), dim=1)
        centre = torch.nn.functional.normalize(z.mean(dim=0), dim=0).float().to(device)
    settings = dict(method=method, temperature=temperature, angular=angular, layer=layer, size=size, mean=mean,
                    std=std, frozen=len(frozen), levels=list(levels), strengths=list(strengths),
                    level_weights=list(level_weights), weight_temperature=weight_temperature,
                    soft=soft_aggregation, virtual_outliers=virtual_outliers)
    run = _Run(trainee, x, settings, centre, options, epochs, min(batch_size, len(x)), seed, device, max_steps)
    run.fit(None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT, progress)
    backbone.eval()
    return backbone, run.history


class _Run:
    """One training run: optimiser, schedule, generators, the step losses and the epoch loop with checkpoints."""

    def __init__(self, trainee, x: np.ndarray, settings: dict, centre, options: dict, epochs: int, batch_size: int,
                 seed: int, device: str, max_steps: int | None):
        import torch

        self.trainee, self.x, self.settings, self.centre = trainee, x, settings, centre
        self.epochs, self.batch_size, self.seed, self.device = epochs, batch_size, seed, device
        self.steps_per_epoch = len(x) // batch_size
        if max_steps is not None:
            self.steps_per_epoch = max(1, min(self.steps_per_epoch, int(max_steps)))
        total = epochs * self.steps_per_epoch
        trainable = [p for p in trainee.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("train_one_class: every parameter is frozen; freeze fewer layers (freeze=...)")
        self.optimiser = torch.optim.SGD(trainable, lr=options["lr"], momentum=options["momentum"],
                                         weight_decay=options["weight_decay"])
        factor = (lambda step: 0.5 * (1 + math.cos(math.pi * step / total))) if options["schedule"] == "cosine" \
            else (lambda step: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimiser, factor)
        self.generators = (torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1))
        self.history = History()
        shapes = [(name, tuple(p.shape)) for name, p in trainee.state_dict().items()]
        self.identity = {
            "model": f"{type(trainee['backbone']).__name__} {hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]}",
            "objective": f"one_class {json.dumps(settings, sort_keys=True, default=repr)}",
            "schedule": f"{epochs}x{self.steps_per_epoch} {json.dumps(options, sort_keys=True)} bs={batch_size} "
                        f"seed={seed}",
            "data": _data_fingerprint(x, None, None)}

    def fit(self, path: Path | None, progress: bool) -> None:
        import torch
        from tqdm.auto import tqdm

        start = 0
        if path is not None and path.exists():
            start = _resume(path, self.identity, self.trainee, self.optimiser, self.scheduler, self.generators,
                            self.history)
        data_gen, _ = self.generators
        self.trainee.eval()  # batch-norm statistics stay the pretrained ones (MSC's code never calls train())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for epoch in range(start, self.epochs):
                order = torch.randperm(len(self.x), generator=data_gen)
                sums: dict[str, float] = {}
                started = time.perf_counter()
                bar = tqdm(range(self.steps_per_epoch), desc=f"{self.settings['method']} epoch {epoch + 1}/"
                           f"{self.epochs}", disable=not progress, leave=False)
                for step in bar:
                    index = order[step * self.batch_size:(step + 1) * self.batch_size].numpy()
                    total, terms = step_loss(self, torch.from_numpy(self.x[index]).to(self.device))
                    if not torch.isfinite(total):
                        saved = f"; the last good checkpoint is {path}" if path and path.exists() else ""
                        raise FloatingPointError(f"train_one_class: the {self.settings['method']} loss is "
                                                 f"{float(total.detach())} at epoch {epoch + 1}, step {step + 1}; "
                                                 f"lower lr{saved}")
                    self.optimiser.zero_grad(set_to_none=True)
                    total.backward()
                    self.optimiser.step()
                    self.scheduler.step()
                    for key, value in {"loss": float(total.detach()), **terms}.items():
                        sums[key] = sums.get(key, 0.0) + value
                    bar.set_postfix({k: f"{v / (step + 1):.4f}" for k, v in sums.items()})
                self.history.epochs.append({k: v / self.steps_per_epoch for k, v in sums.items()})
                self.history.seconds.append(time.perf_counter() - started)
                self.history.images += self.steps_per_epoch * self.batch_size
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _save_atomic({"identity": self.identity, "epoch": epoch + 1, "model": self.trainee.state_dict(),
                                  "optimiser": self.optimiser.state_dict(), "scheduler": self.scheduler.state_dict(),
                                  "generators": [g.get_state() for g in self.generators],
                                  "history": json.dumps({"epochs": self.history.epochs,
                                                         "seconds": self.history.seconds,
                                                         "images": self.history.images})}, path)


def step_loss(run: _Run, x) -> tuple[Any, dict[str, float]]:
    """The loss of one batch ``x`` (float ``(B, C, H, W)`` in [0, 1]) for the run's method."""
    from torch.nn import functional as F

    s, (_, aug_gen) = run.settings, run.generators
    backbone = run.trainee["backbone"]

    def features(views, layer: str):
        return _pooled(backbone, _normalise(views, s["mean"], s["std"]), layer)

    if s["method"] == "msc":
        z1 = F.normalize(features(augment_views(x, aug_gen, s["size"]), s["layer"]), dim=1)
        z2 = F.normalize(features(augment_views(x, aug_gen, s["size"]), s["layer"]), dim=1)
        return msc_loss(z1, z2, run.centre, s["temperature"], s["angular"])
    import torch

    both = torch.cat([x, rotations(x, aug_gen, s["virtual_outliers"])])
    total, terms = 0.0, {}
    for level, strength, weight in zip(s["levels"], s["strengths"], s["level_weights"]):
        head = run.trainee["heads"][level]
        v1 = head(features(augment_views(both, aug_gen, s["size"], strength), level))
        v2 = head(features(augment_views(both, aug_gen, s["size"], strength), level))
        n = len(x)
        loss = unilateral_aggregation_loss(v1[:n], v2[:n], v1[n:], v2[n:], s["temperature"],
                                           s["weight_temperature"], s["soft"])
        terms[level] = float(loss.detach())
        total = total + weight * loss
    return total / len(s["levels"]), terms
