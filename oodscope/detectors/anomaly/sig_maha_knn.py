"""SigMahaKNN: nearest-neighbour conformance of path signatures in the variance norm.

Shao, Chan, Cochrane, Foster & Lyons, "Dimensionless Anomaly Detection on Multivariate Streams with Variance Norm
and Path Signature", arXiv:2006.03487 (2020). Each stream ``x`` (``L`` time steps x ``C`` channels) is mapped to its
truncated signature ``S(x)`` (levels ``1..depth``; here with a time channel ``t in [0, 1]`` appended, so the
signature determines the stream). The clean training corpus is split in two halves: the first defines the
variance norm ``||v||_Sigma = sup_f <f, v> / sqrt(E <f, S(y)>^2)``, i.e. the Mahalanobis norm of the
signatures' second-moment matrix ``Sigma`` (pseudo-inverse, Sec. 2.2), and the anomaly score is the
conformance to the second half, ``dist(x) = min_{y in corpus 2} ||S(x) - S(y)||_Sigma`` (Sec. 2.3). The method is
"dimensionless": the variance norm is invariant to invertible linear maps of the signature features.

Signatures come from ``iisignature`` (Reizenstein & Graham, PyPI; install with
``pip install --no-build-isolation iisignature``), imported when the detector is fitted. Input rows are flattened
streams, ``features[i] = x_i.reshape(L * C)`` (time-major), with ``channels = C``.
"""

from __future__ import annotations

import numpy as np

from ...extraction.outputs import Outputs
from ..mahalanobis import whitening
from ._base import AnomalyDetector, NeighbourBank, check_int, in_blocks


def _iisignature(who: str):
    try:
        import iisignature
    except ImportError:
        raise ValueError(f"{who}: needs the iisignature package; "
                         "pip install --no-build-isolation iisignature") from None
    return iisignature


def stream_signatures(rows: np.ndarray, channels: int, depth: int, time_augment: bool, who: str) -> np.ndarray:
    """Truncated signatures (levels 1..depth) of the flattened streams in ``rows``."""
    iisignature = _iisignature(who)
    streams = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1, channels)
    if time_augment:
        time = np.broadcast_to(np.linspace(0.0, 1.0, streams.shape[1])[None, :, None], streams.shape[:2] + (1,))
        streams = np.concatenate([time, streams], axis=2)
    return np.asarray(iisignature.sig(np.ascontiguousarray(streams), depth), dtype=np.float64).reshape(len(rows), -1)


class SigMahaKNN(AnomalyDetector):
    """``min_{y in corpus 2} ||S(x) - S(y)||_Sigma`` with ``Sigma`` from corpus 1 (signature variance norm)."""

    name = "sig_maha_knn"
    adbench_default = False  # needs streams (rows = flattened L x C streams)
    grid = {"depth": [2, 3, 4, 5]}

    def __init__(self, channels: int = 1, depth: int = 3, time_augment: bool = True, split: float = 0.5,
                 seed: int = 0):
        self.channels = channels
        self.depth = depth
        self.time_augment = time_augment
        self.split = split
        self.seed = seed

    def _check_params(self) -> None:
        check_int(self.name, "channels", self.channels)
        check_int(self.name, "depth", self.depth, minimum=1)
        if not 0.0 < float(self.split) < 1.0:
            raise ValueError(f"{self.name}: split must be in (0, 1) (share of the corpus for the variance norm)")

    def _signatures(self, rows: np.ndarray) -> np.ndarray:
        width = rows.shape[1]
        if width % self.channels or width // self.channels < 2:
            raise ValueError(f"{self.name}: rows of width {width} are not streams of >= 2 steps x {self.channels} "
                             "channels; pass features = streams.reshape(n, steps * channels) and channels=")
        return stream_signatures(rows, self.channels, self.depth, self.time_augment, self.name)

    def _fit(self, train: Outputs) -> None:
        X = self._x(train)
        signatures = self._signatures(X)
        order = np.random.default_rng(self.seed).permutation(len(X))
        n_first = int(round(self.split * len(X)))
        if n_first < 2 or len(X) - n_first < 1:
            raise ValueError(f"{self.name}: {len(X)} training streams are too few to split into a variance-norm corpus "
                             "and a neighbour corpus; give at least 3")
        first, second = signatures[order[:n_first]], signatures[order[n_first:]]
        self.whitener_ = whitening(first.T @ first / len(first))
        self.bank_ = NeighbourBank(in_blocks(lambda rows: rows @ self.whitener_, second))

    def _score(self, x: Outputs) -> np.ndarray:
        whitened = in_blocks(lambda rows: rows @ self.whitener_, self._signatures(self._x(x)))
        squared, _ = self.bank_.search(whitened, 1)
        return np.sqrt(squared[:, 0])
