"""Extraction on Ray Data: the forward pass of :func:`oodscope.extract` in an actor pool, shard by shard.

``extract(model, data, engine="ray")`` (or ``engine=RayEngine(address=..., workers=..., gpus_per_worker=...)``)
cuts the inputs into shards of ``checkpoint_every`` batches (``batch_size`` rows each, the same batch boundaries
as the local engine), reads them as a Ray dataset (one row per shard: ``ray.data.from_items``), and runs the
model on them with ``Dataset.map_batches`` in a pool of ``workers`` actors (:class:`ShardWorker`; each loads the
model once, on its GPU when ``gpus_per_worker > 0``). The driver streams the results back
(``iter_batches``) and writes every finished shard as a chunk of the cache entry, in the very format of the
local engine's resumable chunks (:func:`oodscope.extraction.cache.save_chunk`, keyed and checksummed), then
assembles the same cache entry as the local engine: every detector reads the result unchanged, and a second
call (either engine) is a cache hit.

Failures: Ray restarts a dead actor and retries its shard (Ray Data's actor pools retry by default), so a
worker killed mid-run does not stop the run; if the whole run stops (driver killed, a shard that always fails),
the shards already written stay, and the next call computes only the missing ones (shards are reused in any
order, so a gap left by an unfinished shard costs only that shard). A shard written for another model, data or
preprocessing fails its key check and is recomputed, like any foreign cache entry.

What moves over the network on a cluster: the model (pickled once into the object store, then to each actor),
the input shards (driver -> object store -> actors) and the outputs (logits, features, hooked layers: actors ->
driver). The cache is written by the driver only, so workers need no shared file system.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import cache

#: object store cap for a Ray instance started here (bytes); a cluster given by ``address`` keeps its own
OBJECT_STORE_BYTES = 512 * 1024**2
_OUT = "out:"   # column prefix of the outputs a worker returns
_IN = "in:"     # column prefix of dict inputs (the model's keyword inputs)


def import_ray() -> Any:
    """``ray`` and ``ray.data``, or a one-line ``ImportError`` naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError("engine='ray' needs Ray Data: pip install 'oodscope[ray]'") from None
    return ray


@dataclass
class RayEngine:
    """Where and how the Ray engine runs.

    Args:
        address: a running Ray cluster (``"ray://head:10001"``, ``"auto"``, ``"host:6379"``); ``None`` starts a
            local Ray instance with ``workers`` CPUs (no dashboard, object store capped at
            :data:`OBJECT_STORE_BYTES`), or uses the one this process already started.
        workers: actors in the pool (model replicas running at once).
        gpus_per_worker: GPUs each actor asks Ray for (``0``: CPU; ``1``: one GPU per replica; fractions share).
        cpus_per_worker: CPUs each actor asks for; torch in the actor uses that many threads.
    """

    address: str | None = None
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0

    def check(self) -> "RayEngine":
        if isinstance(self.workers, bool) or not (isinstance(self.workers, (int, np.integer)) and self.workers >= 1):
            raise ValueError(f"engine='ray': workers must be a positive integer, got {self.workers!r}")
        for key in ("gpus_per_worker", "cpus_per_worker"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"engine='ray': {key} must be a number >= 0, got {value!r}")
        if self.cpus_per_worker == 0 and self.gpus_per_worker == 0:
            raise ValueError("engine='ray': a worker needs cpus_per_worker > 0 or gpus_per_worker > 0")
        return self


def as_engine(engine: Any) -> RayEngine | None:
    """``None`` for the local engine, a checked :class:`RayEngine` for Ray; ``ValueError`` for anything else."""
    if engine in (None, "local"):
        return None
    if engine == "ray":
        return RayEngine().check()
    if isinstance(engine, RayEngine):
        return engine.check()
    raise ValueError(f"engine must be 'local', 'ray' or a RayEngine(...), got {engine!r}")


def connect(engine: RayEngine) -> Any:
    """Ray, initialised: the cluster at ``engine.address``, the instance already running, or a local one."""
    ray = import_ray()
    if not ray.is_initialized():
        if engine.address is None:
            cpus = max(1, int(np.ceil(engine.workers * max(engine.cpus_per_worker, 1.0))))
            # address="local": a new instance, never a cluster that RAY_ADDRESS or a stale `ray start` names
            ray.init(address="local", num_cpus=cpus, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=engine.address, log_to_driver=False, configure_logging=False)
    return ray


