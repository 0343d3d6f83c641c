"""Greedy k-center coreset selection for PatchCore: exact, with batched low-precision filtering.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022, Sec. 3.2 and Alg. 1: starting
from one random patch, repeatedly add ``m_i = argmax_{m in M - M_C} min_{n in M_C} ||psi(m) - psi(n)||^2``, the
patch farthest from the coreset so far, with ``psi`` a Gaussian random projection to ``projection_dim`` (128)
dimensions (Gonzalez's farthest-point algorithm, a 2-approximation of the k-center problem).

The plain loop reads the whole projected bank once per selected patch: at PatchCore's defaults (667 images,
224 px, ~0.5M patches, 10 % coreset) that is ~50k passes over 270 MB, memory-bandwidth bound (a matrix-vector
product per pick). Triangle-inequality pruning (Elkan 2003; clusters around the selected centres) does not help
on these banks: their intrinsic dimension is high (the covering radius halves only every ~1,000 picks, and 80-97 %
of the patches stay within twice their cluster's radius of a new centre). What is done instead, per batch:

1. the ``B`` patches with the largest nearest distances are the candidates for the next picks (the next pick is
   the largest of all; the following ones usually come from the same top list, farther down);
2. one matrix product (bfloat16 on CPUs with native bfloat16, else float32) gives every patch's approximate
   squared distance to every candidate, ``|x|^2 + |c|^2 - 2 x.c`` on mean-centred features, and a lower bound
   ``L = approx - ETA |x| |c| - ETA32 (|x|^2 + |c|^2)`` that is rigorous for that arithmetic's round-off;
3. while the next pick (the exact argmax of the nearest distances) is a candidate: only the patches with
   ``L < (1 + 1e-4) d_x`` can come closer to it; their exact distances are computed and the others are left as
   they are. A pick outside the batch starts a new batch.

So a batch of picks reads the bank once (a compute-bound matrix product instead of ``B`` bandwidth-bound
matrix-vector products), and each pick then touches only a few N-vectors and its few close patches.

Exactness: a distance is ``sum_k (x_k - c_k)^2`` in float32 (elementwise difference, square, row sum), whose
value for a row does not depend on which other rows are computed with it, and a patch is skipped only where the
lower bound proves that its computed distance cannot be below its current nearest distance (the margins are
several times the worst-case round-off). The nearest distances, hence the selected indices, are exactly those of
the plain loop with the same distance (ties: the lowest index, as ``torch.argmax``); selected patches leave the
candidate set (``M - M_C``), so duplicates are never picked twice while unpicked patches remain.
"""

from __future__ import annotations

import numpy as np
import torch

NEAR_SLACK = 1e-4  # a patch is skipped only if its bound exceeds (1 + NEAR_SLACK) d_x (float32 distances: 8e-6)
NORM_TOL = 1e-4  # allowance relative to |x|^2 + |c|^2 for float32 norms and arithmetic (worst case ~1e-5)
ETA = {torch.bfloat16: 2.4e-2, torch.float32: 1e-4}  # allowance relative to |x||c| for the matrix product's
# round-off: bfloat16 inputs and output with float32 accumulation, worst case 1.2e-2; float32, worst case 1.6e-5
ETA_OFF_CPU = 2.4e-2  # float32 on GPUs, where TF32 (10-bit mantissa) may be switched on: the bfloat16 allowance
ABS_SLACK = 1e-30  # absolute allowance (values below float32's normal range may be flushed to zero)
CHUNK = 32768  # rows per block of exact distances (bounded temporary memory)
SELECTED = -1.0  # the nearest distance stored for selected patches: below every distance, out of the argmax
BATCH_MIN, BATCH_MAX = 32, 256  # candidates per batch (adapted: twice the picks the last batch gave)
BATCH_ELEMENTS = 2 ** 26  # at most this many batch distances are held (128 MB in bfloat16)


