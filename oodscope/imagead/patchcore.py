"""PatchCore: a memory bank of locally aware patch features, greedy coreset, nearest-neighbour scoring.

Roth, Pemula, Zepeda, Schölkopf, Brox & Gehler, "Towards Total Recall in Industrial Anomaly Detection",
CVPR 2022.

* Locally aware patch features (Sec. 3.1, Eq. 1-2) from two mid-level layers. Rule for "mid-level": the paper's
  WideResNet-50 ``layer2`` and ``layer3`` are the last blocks at output strides 8 and 16 (the middle two of its
  four stride levels 4, 8, 16, 32); the EfficientNet-Lite0 blocks ending those strides are ``stage3`` (stride 8,
  40 channels) and ``stage5`` (stride 16, 112 channels). Aggregation (``aggregation="reference"``, the default,
  as in the authors' code): per layer, the ``C x p x p`` neighbourhood of every position (``patchsize`` 3) is
  unfolded into one vector, the deeper layer's vectors are upsampled bilinearly to the first layer's grid, each
  layer's vector is mapped to ``embed_dim`` (1024) values by 1-D adaptive average pooling, and the stacked layer
  vectors are pooled once more to ``embed_dim`` values, so each layer gets the same share of the dimensions.
  ``aggregation="mean"`` averages each layer over the ``p x p`` neighbourhood and concatenates the raw
  channels (anomalib's variant, border rule included; there the layer with more channels dominates the
  distances).
* Memory bank and coreset (Sec. 3.2, Alg. 1): greedy k-center selection ``m_i = argmax_{m in M - M_C}
  min_{n in M_C} ||psi(m) - psi(n)||`` of ``coreset_ratio |M|`` patches, where ``psi`` is a random linear
  projection to ``projection_dim`` (128) dimensions (Johnson-Lindenstrauss) that makes the selection cheap;
  :func:`~oodscope.imagead.coreset.greedy_coreset` filters the farthest-point updates with one matrix product
  per batch of candidate picks and returns the same indices as the plain loop, several times faster.
* Scoring (Sec. 3.3, Eq. 6-7): each test patch's distance to its nearest bank patch (exact faiss search); the
  image score ``s* = max`` of those, re-weighted by ``s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)}
  exp||m_test* - m||) s*`` with ``N_b(m*)`` the ``num_neighbors`` (b = 9 in the reference code) nearest bank
  patches of ``m*`` (computed with a softmax for numerical stability); the patch-distance map is upsampled
  bilinearly to the image size and smoothed with a Gaussian of ``sigma`` = 4 pixels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .base import ImageDetector, gaussian_blur, resolve_backbone
from .coreset import greedy_coreset

AGGREGATIONS = ("reference", "mean")


def patch_features(features: dict[str, torch.Tensor], layers: Sequence[str], patchsize: int) -> torch.Tensor:
    """``(N, h, w, C)`` locally aware patch features at the resolution of the first layer ("mean" aggregation).

    Each layer is averaged over a ``patchsize x patchsize`` neighbourhood (stride 1, zero padding counted in the
    border averages, as anomalib's ``AvgPool2d`` and the authors' zero-padded unfold do), deeper layers are
    upsampled bilinearly to the first layer's grid, and the layers are concatenated per position.
    """
    pool = nn.AvgPool2d(patchsize, stride=1, padding=patchsize // 2, count_include_pad=True)
    first = features[layers[0]]
    size = first.shape[-2:]
    parts = []
    for name in layers:
        f = pool(features[name])
        if f.shape[-2:] != size:
            f = nn.functional.interpolate(f, size=size, mode="bilinear", align_corners=False)
        parts.append(f)
    return torch.cat(parts, dim=1).permute(0, 2, 3, 1)


def reference_patch_features(features: dict[str, torch.Tensor], layers: Sequence[str], patchsize: int,
                             embed_dim: int) -> torch.Tensor:
    """``(N, h, w, embed_dim)`` patch features as the authors' reference code builds them ("reference").

    Per layer, the ``C x p x p`` neighbourhood of each position (zero padding) is unfolded into one vector of
    ``C p^2`` values, deeper layers' neighbourhood vectors are upsampled bilinearly to the first layer's grid, and
    each layer's vector is mapped to ``embed_dim`` values by 1-D adaptive average pooling (the paper's
    "adaptive average pooling" aggregation, Sec. 3.1). The layers' vectors are then stacked and pooled once more
    to ``embed_dim`` values, so that every layer gets the same share of the final dimensions whatever its
    channel count.
    """
    first = features[layers[0]]
    n, size = first.shape[0], first.shape[-2:]
    pooled = []
    for name in layers:
        f = features[name]
        c = f.shape[1]
        unfolded = nn.functional.unfold(f, patchsize, padding=patchsize // 2)  # (N, C p^2, h*w)
        unfolded = unfolded.reshape(n, c * patchsize ** 2, *f.shape[-2:])
        if f.shape[-2:] != size:
            unfolded = nn.functional.interpolate(unfolded, size=size, mode="bilinear", align_corners=False)
        vectors = unfolded.permute(0, 2, 3, 1).reshape(-1, 1, c * patchsize ** 2)
        pooled.append(nn.functional.adaptive_avg_pool1d(vectors, embed_dim))  # (N h w, 1, D)
    stacked = torch.cat(pooled, dim=2)  # layer vectors one after the other
    out = nn.functional.adaptive_avg_pool1d(stacked, embed_dim)[:, 0]
    return out.reshape(n, *size, embed_dim)


class PatchCore(ImageDetector):
    """Nearest-neighbour distance of patch features to a coreset memory bank (see module docstring)."""

    name = "patchcore"
    grid = {"coreset_ratio": [0.01, 0.1, 0.25], "num_neighbors": [9]}

    def __init__(self, backbone="efficientnet_lite0", layers: Sequence[str] = ("stage3", "stage5"),
                 patchsize: int = 3, coreset_ratio: float = 0.1, projection_dim: int | None = 128,
                 num_neighbors: int = 9, sigma: float = 4.0, seed: int = 0, aggregation: str = "reference",
                 embed_dim: int = 1024, device: str = "cpu"):
        self.backbone = backbone
        self.device = device  # where the backbone runs
        self.layers = layers
        self.patchsize = patchsize
        self.aggregation = aggregation
        self.embed_dim = embed_dim
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.num_neighbors = num_neighbors
        self.sigma = sigma
        self.seed = seed

    def _check_params(self) -> None:
        if len(self.layers) < 1:
            raise ValueError("patchcore: give at least one layer (the paper uses two mid-level layers)")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"patchcore: coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if not (isinstance(self.patchsize, int) and self.patchsize >= 1 and self.patchsize % 2 == 1):
            raise ValueError(f"patchcore: patchsize must be a positive odd integer, got {self.patchsize!r}")
        if not (isinstance(self.num_neighbors, int) and self.num_neighbors >= 1):
            raise ValueError(f"patchcore: num_neighbors must be a positive integer, got {self.num_neighbors!r}")
        if self.sigma < 0:
            raise ValueError(f"patchcore: sigma must be >= 0, got {self.sigma}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"patchcore: aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not (isinstance(self.embed_dim, int) and self.embed_dim >= 1):
            raise ValueError(f"patchcore: embed_dim must be a positive integer, got {self.embed_dim!r}")

    def _embed_batches(self, images: np.ndarray):
        for _, f in self.backbone_.batches(images, self.layers):
            if self.aggregation == "mean":
                yield patch_features(f, self.layers, self.patchsize)
            else:
                yield reference_patch_features(f, self.layers, self.patchsize, self.embed_dim)

    def _embed(self, images: np.ndarray) -> torch.Tensor:
        return torch.cat(list(self._embed_batches(images)))

    def _fit(self, images: np.ndarray) -> None:
        from ..detectors.knn import exact_index

        self.backbone_ = resolve_backbone(self.backbone, device=self.device)
        bank = self._embed(images)
        self.grid_shape_ = tuple(bank.shape[1:3])
        bank = bank.reshape(-1, bank.shape[-1]).numpy()
        n_select = int(np.ceil(self.coreset_ratio * len(bank)))
        if n_select < len(bank):
            bank = bank[greedy_coreset(bank, n_select, self.projection_dim, self.seed,
                                       device=self.backbone_.device)]
        self.memory_bank_ = np.ascontiguousarray(bank, dtype=np.float32)
        self.index_ = exact_index(self.memory_bank_)
        if self.num_neighbors > len(self.memory_bank_):
            raise ValueError(f"patchcore: num_neighbors={self.num_neighbors} exceeds the memory bank "
                             f"({len(self.memory_bank_)} patches); lower it or fit on more images")

    def _predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dists, nearests, worst_queries = [], [], []
        for patches in self._embed_batches(images):  # per batch: the patch features of all images need not fit
            b, h, w, c = patches.shape
            queries = np.ascontiguousarray(patches.reshape(-1, c).numpy(), dtype=np.float32)
            squared, nearest = self.index_.search(queries, 1)
            dist = np.sqrt(np.maximum(squared[:, 0].astype(np.float64), 0.0)).reshape(b, h * w)
            dists.append(dist)
            nearests.append(nearest[:, 0].reshape(b, h * w))
            worst_queries.append(queries.reshape(b, h * w, c)[np.arange(b), dist.argmax(axis=1)])
        dist, nearest = np.concatenate(dists), np.concatenate(nearests)
        n = len(dist)
        worst = dist.argmax(axis=1)
        s_star = dist[np.arange(n), worst]
        # re-weighting (Eq. 7): neighbourhood N_b(m*) of the nearest bank patch m* of the worst test patch
        m_star = nearest[np.arange(n), worst]
        _, neigh = self.index_.search(self.memory_bank_[m_star], self.num_neighbors)
        neigh[:, 0] = m_star  # N_b(m*) holds m* itself first (a tie could put a duplicate there)
        test_worst = np.concatenate(worst_queries).astype(np.float64)
        d_neigh = np.linalg.norm(self.memory_bank_[neigh].astype(np.float64) - test_worst[:, None], axis=2)
        from scipy.special import softmax

        weight = 1.0 - softmax(d_neigh, axis=1)[:, 0]
        scores = weight * s_star
        maps = torch.from_numpy(dist.reshape(n, 1, h, w))
        maps = nn.functional.interpolate(maps, size=images.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        return scores, gaussian_blur(maps, self.sigma).numpy()