# -- shards -------------------------------------------------------------------------------------------------
def plan(n: int, batch_size: int, every: int) -> list[tuple[int, int]]:
    """``(first batch, number of batches)`` of every shard: consecutive groups of ``every`` batches."""
    n_batches = -(-n // batch_size)
    return [(first, min(every, n_batches - first)) for first in range(0, n_batches, every)]


def _rows(inputs: Any, start: int, stop: int) -> Any:
    if isinstance(inputs, dict):
        return {k: np.asarray(_numpy(v[start:stop])) for k, v in inputs.items()}
    return np.asarray(_numpy(inputs[start:stop]))


def _numpy(values: Any) -> np.ndarray:
    import torch

    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def _item(job: int, inputs: Any, first: int, count: int, batch_size: int) -> dict[str, Any]:
    """One row of the Ray dataset: a shard's data set, position and input rows."""
    rows = _rows(inputs, first * batch_size, (first + count) * batch_size)
    item: dict[str, Any] = {"job": job, "first_batch": first, "n_batches": count}
    if isinstance(rows, dict):
        item.update({_IN + k: v for k, v in rows.items()})
    else:
        item["x"] = rows
    return item


def _cell(column: Any) -> np.ndarray:
    """The single value of a one-row batch column (a fixed-shape tensor column or a ragged object one)."""
    return np.asarray(column[0])


class ShardWorker:
    """The Ray actor: holds the model on its device and runs the local engine's forward pass on one shard."""

    def __init__(self, model: Any, preprocess: Callable | None, head: str | None, layers: list[str],
                 layer_reduce: str, device: str, batch_size: int, names: list[str], threads: int):
        import torch

        from .extract import find_head, resolve_device

        torch.set_num_threads(max(1, threads))
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.head = find_head(self.model, head)[1] if head is not None else None
        self.preprocess, self.layers, self.layer_reduce = preprocess, layers, layer_reduce
        self.batch_size, self.names = batch_size, names

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .extract import _run

        inputs: Any = ({k[len(_IN):]: _cell(v) for k, v in batch.items() if k.startswith(_IN)}
                       or _cell(batch["x"]))
        job = int(batch["job"][0])
        arrays = _run(self.model, inputs, None, self.preprocess, self.head, self.layers, self.layer_reduce,
                      self.device, self.batch_size, False, self.names[job])
        out = {k: np.asarray(batch[k][:1]) for k in ("job", "first_batch", "n_batches")}
        out.update({_OUT + k: v[None] for k, v in arrays.items()})
        return out


def run_many(engine: RayEngine, model: Any, jobs: list[Any]) -> list[dict[str, np.ndarray]]:
    """The arrays of the local engine's ``_run`` (logits, features, layers, labels) for each job
    (:class:`oodscope.extraction.extract._Job`: one data set; all share the model and the extraction options),
    computed in one Ray Data execution.

    A job with a cache entry (``path``, ``key``) reuses the finished shards found there and writes every new shard
    as soon as it arrives; without one its shards are only kept in memory.
    """
    from .extract import _concatenate, _length

    first_job = jobs[0]
    if first_job.device.startswith("cuda") and not engine.gpus_per_worker:
        raise ValueError(f"extract({first_job.name!r}): device {first_job.device!r} on Ray needs gpus_per_worker > "
                         "0 (Ray gives a worker a GPU only when asked); or use device='auto'")
    shards = [plan(_length(job.inputs), job.batch_size, job.every) for job in jobs]
    done = [_finished(job, planned) for job, planned in zip(jobs, shards)]
    pending = [(number, first, count) for number, planned in enumerate(shards) for first, count in planned
               if first not in done[number]]
    paths = [job.path for job in jobs]
    if pending:
        ray = connect(engine)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False   # one tqdm bar over shards below, off a terminal as elsewhere
        context.verbose_stats_logs = False
        items = [_item(number, jobs[number].inputs, first, count, jobs[number].batch_size)
                 for number, first, count in pending]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        results = dataset.map_batches(
            ShardWorker, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(engine.workers, len(items))),
            num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker or None,
            fn_constructor_kwargs=dict(model=model, preprocess=first_job.preprocess, head=first_job.head_name,
                                       layers=first_job.layers, layer_reduce=first_job.layer_reduce,
                                       device=first_job.device, batch_size=first_job.batch_size,
                                       names=[job.name for job in jobs],
                                       threads=int(max(1, engine.cpus_per_worker))))
        total = sum(len(planned) for planned in shards)
        bar = _bar(first_job.progress, total, total - len(pending), ", ".join(job.name for job in jobs))
        try:
            for batch in results.iter_batches(batch_size=1, batch_format="numpy"):
                number, first, count = (int(batch[k][0]) for k in ("job", "first_batch", "n_batches"))
                job = jobs[number]
                arrays = {k[len(_OUT):]: _cell(v) for k, v in batch.items() if k.startswith(_OUT)}
                if job.labels is not None:
                    rows = slice(first * job.batch_size, (first + count) * job.batch_size)
                    arrays["labels"] = np.asarray(job.labels[rows], dtype=np.int64)
                if paths[number] is not None and not cache.save_chunk(paths[number], job.key, arrays, first, count,
                                                                      job.batch_size):
                    paths[number] = None  # not writable (warned once): keep going in memory
                done[number][first] = arrays
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    out = []
    for job, planned, found in zip(jobs, shards, done):
        missing = [first for first, _ in planned if first not in found]
        if missing:
            raise RuntimeError(f"extract({job.name!r}) on Ray: shards starting at batches {missing} came back empty")
        out.append(_concatenate([found[first] for first, _ in planned]))
    return out


def _finished(job: Any, planned: list[tuple[int, int]]) -> dict[int, dict[str, np.ndarray]]:
    """The job's shards already in the cache (those of another shard size are recomputed)."""
    if job.path is None:
        return {}
    planned = set(planned)
    return {first: arrays for first, (arrays, count) in cache.load_shards(job.path, job.key, job.batch_size).items()
            if (first, count) in planned}


def _bar(show: bool, total: int, initial: int, name: str) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"extract {name} (ray)", unit="shard", leave=False)