def project(features: np.ndarray | torch.Tensor, projection_dim: int | None, seed: int,
            device: str | torch.device = "cpu") -> torch.Tensor:
    """``(N, projection_dim)`` float32 Gaussian random projection ``x W / sqrt(projection_dim)`` (seeded).

    ``None``, or a ``projection_dim`` at least the feature dimension, returns the features unprojected.
    """
    x = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32)).to(device)
    if x.ndim != 2 or len(x) == 0 or x.shape[1] == 0:
        raise ValueError(f"greedy_coreset: expected a non-empty (N, D) feature array, got shape {tuple(x.shape)}")
    if projection_dim is not None and projection_dim < x.shape[1]:
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(x.shape[1], projection_dim, generator=generator) / np.sqrt(projection_dim)
        x = x @ projection.to(x.device)
    return x


def squared_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``sum_k (x_ik - c_k)^2`` per row in float32, in blocks of :data:`CHUNK` rows.

    Elementwise difference and square, then a row sum: a row's value does not depend on the other rows passed
    (unlike a BLAS matrix-vector product, whose per-row rounding depends on the kernel's blocking).
    """
    if len(x) <= CHUNK:
        return (x - c).square_().sum(1)
    return torch.cat([(x[i:i + CHUNK] - c).square_().sum(1) for i in range(0, len(x), CHUNK)])


def check_bank(x: torch.Tensor) -> None:
    """``ValueError`` for a bank the selection cannot use: NaN/inf, or squared distances overflowing float32."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError("greedy_coreset: features contain NaN or inf; check the backbone's outputs")
    spread = float((x - x.mean(0)).abs().max()) * np.sqrt(x.shape[1])
    if not 4 * spread ** 2 < np.finfo(np.float32).max:
        raise ValueError("greedy_coreset: features are too large for float32 squared distances "
                         f"(spread {spread:.3g}); rescale them")


def filter_precision(device: torch.device) -> tuple[torch.dtype, float]:
    """The matrix product's dtype and its round-off allowance ``ETA``: bfloat16 on CPUs with native bfloat16
    instructions (twice float32's speed), float32 elsewhere."""
    if device.type != "cpu":
        return torch.float32, ETA_OFF_CPU
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    return (torch.bfloat16 if native else torch.float32), ETA[torch.bfloat16 if native else torch.float32]


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` along the first axis (``index_select``: several times faster than advanced indexing)."""
    return torch.index_select(values, 0, index)


class _Selection:
    """The nearest distances to the selected patches, updated exactly with a batch of candidates at a time."""

    def __init__(self, x: torch.Tensor, first: int):
        self.x = x
        self.dtype, self.eta = filter_precision(x.device)
        centred = x - x.mean(0)
        self.sq = centred.square().sum(1)  # |x - mean|^2, float32
        self.norm = self.sq.sqrt()
        self.low = centred.to(self.dtype)  # the matrix product's operand
        self.base = (1 - NORM_TOL) * self.sq  # the per-patch part of the lower bound
        del centred
        self.nearest = squared_distances(x, x[first])
        self.limit = self.nearest * (1 + NEAR_SLACK)  # a patch whose lower bound is below this is recomputed
        self._mark_selected(first)
        self.slot = torch.full((len(x),), -1, dtype=torch.long, device=x.device)  # position in the batch
        self.candidates: torch.Tensor | None = None
        self.threshold = float("inf")
        self.batch: torch.Tensor | None = None
        self.size, self.picks = BATCH_MIN, 0
        self.largest = max(BATCH_MIN, min(BATCH_MAX, BATCH_ELEMENTS // len(x)))

    def _mark_selected(self, index: int) -> None:
        self.nearest[index] = SELECTED
        self.limit[index] = -float("inf")

    def _new_batch(self, index: int) -> None:
        """Candidates: ``index`` and the patches with the largest nearest distances; their distance products."""
        if self.candidates is not None:
            self.slot[self.candidates] = -1
            self.size = min(max(2 * self.picks, BATCH_MIN), self.largest)
        top = torch.topk(self.nearest, min(self.size, len(self.x)))
        self.threshold = float(top.values[-1])  # every other patch's nearest distance is at most this, and falls
        self.candidates = torch.unique(torch.cat([top.indices, torch.tensor([index], device=top.indices.device)]))
        self.slot[self.candidates] = torch.arange(len(self.candidates), device=self.x.device)
        self.batch = _take(self.low, self.candidates) @ self.low.T  # (B, N) x.c on centred features
        self.picks = 0

    def lower_bound(self, index: int) -> torch.Tensor:
        """``(N,)`` float32 lower bounds of every patch's squared distance to candidate ``index``:
        ``(|x|^2 + |c|^2)(1 - NORM_TOL) - 2 x.c - eta |x| |c|`` on centred features, ``x.c`` from the batch."""
        bound = torch.add(self.base, self.batch[int(self.slot[index])], alpha=-2.0)
        bound.sub_(self.norm, alpha=self.eta * float(self.norm[index]))
        return bound.add_((1 - NORM_TOL) * float(self.sq[index]) - ABS_SLACK)

    def add(self, index: int) -> None:
        """Take patch ``index`` into the coreset: the exact nearest distances of the patches it can come closer to."""
        if int(self.slot[index]) < 0:
            self._new_batch(index)
        close = torch.nonzero(self.lower_bound(index) < self.limit)[:, 0]
        dist = squared_distances(_take(self.x, close), self.x[index])
        closer = torch.nonzero(dist < _take(self.nearest, close))[:, 0]
        moved, dist = _take(close, closer), _take(dist, closer)
        self.nearest[moved] = dist
        self.limit[moved] = dist * (1 + NEAR_SLACK)
        self._mark_selected(index)
        self.picks += 1

    def farthest(self) -> int:
        """The unselected patch with the largest nearest distance (the lowest index among equals).

        Among the candidates (sorted by index) when their largest distance exceeds the batch's threshold, which
        bounds every other patch's distance; otherwise over all patches.
        """
        if self.candidates is not None:
            values = _take(self.nearest, self.candidates)
            best = int(torch.argmax(values))
            if float(values[best]) > self.threshold:
                return int(self.candidates[best])
        return int(torch.argmax(self.nearest))


def greedy_coreset(features: np.ndarray | torch.Tensor, n_select: int, projection_dim: int | None = 128,
                   seed: int = 0, device: str | torch.device = "cpu") -> np.ndarray:
    """Indices of the greedy k-center coreset (Roth et al. 2022, Alg. 1), first pick at random (see module).

    ``features`` ``(N, D)``; distances are taken after a Gaussian random projection to ``projection_dim``
    dimensions (``None``: no projection). Returns ``min(n_select, N)`` distinct indices in selection order, the
    same as the plain farthest-point loop with the same distances (``tests/test_coreset.py``). ``device``: where
    the selection runs. A tqdm bar counts the selected patches (off when not a terminal).
    """
    from tqdm.auto import tqdm

    x = project(features, projection_dim, seed, device)
    check_bank(x)
    n_select = int(min(max(n_select, 1), len(x)))
    selected = np.empty(n_select, dtype=np.int64)
    selected[0] = np.random.default_rng(seed).integers(len(x))
    if n_select == 1:
        return selected
    selection = _Selection(x, int(selected[0]))
    bar = tqdm(total=n_select, desc="patchcore coreset", unit="patch", leave=False, disable=None, mininterval=1.0)
    for i in range(1, n_select):
        if i > 1:
            selection.add(int(selected[i - 1]))
        selected[i] = selection.farthest()
        if i % 256 == 0:  # the bar's own cost stays off the inner loop
            bar.update(i - bar.n)
    bar.update(n_select - bar.n)
    bar.close()
    return selected
