"""Shared base and numerics of the anomaly detectors (tabular input, one row = one sample)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ...extraction.outputs import Need, Outputs
from ..base import Detector


class AnomalyDetector(Detector):
    """A detector for plain ``(N, D)`` data (``Outputs.features``): fit on (mostly) normal rows.

    On top of the base checks (present, finite, same width at score time, not all rows identical) ``fit`` needs
    2-d rows. Columns that are constant in the training rows are accepted and kept: a column constant on normal
    rows may be exactly where anomalies differ. Scale estimates treat them as documented per detector (a zero
    spread is replaced by 1 in standardisation; covariances are regularised or pseudo-inverted).
    """

    needs = frozenset({Need.FEATURES})
    family: ClassVar[str] = "anomaly"  # run by ``oodscope adbench``, not by the default OOD benchmark
    adbench_default: ClassVar[bool] = True  # run by ``oodscope adbench`` unless named otherwise

    def _check_inputs(self, data: Outputs, fitting: bool) -> None:
        super()._check_inputs(data, fitting)
        if fitting:
            features = np.asarray(data.features)
            if features.ndim != 2:
                raise ValueError(f"{self.name}: expects 2-d features (samples x columns), got shape "
                                 f"{features.shape} for {data.name!r}; flatten them first")
            if len(features) < 2:
                raise ValueError(f"{self.name}: dataset {data.name!r} has {len(features)} row; fit needs at least 2")

    @staticmethod
    def _x(data: Outputs) -> np.ndarray:
        return np.asarray(data.features, dtype=np.float64)


def check_int(who: str, name: str, value, minimum: int = 1) -> None:
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"{who}: {name} must be an integer >= {minimum}, got {value!r}")


def check_neighbours(who: str, k: int, n_train: int, name: str = "k") -> None:
    if k > n_train:
        raise ValueError(f"{who}: {name}={k} neighbours but only {n_train} training samples; use {name} <= {n_train} "
                         "or give more training data")


def check_contamination(who: str, contamination: float) -> float:
    """A contamination factor must lie in (0, 0.5]: the share of anomalies in the data."""
    try:
        value = float(contamination)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: contamination must be a number in (0, 0.5], got {contamination!r}") from None
    if not 0.0 < value <= 0.5:
        raise ValueError(f"{who}: contamination must be in (0, 0.5] (the expected share of anomalies), "
                         f"got {contamination!r}")
    return value


# -- nearest neighbours --------------------------------------------------------------------------------------
_BLOCK = 256  # queries are searched in zero-padded blocks of this fixed size, so a score never depends on the batch


class NeighbourBank:
    """Exact Euclidean k-NN over a training bank (faiss ``IndexFlatL2``, float32).

    ``search`` pads the queries to whole blocks of a fixed size, so every query goes through the same BLAS
    kernel whatever the batch it arrives in: scoring all at once or in chunks gives identical numbers.
    ``shards > 1`` splits the bank over that many exact indexes with an exact top-k merge
    (:class:`~oodscope.detectors._sharded_index.ShardedIndex`): the same distances, ``1 / shards`` of the bank each.
    """

    def __init__(self, bank: np.ndarray, shards: int = 1, who: str = "neighbour bank"):
        import faiss

        bank = np.asarray(bank, dtype=np.float64)
        self.dim = bank.shape[1]
        self.size = len(bank)
        # distances do not change under a shift; centring first keeps float32's |a|^2 + |b|^2 - 2ab accurate
        self.offset = bank.mean(axis=0)
        centred = np.ascontiguousarray(bank - self.offset, dtype=np.float32)
        if shards == 1:
            self.index = faiss.IndexFlatL2(self.dim)
            self.index.add(centred)
        else:
            from .._sharded_index import sharded_exact_index

            self.index = sharded_exact_index(centred, shards, who=who)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances (float64, ascending) and indices of the ``k`` nearest bank rows of each query."""
        n = len(queries)
        squared = np.empty((n, k))
        indices = np.empty((n, k), dtype=np.int64)
        block = np.zeros((_BLOCK, self.dim), dtype=np.float32)
        for start in range(0, n, _BLOCK):
            rows = np.asarray(queries[start:start + _BLOCK], dtype=np.float64) - self.offset
            block[:] = 0.0
            block[:len(rows)] = rows
            d, i = self.index.search(block, k)
            squared[start:start + len(rows)] = np.maximum(d[:len(rows)].astype(np.float64), 0.0)
            indices[start:start + len(rows)] = i[:len(rows)]
        return squared, indices


