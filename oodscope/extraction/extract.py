"""Run a torch classifier once over a dataset and keep everything detectors need.

``extract(model, data)`` returns :class:`~oodscope.extraction.outputs.Outputs` with logits, penultimate
features (the input of the classifier head, caught by a forward hook), labels, requested intermediate layers
(forward hooks on named modules) and the head's ``W, b``. Results are cached on disk (see
:mod:`oodscope.extraction.cache`), keyed by everything that can change them (:mod:`oodscope.extraction.keys`:
the model's and the preprocessing's weights, buffers, classes and plain attributes; the data; the layers), so a
second call with the same key does not run the model, and an interrupted one resumes from its last chunk.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import warnings
from pathlib import Path
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
import torch
from torch import nn

from . import cache
from .keys import Uncacheable, module_key, value_key
from .outputs import Head, ModelSource, Outputs

LayerReduce = Literal["mean", "none"]


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; afterwards every submodule is back in its own mode (a frozen
    batch norm inside a model in training mode stays frozen, a model in eval mode stays in eval mode)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():  # parents first: a parent's train() resets its children
            if module.training != training:
                module.train(training)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then CPU; a device this machine lacks is a ``ValueError``."""
    if str(device) != "auto":
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device {device!r}: {error}") from None
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine has no CUDA device (use 'cpu' or 'auto')")
        if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
        if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                           and torch.backends.mps.is_available()):
            raise ValueError(f"device {device!r}: MPS is not available here (use 'cpu' or 'auto')")
        return resolved
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def find_head(model: nn.Module, head: str | Head | None) -> tuple[str | None, nn.Linear | None]:
    """The classifier head: ``"auto"`` = the last ``nn.Linear`` registered in the model."""
    if head is None or isinstance(head, Head):
        return None, None
    modules = dict(model.named_modules())
    if head == "auto":
        linear = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
        if not linear:
            return None, None
        head = linear[-1]
    if head not in modules:
        raise ValueError(f"model has no module named {head!r}; its modules include {_some_names(modules)}")
    if not isinstance(modules[head], nn.Linear):
        raise ValueError(f"head {head!r} is a {type(modules[head]).__name__}, not nn.Linear")
    return head, modules[head]


def _some_names(modules: dict[str, nn.Module], limit: int = 12) -> str:
    names = [n for n in modules if n]
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


