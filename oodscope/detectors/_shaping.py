"""Helpers shared by the activation-shaping and head-geometry detectors (ReAct, ASH, SCALE, ...).

Everything is vectorised over samples and computed in float64. Percentiles follow numpy's convention
(``0 < p < 100``); "keep the top ``k``" uses ``k = D - round(D * p / 100)`` as the ASH/SCALE papers do.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..extraction.outputs import Head
from ._common import as_float64, energy


def check_percentile(who: str, name: str, value: float) -> None:
    """``ValueError`` unless ``0 < value < 100`` (percentiles are given in percent, not as fractions)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 100.0:
        raise ValueError(f"{who}: {name} must be a percentile strictly between 0 and 100 (percent, not a "
                         f"fraction), got {value!r}")


def check_positive(who: str, name: str, value: float, allow_zero: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{who}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_subspace_dim(who: str, dim: object, n_features: int) -> int:
    """A principal-subspace dimension must be an integer in ``(0, n_features)``."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not 0 < dim < n_features:
        raise ValueError(f"{who}: dim must be an integer in (0, {n_features}) for {n_features}-d features, "
                         f"got {dim!r}")
    return int(dim)


def head_logits(features: np.ndarray, head: Head) -> np.ndarray:
    """``features @ W.T + b`` in float64."""
    return as_float64(features) @ as_float64(head.W).T + as_float64(head.b)


def head_energy(features: np.ndarray, head: Head) -> np.ndarray:
    """Energy score (higher = more OOD) of (shaped) penultimate features passed through the linear head."""
    return energy(head_logits(features, head))


def n_kept(n_features: int, percentile: float | np.ndarray) -> np.ndarray | int:
    """How many activations survive pruning at ``percentile`` (at least one)."""
    k = n_features - np.round(n_features * np.asarray(percentile, dtype=np.float64) / 100.0).astype(np.int64)
    k = np.maximum(k, 1)
    return int(k) if np.ndim(k) == 0 else k


def top_k_mask(x: np.ndarray, k: int | np.ndarray) -> np.ndarray:
    """Boolean mask of each row's ``k`` largest entries (``k`` scalar or one per row; ties by position)."""
    order = np.argsort(-x, axis=1, kind="stable")
    ranks = np.empty_like(order)
    ranks[np.arange(len(x))[:, None], order] = np.arange(x.shape[1])  # inverse permutation per row
    return ranks < np.reshape(k, (-1, 1))


def sum_ratio(x: np.ndarray, k: int | np.ndarray) -> np.ndarray:
    """``r = sum(x) / sum(top-k of x)`` per row (SCALE/ASH-S/AdaSCALE); rows whose top-k sum is 0 get ``r = 1``."""
    total = x.sum(axis=1)
    kept = np.where(top_k_mask(x, k), x, 0.0).sum(axis=1)
    safe = np.where(kept > 0, kept, 1.0)
    return np.where(kept > 0, total / safe, 1.0)
