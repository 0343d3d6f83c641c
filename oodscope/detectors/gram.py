"""Gram matrices: out-of-range higher-order feature correlations.

Sastry & Oore, "Detecting Out-of-Distribution Examples with Gram Matrices", ICML 2020, Sec. 3:

* for a layer's feature map ``F`` (``C x HW``) and order (pole) ``p``, ``G_p = (F^p F^p^T)^{1/p}`` with the power
  taken elementwise and the sign kept; as in the authors' code the ``C x C`` matrix is reduced to its row sums
  (``C`` values per layer and pole, computed as ``F^p (F^p^T 1)`` without forming the matrix);
* for every class ``c`` (the network's *predicted* class, as in the authors' code) the minimum and maximum of
  every value over the training samples predicted as ``c``;
* deviation of one value (Eq. 3): ``0`` inside ``[min, max]``, ``(min - v) / |min|`` below, ``(v - max) / |max|``
  above; a layer's deviation ``delta_l`` sums them over values and poles, for the test sample's predicted class;
* total deviation (Eq. 4): ``sum_l delta_l / E_va[delta_l]``, the expected deviation estimated on held-out ID
  data; here a fixed ``validation_fraction`` of the training set (seeded) is held out of the min/max fit.

Defaults: poles ``p = 1..10`` (the paper's ``P = 10``). Gram needs full feature maps: they are taken from
``Outputs.layers`` when these hold maps (``extract(..., layer_reduce="none")``, fine for small sets) and
otherwise computed batch by batch by re-running the model (``Outputs.source``), so the maps are never stored.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..extraction.outputs import Need, Outputs
from .base import Detector


CHUNK_ELEMENTS = 1 << 17  # map values per chunk in gram_row_sums


def gram_row_sums(maps, poles: Sequence[int], chunk: int | None = None):
    """``(B, P, C)`` sign-preserving ``p``-th roots of the Gram row sums of ``(B, C, ...)`` maps (torch or numpy).

    Float64, ``chunk`` samples at a time (default: as many as make :data:`CHUNK_ELEMENTS` values, 1 MiB of
    float64): small enough that a chunk's powers stay in the CPU cache across the three operations of every
    pole, with one float64 copy of the chunk, channel-major whatever the maps' layout. Measured with ten poles on
    2 threads, on 2,800 post-ReLU maps of each CIFAR ResNet-20 layer (16 x 32 x 32 twice, 32 x 16 x 16,
    64 x 8 x 8): chunks of 2^15 / 2^16 / 2^17 / 2^18 / 2^19 values took 1.9 / 0.67 / 0.52 / 0.54 / 0.93 s over
    the four layers. All ten poles at once per chunk (a cumulative product over a pole axis) was slower; taking
    the roots once at the end instead of per chunk and pole saved a fifth (0.81 to 0.66 s), and the column sums
    as a batched product with a row of ones instead of ``sum(dim=1)`` another tenth (0.66 to 0.59 s). The
    powers are updated in place; each row sum ``F^p (F^p^T 1)`` is the column sums ``s = 1^T F^p`` times
    ``F^p^T``, computed as the batched row-vector product ``s^T F^p^T`` (BLAS reads ``F^p`` along its rows:
    about 6x faster than the matrix-vector ``F^p s``, which walks it with a stride).
    """
    import torch

    maps = torch.as_tensor(maps)
    n, channels = maps.shape[:2]
    chunk = chunk or max(1, CHUNK_ELEMENTS // max(1, maps[:1].numel()))
    sums = torch.empty(n, len(poles), channels, dtype=torch.float64, device=maps.device)
    ones = torch.ones(min(chunk, n), 1, channels, dtype=torch.float64, device=maps.device)
    for start in range(0, n, chunk):
        # one float64 copy of the chunk, channel-major whatever the maps' layout (extract keeps channels-last)
        x = maps[start:start + chunk].to(torch.float64, memory_format=torch.contiguous_format).flatten(2)
        powered, power = x.clone(), 1
        for i, p in enumerate(poles):
            if p > power:
                powered.mul_(x if p - power == 1 else x ** (p - power))
                power = p
            column_sums = torch.bmm(ones[:len(x)], powered)  # (B, 1, HW); BLAS reads rows, as below
            sums[start:start + chunk, i] = torch.bmm(column_sums, powered.transpose(1, 2)).squeeze(1)
    # the signed p-th roots once for all chunks and poles (per chunk and pole they were a fifth of the time)
    roots = 1.0 / torch.as_tensor(list(poles), dtype=torch.float64, device=maps.device)[None, :, None]
    return torch.sign(sums) * sums.abs().pow_(roots)


class Gram(Detector):
    """``score(x) = sum_l delta_l(x) / E_va[delta_l]`` (Sastry & Oore 2020, Eq. 4)."""

    name = "gram"
    needs = frozenset({Need.LOGITS, Need.LAYERS})  # maps from Outputs.layers or, failing that, from the model
    grid = {"poles": [list(range(1, 11)), list(range(1, 6))]}

    def __init__(self, layers: Sequence[str] | None = None, poles: Sequence[int] = tuple(range(1, 11)),
                 validation_fraction: float = 0.1, seed: int = 0):
        self.layers = layers
        self.poles = poles
        self.validation_fraction = validation_fraction
        self.seed = seed

    def _check_params(self) -> None:
        if self.layers is None or isinstance(self.layers, str) or len(self.layers) == 0:
            raise ValueError("gram: pass layers=[...], the modules whose feature maps are used (e.g. "
                             "['relu', 'layer1', 'layer2', 'layer3'] for the CIFAR ResNets)")
        if len(self.poles) == 0 or any(not (isinstance(p, (int, np.integer)) and p >= 1) for p in self.poles) \
                or list(self.poles) != sorted(set(self.poles)):
            raise ValueError(f"gram: poles must be increasing positive integers, got {self.poles!r}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"gram: validation_fraction must be in (0, 1), got {self.validation_fraction!r}")

    def layer_names(self) -> list[str]:
        return []  # the maps may come from a re-run of the model instead; statistics() checks them

    def statistics(self, x: Outputs) -> list[np.ndarray]:
        """Per layer, the ``(N, P, C_l)`` Gram values of every sample."""
        if all(layer in x.layers and x.layers[layer].ndim > 2 for layer in self.layers):
            return [gram_row_sums(x.layer(layer, who=self.name), self.poles).numpy() for layer in self.layers]
        if x.source is None:
            raise ValueError(f"gram needs the feature maps of layers {list(self.layers)} for dataset {x.name!r}: "
                             "pass the outputs of oodscope.extract(...) made in this session (they carry the "
                             "model), or extract the layers with layer_reduce='none'")
        import torch

        from ..extraction.rerun import rerun

        x.get(Need.MODEL, who=self.name)  # the raw inputs are checked (finite) before the re-run
        modules = dict(x.source.model.named_modules())
        missing = [layer for layer in self.layers if layer not in modules]
        if missing:
            raise ValueError(f"gram: the model has no layers {missing}; pass names from dict(model.named_modules())")
        sizes: list[int] = []

        def score_batch(batch, probe):
            with torch.no_grad():
                parts = probe(batch)
            stats = [gram_row_sums(parts[layer], self.poles) for layer in self.layers]
            sizes[:] = [s.shape[2] for s in stats]
            return torch.cat([s.flatten(1) for s in stats], dim=1)

        joint = rerun(x.source, score_batch, layers=list(self.layers), layer_reduce="none")
        bounds = np.cumsum([0] + [len(self.poles) * c for c in sizes])
        return [joint[:, a:b].reshape(len(joint), len(self.poles), -1) for a, b in zip(bounds[:-1], bounds[1:])]

    def _fit(self, train: Outputs) -> None:
        stats = self.statistics(train)
        predicted = np.asarray(train.logits).argmax(axis=1)
        n_classes = train.logits.shape[1]
        held_out = np.zeros(len(train), dtype=bool)
        held_out[np.random.default_rng(self.seed).permutation(len(train))[:int(self.validation_fraction * len(train))]] = True
        fit_classes = np.bincount(predicted[~held_out], minlength=n_classes)
        if (fit_classes == 0).any():
            missing = np.flatnonzero(fit_classes == 0).tolist()
            raise ValueError(f"gram: no training sample of {train.name!r} is predicted as classes {missing}; the "
                             "class-wise bounds need at least one per class (use more training data)")
        order = np.argsort(predicted[~held_out], kind="stable")
        starts = np.searchsorted(predicted[~held_out][order], np.arange(n_classes))
        self.mins_, self.maxs_ = [], []
        for values in stats:
            ordered = values[~held_out][order]
            self.mins_.append(np.minimum.reduceat(ordered, starts, axis=0))
            self.maxs_.append(np.maximum.reduceat(ordered, starts, axis=0))
        deviations = self._layer_deviations([s[held_out] for s in stats], predicted[held_out])
        expected = deviations.mean(axis=0) if held_out.any() else np.ones(len(stats))
        self.expected_deviation_ = np.where(expected > 0, expected, 1.0)

    def _layer_deviations(self, stats: list[np.ndarray], predicted: np.ndarray) -> np.ndarray:
        out = np.zeros((len(predicted), len(stats)))
        for i, values in enumerate(stats):
            low, high = self.mins_[i][predicted], self.maxs_[i][predicted]
            below = np.maximum(low - values, 0.0) / (np.abs(low) + 1e-6)
            above = np.maximum(values - high, 0.0) / (np.abs(high) + 1e-6)
            out[:, i] = (below + above).sum(axis=(1, 2))
        return out

    def _score(self, x: Outputs) -> np.ndarray:
        deviations = self._layer_deviations(self.statistics(x), np.asarray(x.logits).argmax(axis=1))
        return deviations @ (1.0 / self.expected_deviation_)
