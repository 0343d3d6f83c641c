"""An exact nearest-neighbour index split over shards: one faiss ``IndexFlatL2`` per shard, exact top-k merge.

A bank too large for one index (or one machine) is cut into contiguous row blocks; each block gets its own
exact index (in a deployment: one per worker), a query is searched in every shard for its ``min(k, shard size)``
nearest rows, and the per-shard lists are merged into the global top ``k`` by distance (a stable sort of the
``k x shards`` candidates per query; shard ``s``'s row ``j`` is global row ``offset_s + j``). Exact search in
each shard gives the same distances as one index over the whole bank, so the merged k nearest distances are the
single index's (ties between equal distances may list other rows). Bit for bit: faiss computes distances as BLAS
products over blocks of 1024 bank rows (``faiss.cvar.distance_compute_blas_database_bs``), and a block that
starts elsewhere rounds differently (by ~1e-7 relative, measured at 2048 dimensions), so shard boundaries fall on
multiples of that block: then every distance comes from the same product as in one index and the merged
distances are identical. A bank of fewer than ``1024 x shards`` rows therefore has fewer non-empty shards.
This is what faiss's ``IndexShards`` does in one process; here the merge is explicit so the shards can live
anywhere.

Memory per shard: ``4 D`` bytes per row (float32), ``N / shards`` rows. The object has faiss's ``search(x, k)``,
``ntotal`` and ``d``, so every caller of a flat index takes it unchanged, and it is saved and loaded with the
detector (:mod:`oodscope.persistence`: its shards are ``IndexFlatL2``).
"""

from __future__ import annotations

import numpy as np


class ShardedIndex:
    """Exact L2 search over several flat faiss indexes holding consecutive blocks of one bank."""

    def __init__(self, shards: list, offsets: list[int]):
        self.shards = list(shards)
        self.offsets = [int(o) for o in offsets]

    @property
    def ntotal(self) -> int:
        return sum(int(shard.ntotal) for shard in self.shards)

    @property
    def d(self) -> int:
        return int(self.shards[0].d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(squared distances, global row ids)``, both ``(n, k)``, ascending: faiss's ``search`` contract
        (``inf`` / ``-1`` where the bank has fewer than ``k`` rows)."""
        squared, found = [], []
        for shard, offset in zip(self.shards, self.offsets):
            if shard.ntotal == 0:
                continue
            d, i = shard.search(queries, min(k, int(shard.ntotal)))
            squared.append(d)
            found.append(np.where(i >= 0, i + offset, -1))
        squared, found = np.concatenate(squared, axis=1), np.concatenate(found, axis=1)
        if squared.shape[1] < k:
            pad = k - squared.shape[1]
            squared = np.pad(squared, ((0, 0), (0, pad)), constant_values=np.inf)
            found = np.pad(found, ((0, 0), (0, pad)), constant_values=-1)
        order = np.argsort(squared, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(squared, order, axis=1), np.take_along_axis(found, order, axis=1)


def database_block() -> int:
    """Rows of the bank that faiss's flat search takes per BLAS product (``distance_compute_blas_database_bs``)."""
    import faiss

    return int(getattr(faiss.cvar, "distance_compute_blas_database_bs", 1024))


def shard_bounds(n: int, n_shards: int, align: int = 1) -> list[tuple[int, int]]:
    """``(start, stop)`` of ``n_shards`` consecutive blocks of ``n`` rows, as equal as can be with every
    boundary on a multiple of ``align`` (so with fewer than ``n_shards * align`` rows the last ones are empty)."""
    edges = (np.linspace(0, n, n_shards + 1) / align).round().astype(int) * align
    edges = np.minimum(edges, n)
    edges[-1] = n
    return [(int(a), int(b)) for a, b in zip(edges, edges[1:])]


def sharded_exact_index(bank: np.ndarray, n_shards: int, normalize: bool = False, chunk: int | None = None,
                        who: str = "index") -> ShardedIndex:
    """A :class:`ShardedIndex` of ``n_shards`` exact faiss indexes over consecutive row blocks of ``bank``
    (float32, rows added in chunks, normalised first if asked). faiss is imported here, lazily."""
    import faiss

    from .knn import add_in_chunks

    check_shards(who, n_shards, len(bank))
    bounds = shard_bounds(len(bank), n_shards, database_block())
    shards = [add_in_chunks(faiss.IndexFlatL2(bank.shape[1]), bank[a:b], normalize, chunk) for a, b in bounds]
    return ShardedIndex(shards, [a for a, _ in bounds])


def check_shards(who: str, shards: object, n: int | None = None) -> None:
    """``shards`` must be a positive integer, at most the bank size ``n`` when given."""
    if isinstance(shards, bool) or not (isinstance(shards, (int, np.integer)) and shards >= 1):
        raise ValueError(f"{who}: shards must be a positive integer (1: one index), got {shards!r}")
    if n is not None and shards > n:
        raise ValueError(f"{who}: shards={shards} is more than the training bank's {n} rows; use shards <= {n}")