# -- cache keys --------------------------------------------------------------------------------------------
def model_digest(model: nn.Module) -> str:
    """sha256 of the model's class and ``state_dict`` tensors (its weights; the cache key uses
    :func:`oodscope.extraction.keys.module_key`, which also covers buffers, submodule classes and attributes)."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in model.state_dict().items():
        values = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}{values.dtype}{tuple(tensor.shape)}".encode())
        h.update(values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")
    return h.hexdigest()


def preprocess_key(preprocess: Callable | None) -> str:
    """A digest of everything in the preprocessing that can change its output.

    ``None`` is the identity; a module is keyed like the model (weights, buffers, class, attributes: its
    ``repr`` is not enough, ``Scale(3.0)`` and ``Scale(1.0)`` may print alike), plus its ``cache_key`` if it has
    one; another callable by its ``cache_key`` if it has one, else by its class and attributes, or, for a named
    function, its code and the module constants it reads. Raises :class:`~oodscope.extraction.keys.Uncacheable`
    (for a lambda or local function, say) when that cannot be done.
    """
    if preprocess is None:
        return "identity"
    key = getattr(preprocess, "cache_key", None)
    if isinstance(preprocess, nn.Module):
        return f"module {module_key(preprocess, 'the preprocessing')} {key}"
    if key is not None and not callable(key):
        return f"key {key}"
    return f"value {value_key(preprocess, 'the preprocessing')}"


def data_digest(inputs: Any, labels: np.ndarray | None) -> str:
    h = hashlib.sha256()
    if isinstance(inputs, dict):
        for key in sorted(inputs):
            h.update(f"{key}:{cache.digest_array(_numpy(inputs[key]))}".encode())
    elif isinstance(inputs, (np.ndarray, torch.Tensor)):
        h.update(cache.digest_array(_numpy(inputs)).encode())
    else:
        for batch_inputs, batch_labels in _iterate(inputs, None, 512):
            h.update(cache.digest_array(_numpy(batch_inputs)).encode())
            if batch_labels is not None:
                h.update(cache.digest_array(_numpy(batch_labels)).encode())
    if labels is not None:
        h.update(cache.digest_array(np.asarray(labels)).encode())
    return h.hexdigest()


def _numpy(values: Any) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


# -- batching ----------------------------------------------------------------------------------------------
def _iterate(inputs: Any, labels: np.ndarray | None, batch_size: int, start_batch: int = 0
             ) -> Iterator[tuple[Any, Any]]:
    """Batches of (inputs, labels) from an array/tensor or a dict of them (keyword inputs of the model), from
    batch ``start_batch`` on. Other data is materialised first (:func:`materialise`)."""
    if not isinstance(inputs, (np.ndarray, torch.Tensor, dict)):
        inputs, found = materialise(inputs)
        labels = found if labels is None else labels
    n = _length(inputs)
    for start in range(start_batch * batch_size, n, batch_size):
        rows = slice(start, start + batch_size)
        batch = {k: v[rows] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[rows]
        yield batch, None if labels is None else labels[rows]


def _length(inputs: Any) -> int:
    return len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)


LABEL_KEYS = ("labels", "label")


def _unpack(batch: Any) -> tuple[Any, Any]:
    """``(inputs, labels)`` of one batch: a tensor; a dict (labels under ``labels``/``label``, the rest are the
    model's keyword inputs); or a tuple/list ``(x, y, ...)`` (extra elements such as indices are ignored)."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return inputs, labels
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("extract: an empty batch tuple")
        inputs = batch[0]
        labels = batch[1] if len(batch) > 1 else None
        if isinstance(inputs, Mapping):
            inputs, inner = _unpack(inputs)
            labels = inner if labels is None else labels
        return inputs, labels
    return batch, None


def _stack(parts: list[Any]) -> Any:
    if isinstance(parts[0], dict):
        keys = list(parts[0])
        if any(list(p) != keys for p in parts):
            raise ValueError("extract: dict batches must all have the same keys")
        return {k: np.concatenate([_numpy(p[k]) for p in parts]) for k in keys}
    return np.concatenate([_numpy(p) for p in parts])


def materialise(data: Any) -> tuple[Any, np.ndarray | None]:
    """Read a ``DataLoader``, a ``Dataset`` (map-style or iterable) or any iterable of batches **once** into
    arrays: ``(inputs, labels)``, inputs an array or a dict of arrays (dict batches). Then hashing the data for the
    cache and running the model read those arrays, so a ``Dataset``'s items are read once per call, also on a
    cache hit. (Data larger than memory: pass a memory-mapped array instead.)"""
    if isinstance(data, torch.utils.data.DataLoader):
        if isinstance(getattr(data, "sampler", None), torch.utils.data.RandomSampler):
            warnings.warn("extract: the DataLoader shuffles, so the outputs follow this pass's random order "
                          "(and the cache key changes every call); pass shuffle=False", stacklevel=3)
        batches = iter(data)
    elif isinstance(data, torch.utils.data.Dataset):
        batches = iter(torch.utils.data.DataLoader(data, batch_size=256, shuffle=False))
    elif hasattr(data, "__iter__") and not isinstance(data, (str, bytes)):
        batches = iter(data)
    else:
        raise ValueError(f"extract: cannot read inputs of type {type(data).__name__}; pass an array, a tensor, a "
                         "dict of arrays, (inputs, labels), a Dataset or a DataLoader")
    inputs, labels = [], []
    for batch in batches:
        x, y = _unpack(batch)
        inputs.append(x)
        labels.append(y)
    if not inputs:
        raise ValueError("cannot extract from an empty dataset")
    if any(y is None for y in labels) and not all(y is None for y in labels):
        raise ValueError("extract: some batches carry labels and some do not")
    found = None if labels[0] is None else np.concatenate([_numpy(y).reshape(-1) for y in labels])
    return _stack(inputs), found


def _split_data(data: Any, labels: Any) -> tuple[Any, np.ndarray | None]:
    if isinstance(data, tuple) and len(data) == 2:
        if labels is not None:
            raise ValueError("give labels either inside data=(inputs, labels) or as labels=, not both")
        data, labels = data
    if not isinstance(data, (np.ndarray, torch.Tensor, dict)):
        data, found = materialise(data)
        if found is not None and labels is None:
            labels = found
    if isinstance(data, dict):
        lengths = {k: len(v) for k, v in data.items()}
        if not lengths or len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise ValueError(f"dict inputs need one or more non-empty arrays of the same length, got {lengths}")
        data = {k: v if isinstance(v, (np.ndarray, torch.Tensor)) else np.asarray(v) for k, v in data.items()}
        if labels is not None and len(labels) != _length(data):
            raise ValueError(f"{_length(data)} inputs but {len(labels)} labels")
    if labels is not None:
        labels = _numpy(labels).astype(np.int64)
    if isinstance(data, (np.ndarray, torch.Tensor)):
        if len(data) == 0:
            raise ValueError("cannot extract from an empty dataset")
        if data.ndim < 2:
            raise ValueError(f"inputs have shape {tuple(data.shape)}: expected a batch (samples, ...), e.g. images "
                             "(N, H, W, C) or (N, C, H, W), tokens (N, L) or rows (N, D)")
        if labels is not None and len(labels) != len(data):
            raise ValueError(f"{len(data)} inputs but {len(labels)} labels")
    return data, labels


# -- the forward pass --------------------------------------------------------------------------------------
def _reduce(activation: torch.Tensor, how: LayerReduce) -> torch.Tensor:
    if activation.ndim > 2 and how == "mean":
        return activation.flatten(2).mean(dim=2)
    return activation


class Probe:
    """Forward hooks that catch penultimate features (the head's input) and named layer outputs.

    Use as a context manager; calling it runs the model and returns ``{"logits", "features", <layers>}``.
    Works with or without autograd, so detectors that perturb inputs reuse it (see :mod:`.rerun`).
    """

    def __init__(self, model: nn.Module, head: nn.Module | None = None, layers: Iterable[str] = (),
                 layer_reduce: LayerReduce = "mean"):
        modules = dict(model.named_modules())
        self.layers = list(layers)
        missing = [layer for layer in self.layers if layer not in modules]
        if missing:
            raise ValueError(f"model has no layers {missing}; its modules include {_some_names(modules)}")
        self.model, self.head, self.reduce = model, head, layer_reduce
        self._modules = modules
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> "Probe":
        captured = self._captured
        for layer in self.layers:
            self._hooks.append(self._modules[layer].register_forward_hook(
                lambda _m, _i, out, key=layer: captured.__setitem__(key, _reduce(_first(out), self.reduce))))
        if self.head is not None:
            self._hooks.append(self.head.register_forward_hook(
                lambda _m, inp, _o: captured.__setitem__("features", inp[0].flatten(1))))
        return self

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def __call__(self, x: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._captured.clear()
        output = self.model(**x) if isinstance(x, dict) else self.model(x)
        parts = {"logits": _first(output), **self._captured}
        if "features" not in parts:  # a model without a hookable head may return (logits, features)
            features = _returned_features(output)
            if features is not None:
                parts["features"] = features.flatten(1)
        return parts


class _Resume:
    """Chunks of one cache entry: finished batches are written every ``every`` batches and reused on a rerun."""

    def __init__(self, path: Path, key: str, every: int, batch_size: int):
        self.path, self.key, self.every, self.batch_size = path, key, every, batch_size

    def load(self) -> tuple[list[dict[str, np.ndarray]], int]:
        return cache.load_chunks(self.path, self.key, self.batch_size)

    def save(self, arrays: dict[str, np.ndarray], first_batch: int, n_batches: int) -> bool:
        return cache.save_chunk(self.path, self.key, arrays, first_batch, n_batches, self.batch_size)


def _concatenate(parts: list[dict[str, list[np.ndarray]]] | list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = list(dict.fromkeys(k for part in parts for k in part))
    return {k: np.concatenate([part[k] if isinstance(part[k], np.ndarray) else np.concatenate(part[k])
                               for part in parts if k in part]) for k in keys}


def _run(model: nn.Module, inputs: Any, labels: np.ndarray | None, preprocess: Callable | None,
         head_module: nn.Module | None, layers: list[str], layer_reduce: LayerReduce, device: torch.device,
         batch_size: int, progress: bool, name: str, resume: _Resume | None = None) -> dict[str, np.ndarray]:
    done, start_batch = resume.load() if resume is not None else ([], 0)
    pending: dict[str, list[np.ndarray]] = {}
    pending_batches = 0
    if isinstance(preprocess, nn.Module):
        preprocess.to(device)
    with evaluation_mode(model), Probe(model, head_module, layers, layer_reduce) as probe, torch.inference_mode():
        batches = _iterate(inputs, labels, batch_size, start_batch)
        for number, (batch_inputs, batch_labels) in enumerate(
                _progress(batches, inputs, batch_size, progress, name, start_batch), start=start_batch):
            x = _to_device(batch_inputs, device)
            try:
                parts = probe(preprocess(x) if preprocess is not None else x)
            except RuntimeError as error:  # shape or channel mismatch inside torch: name the input and the fix
                raise ValueError(f"dataset {name!r}: the model cannot run on a batch of shape "
                                 f"{_shape(x)} ({str(error).splitlines()[0]}); check the number of "
                                 "channels, the image size and the layout the preprocessing expects") from error
            if len(_first_value(parts)) != _length(x):
                raise ValueError(f"dataset {name!r}: a batch of {_length(x)} inputs gave "
                                 f"{len(_first_value(parts))} outputs; the first axis of the inputs must be "
                                 f"the samples (got inputs of shape {_shape(x)})")
            for key, value in parts.items():
                pending.setdefault(key, []).append(value.detach().float().cpu().numpy())
            if batch_labels is not None:
                pending.setdefault("labels", []).append(np.asarray(batch_labels, dtype=np.int64))
            pending_batches += 1
            if resume is not None and pending_batches == resume.every:
                chunk = _concatenate([pending])
                if not resume.save(chunk, number + 1 - pending_batches, pending_batches):
                    resume = None  # not writable (warned once): go on without chunks
                done.append(chunk)
                pending, pending_batches = {}, 0
    if pending:
        done.append(_concatenate([pending]))
    if not done:
        raise ValueError(f"dataset {name!r} is empty")
    return _concatenate(done)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _as_tensor(v).to(device) for k, v in batch.items()}
    return _as_tensor(batch).to(device)


def _as_tensor(batch: Any) -> torch.Tensor:
    """A tensor view of a batch; a read-only array (pandas' copy-on-write ``to_numpy()``, a memory map) is copied
    first, since torch cannot share memory it may not write."""
    if isinstance(batch, np.ndarray) and not batch.flags.writeable:
        batch = batch.copy()
    return torch.as_tensor(batch)


def _shape(x: Any) -> Any:
    return {k: tuple(v.shape) for k, v in x.items()} if isinstance(x, dict) else tuple(x.shape)


def _first_value(parts: dict) -> torch.Tensor:
    return parts["logits"] if "logits" in parts else next(iter(parts.values()))


def _returned_features(output: Any) -> torch.Tensor | None:
    """Penultimate features a model returns itself: ``(logits, features, ...)`` or a dict with ``features``."""
    if isinstance(output, dict) and isinstance(output.get("features"), torch.Tensor):
        return output["features"]
    if isinstance(output, (tuple, list)) and len(output) >= 2 and isinstance(output[1], torch.Tensor) \
            and output[1].ndim >= 2:
        return output[1]
    return None


def script_head(model: nn.Module) -> Head | None:
    """The classifier of a TorchScript model: its last ``Linear`` submodule's weights (hooks cannot run on
    TorchScript, so its features come from a ``(logits, features)`` output)."""
    linear = [m for _, m in model.named_modules() if getattr(m, "original_name", None) == "Linear"]
    if not isinstance(model, torch.jit.ScriptModule) or not linear:
        return None
    weight = linear[-1].weight.detach().cpu().double().numpy()
    bias = getattr(linear[-1], "bias", None)
    return Head(weight, np.zeros(len(weight)) if bias is None else bias.detach().cpu().double().numpy())


def _first(output: Any) -> torch.Tensor:
    """The tensor of a module output (first element of tuples, ``logits``/first value of dicts)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output["logits"] if "logits" in output else next(iter(output.values()))
    if isinstance(output, (tuple, list)):
        return _first(output[0])
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(f"cannot find a tensor in a model output of type {type(output).__name__}")


def _progress(batches: Iterable, inputs: Any, batch_size: int, show: bool, name: str, start: int = 0) -> Iterable:
    if not show:
        return batches
    from tqdm.auto import tqdm

    total = -(-_length(inputs) // batch_size)
    return tqdm(batches, total=total, initial=start, desc=f"extract {name}", unit="batch", leave=False)


def extract(model: nn.Module, data: Any, labels: Any = None, *, name: str = "data",
            preprocess: Callable | None = None, layers: Iterable[str] = (), layer_reduce: LayerReduce = "mean",
            head: str | Head | None = "auto", batch_size: int = 256, device: str | torch.device = "auto",
            cache_dir: str | Path | None = None, use_cache: bool = True, progress: bool = True,
            checkpoint_every: int = 16, engine: Any = "local") -> Outputs:
    """Run ``model`` once over ``data`` and return its :class:`Outputs` (cached on disk).

    Args:
        model: a torch classifier; its output (or the first tensor in it) is taken as the logits.
        data: an array/tensor of raw inputs; a dict of arrays (the model's keyword inputs, e.g. ``input_ids`` and
            ``attention_mask``); a tuple ``(inputs, labels)``; or a ``Dataset`` / ``DataLoader`` / iterable whose
            items or batches are tensors, ``(x, y, ...)`` tuples or dicts (labels under ``labels``/``label``),
            read once per call (:func:`materialise`). Models returning an object with ``.logits`` (Hugging Face)
            work as they are.
        labels: class labels (``-1`` for OOD) when not inside ``data``.
        name: the dataset's name, used in messages, progress bars and cache file names.
        preprocess: callable applied to each raw batch tensor on the device (e.g. scaling and normalisation).
            Modules, objects and named functions are keyed by their contents (see
            :func:`preprocess_key`); a lambda or local function needs a ``cache_key`` attribute, otherwise the
            outputs are not cached (with a warning).
        layers: names of modules (``dict(model.named_modules())``) whose outputs to keep.
        layer_reduce: ``"mean"`` averages spatial dimensions of layer outputs (N x C); ``"none"`` keeps them.
        head: the classifier head: ``"auto"`` (last ``nn.Linear``), a module name, a :class:`Head`, or ``None``.
            Penultimate features are the head's input.
        device: ``"auto"`` (CUDA, MPS, else CPU), or any torch device.
        cache_dir: where to cache; default :func:`oodscope.extraction.cache.default_cache_dir`.
        use_cache: read and write the cache.
        checkpoint_every: with the cache on, write the outputs so far every this many batches, so that an
            interrupted extraction resumes there (``0``: never). With ``engine="ray"`` the shard size.
        engine: ``"local"`` (this process) or ``"ray"`` / a :class:`~oodscope.extraction.ray_engine.RayEngine`
            (the forward pass in a Ray Data actor pool, shard by shard, needs ``oodscope[ray]``): the same outputs
            and the same cache entry. With Ray, ``device`` is resolved on each worker (``"auto"``: its GPU if
            Ray gave it one).
    """
    steps = _extract_steps(model, data, labels, name=name, preprocess=preprocess, layers=layers,
                           layer_reduce=layer_reduce, head=head, batch_size=batch_size, device=device,
                           cache_dir=cache_dir, use_cache=use_cache, progress=progress,
                           checkpoint_every=checkpoint_every, engine=engine)
    return _drive(model, [steps])[0]


def extract_many(model: nn.Module, datasets: Mapping[str, Any], **options: Any) -> dict[str, Outputs]:
    """:func:`extract` of each ``{name: data}`` with the same ``options``, as ``{name: Outputs}``.

    With ``engine="ray"`` every data set that is not cached goes through **one** Ray Data execution (one actor
    pool, the model loaded once per worker), so the pool's start-up is paid once per benchmark, not per split.
    The local engine extracts them one after the other, exactly as separate :func:`extract` calls.
    """
    from .ray_engine import as_engine

    if as_engine(options.get("engine", "local")) is None:
        return {name: extract(model, data, name=name, **options) for name, data in datasets.items()}
    steps = [_extract_steps(model, data, None, name=name, **options) for name, data in datasets.items()]
    return dict(zip(datasets, _drive(model, steps)))


@dataclass
class _Job:
    """One data set's forward pass, as :func:`_extract_steps` hands it to :func:`_drive`."""

    inputs: Any
    labels: np.ndarray | None
    name: str
    preprocess: Callable | None
    head_name: str | None
    head_module: nn.Module | None
    layers: list[str]
    layer_reduce: LayerReduce
    device: str
    torch_device: torch.device
    batch_size: int
    progress: bool
    path: Path | None
    key: str | None
    every: int
    resume: _Resume | None
    engine: Any


def _drive(model: nn.Module, steps: list) -> list[Outputs]:
    """Run the :func:`_extract_steps` generators: each either returns its cached outputs at once or yields a
    :class:`_Job`; the jobs run (locally one by one, on Ray all together) and their arrays are sent back."""
    results: list[Outputs | None] = [None] * len(steps)
    jobs: dict[int, _Job] = {}
    for number, step in enumerate(steps):
        try:
            jobs[number] = next(step)
        except StopIteration as stop:
            results[number] = stop.value
    if not jobs:
        return results
    engine = next(iter(jobs.values())).engine
    if engine is None:
        arrays = [_run_local(model, job) for job in jobs.values()]
    else:
        from . import ray_engine as engines

        arrays = engines.run_many(engine, model, list(jobs.values()))
    for number, found in zip(jobs, arrays):
        try:
            steps[number].send(found)
        except StopIteration as stop:
            results[number] = stop.value
    return results


def _run_local(model: nn.Module, job: _Job) -> dict[str, np.ndarray]:
    home = next((p.device for p in itertools.chain(model.parameters(), model.buffers())), None)
    model.to(job.torch_device)
    try:
        return _run(model, job.inputs, job.labels, job.preprocess, job.head_module, job.layers, job.layer_reduce,
                    job.torch_device, job.batch_size, job.progress, job.name, job.resume)
    finally:
        if home is not None:
            model.to(home)  # the caller's model stays where it was


def _extract_steps(model: nn.Module, data: Any, labels: Any = None, *, name: str = "data",
                   preprocess: Callable | None = None, layers: Iterable[str] = (),
                   layer_reduce: LayerReduce = "mean", head: str | Head | None = "auto", batch_size: int = 256,
                   device: str | torch.device = "auto", cache_dir: str | Path | None = None, use_cache: bool = True,
                   progress: bool = True, checkpoint_every: int = 16, engine: Any = "local"):
    """:func:`extract` as a generator: returns the cached outputs, or yields one :class:`_Job`, is sent its
    arrays and returns the outputs (so :func:`extract_many` can run several jobs at once)."""
    inputs, labels = _split_data(data, labels)
    layers = list(dict.fromkeys(layers))
    if layer_reduce not in ("mean", "none"):
        raise ValueError(f"layer_reduce must be 'mean' or 'none', got {layer_reduce!r}")
    if (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, np.integer))
            or checkpoint_every < 0):
        raise ValueError(f"checkpoint_every must be a number of batches >= 0 (0: no chunks), "
                         f"got {checkpoint_every!r}")
    from .ray_engine import as_engine

    ray_engine = as_engine(engine)
    scripted_head = script_head(model) if head == "auto" else None
    head_name, head_module = (None, None) if isinstance(model, torch.jit.ScriptModule) else find_head(model, head)
    torch_device = resolve_device(device) if ray_engine is None else _driver_device(device)
    source = ModelSource(model=model, inputs=inputs, preprocess=preprocess, device=str(torch_device),
                         batch_size=batch_size, head=head_name)

    path = key = resume = None
    if use_cache:
        try:
            model_key, pre_key = module_key(model, "the model"), preprocess_key(preprocess)
        except Uncacheable as error:
            warnings.warn(f"extract({name!r}): outputs are not cached: {error} (give it a cache_key, or name "
                          "attributes that never change the outputs in a cache_ignore tuple)", stacklevel=2)
        else:
            key = hashlib.sha256(repr((cache.FORMAT_VERSION, model_key, data_digest(inputs, labels), pre_key,
                                       layers, layer_reduce, head_name, head if isinstance(head, str) else None)
                                      ).encode()).hexdigest()
            safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
            path = cache.open_dir(cache_dir or cache.default_cache_dir()) / f"{safe_name}-{key[:20]}.npz"
            cached = cache.load(path, key)
            if cached is not None:
                cached.source = source
                return _with_head(cached, head)
            if checkpoint_every:
                resume = _Resume(path, key, int(checkpoint_every), batch_size)

    arrays = yield _Job(inputs, labels, name, preprocess, head_name, head_module, layers, layer_reduce, str(device),
                        torch_device, batch_size, progress, path if checkpoint_every else None, key,
                        int(checkpoint_every) or 16, resume, ray_engine)
    outputs = Outputs(
        logits=arrays["logits"], features=arrays.get("features"), labels=arrays.get("labels"),
        layers={layer: arrays[layer] for layer in layers}, name=name,
        head=scripted_head if head_module is None else Head(head_module.weight.detach().cpu().double().numpy(),
                                                            _bias(head_module)),
    )
    outputs = _check_head(outputs, head_name, name)
    if path is not None and cache.save(path, outputs, key):
        cache.remove_chunks(path)
    outputs.source = source
    return _with_head(outputs, head)


