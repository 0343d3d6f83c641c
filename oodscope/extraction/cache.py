"""On-disk cache of extracted outputs: content-addressed, atomic, verified on read.

A cache entry is one uncompressed ``.npz`` per (model weights, data, preprocessing, layers) key. It stores its
own key and a SHA-256 of every array; on read both are checked, so a file written for another model or
truncated/corrupted on disk is reported and recomputed, never used. Writes go to a temporary file in the same
directory and are moved into place with ``os.replace`` (atomic on POSIX), so an interrupted run leaves either
the old entry or the new one, and entries already finished survive.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .outputs import Head, Outputs

FORMAT_VERSION = 1
_LAYER_PREFIX = "layer::"


def default_cache_dir() -> Path:
    """``$OODSCOPE_CACHE``, else ``$XDG_CACHE_HOME/oodscope``, else ``~/.cache/oodscope``."""
    if os.environ.get("OODSCOPE_CACHE"):
        return Path(os.environ["OODSCOPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "oodscope"


def digest_array(values: np.ndarray) -> str:
    values = np.ascontiguousarray(values)
    h = hashlib.sha256(f"{values.dtype.str}{values.shape}".encode())
    h.update(memoryview(values).cast("B"))
    return h.hexdigest()


def _to_arrays(outputs: Outputs) -> dict[str, np.ndarray]:
    arrays = {k: v for k, v in (("logits", outputs.logits), ("features", outputs.features),
                                ("labels", outputs.labels)) if v is not None}
    arrays.update({_LAYER_PREFIX + k: v for k, v in outputs.layers.items()})
    if outputs.head is not None:
        arrays["head_W"], arrays["head_b"] = outputs.head.W, outputs.head.b
    return arrays


def _from_arrays(arrays: dict[str, np.ndarray], name: str) -> Outputs:
    head = Head(arrays["head_W"], arrays["head_b"]) if "head_W" in arrays else None
    layers = {k[len(_LAYER_PREFIX):]: v for k, v in arrays.items() if k.startswith(_LAYER_PREFIX)}
    return Outputs(logits=arrays.get("logits"), features=arrays.get("features"), labels=arrays.get("labels"),
                   layers=layers, head=head, name=name)


def save(path: Path, outputs: Outputs, key: str) -> None:
    """Write ``outputs`` under ``path`` atomically, with its key and checksums."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = _to_arrays(outputs)
    meta = {"format": FORMAT_VERSION, "key": key, "name": outputs.name,
            "sha256": {k: digest_array(v) for k, v in arrays.items()}}
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, key: str) -> Outputs | None:
    """The cached outputs if ``path`` holds a valid entry for ``key``; ``None`` (with a warning) otherwise."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
            raise ValueError("it was written for another model, data set or preprocessing")
        if set(meta["sha256"]) != set(arrays):
            raise ValueError("its arrays do not match its manifest")
        for name, values in arrays.items():
            if digest_array(values) != meta["sha256"][name]:
                raise ValueError(f"array {name!r} fails its checksum")
        return _from_arrays(arrays, meta["name"])
    except Exception as error:  # any unreadable entry is recomputed, never used
        warnings.warn(f"oodscope cache entry {path} is unusable ({type(error).__name__}: {error}); recomputing",
                      stacklevel=3)
        return None