def in_blocks(fn, x: np.ndarray, dtype=np.float64) -> np.ndarray:
    """``fn`` applied to zero-padded blocks of a fixed number of rows, outputs of the real rows concatenated.

    Matrix products give bit-identical rows only when the shapes agree; fixed blocks make a row's score
    independent of the batch it is scored in.
    """
    x = np.asarray(x, dtype=dtype)
    outs = []
    block = np.zeros((_BLOCK,) + x.shape[1:], dtype=dtype)
    for start in range(0, len(x), _BLOCK):
        rows = x[start:start + _BLOCK]
        block[:] = 0
        block[:len(rows)] = rows
        outs.append(np.asarray(fn(block))[:len(rows)])
    return np.concatenate(outs, axis=0)


# -- torch helpers shared by the neural detectors ------------------------------------------------------------
def predict_in_blocks(fn, x: np.ndarray) -> np.ndarray:
    """Apply a torch function (module in eval mode; float32 in) in fixed zero-padded blocks, as float64."""
    import torch

    def run(block: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return fn(torch.from_numpy(block)).detach().cpu().numpy().astype(np.float64)

    with seeded(None):
        return in_blocks(run, x, dtype=np.float32)


def train_minibatches(module, X: np.ndarray, loss_fn, *, epochs: int, batch_size: int, lr: float,
                      weight_decay: float, generator, device: str = "cpu", desc: str = "train") -> list[float]:
    """Adam on shuffled mini-batches of ``X`` (float32); ``loss_fn(module, batch, generator)``; mean loss per epoch.

    Callers build ``module`` and call this inside :func:`seeded` so initialisation, shuffling and noise are
    reproducible without touching torch's global random state. Training runs on ``device`` (batches are drawn on
    the CPU with ``generator`` and moved there; a ``loss_fn`` moves its own constants to ``batch.device``); the
    module goes back to the CPU afterwards, where scoring runs in fixed blocks. A tqdm bar per fit shows the epoch
    and the loss (off when not a terminal).
    """
    import torch
    from tqdm.auto import tqdm

    from ...extraction.extract import resolve_device

    target = resolve_device(device)
    data = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    module.to(target)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    module.train()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", leave=False, disable=None)
    try:
        for _ in bar:
            order = torch.randperm(len(data), generator=generator)
            total = 0.0
            for start in range(0, len(data), batch_size):
                batch = data[order[start:start + batch_size]].to(target)
                optimizer.zero_grad()
                loss = loss_fn(module, batch, generator)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            history.append(total / len(data))
            bar.set_postfix(loss=f"{history[-1]:.4g}")
    finally:
        bar.close()
        module.to("cpu")
    module.eval()
    return history


class seeded:
    """Context manager for training and scoring the small networks of the anomaly detectors.

    Inside, torch's global RNG is seeded (and restored afterwards, ``torch.random.fork_rng``) and torch runs on one
    thread: these MLPs are too small to gain from threads, on shared machines extra threads slow them down by an
    order of magnitude, and a fixed thread count keeps scores bit-identical from run to run.
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed

    def __enter__(self):
        import torch

        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        if self.seed is None:
            return None
        torch.manual_seed(int(self.seed))
        return torch.Generator().manual_seed(int(self.seed))

    def __exit__(self, *exc):
        import torch

        try:
            return self._fork.__exit__(*exc)
        finally:
            torch.set_num_threads(self._threads)


def check_hidden(who: str, hidden) -> None:
    if not hidden or any(not isinstance(h, (int, np.integer)) or h < 1 for h in hidden):
        raise ValueError(f"{who}: hidden must be a non-empty tuple of positive layer sizes, got {hidden!r}")


def check_training(who: str, epochs, batch_size, lr) -> None:
    check_int(who, "epochs", epochs)
    check_int(who, "batch_size", batch_size)
    if not float(lr) > 0:
        raise ValueError(f"{who}: lr must be positive, got {lr!r}")