def _driver_device(device: str | torch.device) -> torch.device:
    """With the Ray engine the workers resolve ``device``; the driver keeps it for re-runs where it exists here
    (a GPU cluster driven from a CPU machine: the driver's re-runs use the CPU)."""
    try:
        return resolve_device(device)
    except ValueError:
        return torch.device("cpu")


def _check_head(outputs: Outputs, head_name: str | None, name: str) -> Outputs:
    """Keep the head only if it produces the logits (``features @ W.T + b``, checked on the first rows); a model
    whose last ``nn.Linear`` is not its classifier (a cosine head, a group softmax, a learned temperature) keeps its
    features (that layer's input) but no head, so head-based detectors refuse it instead of scoring silently."""
    if outputs.head is None or outputs.features is None or outputs.logits is None or not len(outputs.logits):
        return outputs
    rows = slice(0, 256)
    features, logits = outputs.features[rows], np.asarray(outputs.logits[rows], dtype=np.float64)
    if features.ndim == 2 and logits.ndim == 2 and features.shape[1] == outputs.head.W.shape[1] \
            and logits.shape[1] == outputs.head.W.shape[0]:
        recomputed = features.astype(np.float64) @ outputs.head.W.T + outputs.head.b
        if np.allclose(recomputed, logits, rtol=1e-3, atol=1e-3 * (1.0 + np.abs(logits).max())):
            return outputs
    warnings.warn(f"extract({name!r}): the last nn.Linear {head_name!r} does not produce the model's logits, so the "
                  "outputs carry its input as features but no head (detectors that need the head refuse them); "
                  "pass head=NAME for the classifier layer if there is one", stacklevel=3)
    outputs.head = None
    return outputs


def _bias(linear: nn.Linear) -> np.ndarray:
    if linear.bias is None:
        return np.zeros(linear.out_features)
    return linear.bias.detach().cpu().double().numpy()


def _with_head(outputs: Outputs, head: Any) -> Outputs:
    if isinstance(head, Head):
        outputs.head = head
    return outputs
