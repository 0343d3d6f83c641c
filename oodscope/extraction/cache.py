"""On-disk cache of extracted outputs: content-addressed, atomic, verified on read, resumable.

A cache entry is one uncompressed ``.npz`` per (model, data, preprocessing, layers) key. It stores its own key
and a SHA-256 of every array; on read both are checked, so a file written for another model or
truncated/corrupted on disk is reported and recomputed, never used.

Writes go to a temporary file in the same directory, named ``<entry>.<host>.<pid>.<random>.oodscope-tmp``, and
are moved into place with ``os.replace`` (atomic on POSIX), so an interrupted run leaves either the old entry or
the new one. Files get the umask's normal mode (``0644`` with the usual ``022``), so a cache directory shared
by a group is readable by all of it. Temporary files left by killed writers (their process is gone, or they are
older than :data:`STALE_SECONDS`) are removed when a cache directory is first used by a process.

Long extractions are resumable: every ``checkpoint_every`` batches the outputs so far are written as a chunk
(``<entry>.part<first batch>``, atomically, with the entry's key and checksums); a rerun reuses the finished
chunks, computes only the remaining batches, assembles the entry and removes the chunks.

A cache directory that cannot be written (read-only, full) never loses computed outputs: they are returned,
with one warning per directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .outputs import Head, Outputs

FORMAT_VERSION = 2
_LAYER_PREFIX = "layer::"
TMP_SUFFIX = ".oodscope-tmp"
STALE_SECONDS = 30 * 60  # a temporary file untouched this long belongs to no running writer
STALE_CHUNK_SECONDS = 7 * 24 * 3600  # chunks of an extraction nobody resumed within a week
_PART = re.compile(r"\.part(\d{6})$")
_LEGACY_TMP = re.compile(r"\.npz\.[A-Za-z0-9_]{6,}\.tmp$")  # tempfile.mkstemp names of format 1
_opened: set[str] = set()
_unwritable: set[str] = set()


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


# -- temporary files ------------------------------------------------------------------------------------------
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname() or "host")[:60]


def temp_name(path: Path) -> Path:
    """The temporary file a write of ``path`` goes through (recognisable: host, pid, :data:`TMP_SUFFIX`)."""
    return path.with_name(f"{path.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) is no probe elsewhere: leave the file to the age rule
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell
    return True


def _is_stale(name: str, age: float, max_age: float) -> bool:
    if name.endswith(TMP_SUFFIX):
        parts = name[:-len(TMP_SUFFIX)].rsplit(".", 3)
        if len(parts) == 4 and parts[1] == _host() and parts[2].isdigit() and not _pid_alive(int(parts[2])):
            return True  # its writer on this machine is gone
        return age > max_age
    return bool(_LEGACY_TMP.search(name)) and age > max_age


def clean_stale(directory: str | Path, max_age: float = STALE_SECONDS) -> list[Path]:
    """Remove temporary files of dead or long-gone writers (and week-old orphan chunks); returns what went."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
            if _is_stale(entry.name, age, max_age) or (_PART.search(entry.name) and age > STALE_CHUNK_SECONDS):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
    return removed


def open_dir(directory: str | Path) -> Path:
    """``directory`` as a cache: cleaned of stale temporary files once per process."""
    directory = Path(directory)
    marker = str(directory.resolve())
    if marker not in _opened:
        _opened.add(marker)
        clean_stale(directory)
    return directory


def _warn_unwritable(directory: Path, error: OSError) -> None:
    marker = str(directory)
    if marker not in _unwritable:
        _unwritable.add(marker)
        warnings.warn(f"oodscope cache directory {directory} is not writable ({type(error).__name__}: "
                      f"{getattr(error, 'strerror', None) or error}); outputs are computed but not cached",
                      stacklevel=4)


def write_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bool:
    """Write ``arrays`` (with ``meta`` and checksums) to ``path`` atomically, mode ``0666 & ~umask``.

    Returns ``False`` (after one warning per directory) when the directory cannot be written; an interrupt
    removes the temporary file and propagates.
    """
    meta = dict(meta, format=FORMAT_VERSION, sha256={k: digest_array(v) for k, v in arrays.items()})
    arrays = dict(arrays, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as error:
        _warn_unwritable(path.parent, error)
        return False
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:  # disk full, quota, a directory made read-only meanwhile
        tmp.unlink(missing_ok=True)
        _warn_unwritable(path.parent, error)
        return False
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def read_arrays(path: Path, key: str, kind: str = "entry") -> tuple[dict[str, np.ndarray], dict] | None:
    """``(arrays, meta)`` if ``path`` holds a valid ``kind`` for ``key``; ``None`` (with a warning) otherwise."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key or meta.get("kind", "entry") != kind:
            raise ValueError("it was written for another model, data set or preprocessing")
        if set(meta["sha256"]) != set(arrays):
            raise ValueError("its arrays do not match its manifest")
        for name, values in arrays.items():
            if digest_array(values) != meta["sha256"][name]:
                raise ValueError(f"array {name!r} fails its checksum")
        return arrays, meta
    except Exception as error:  # any unreadable entry is recomputed, never used
        warnings.warn(f"oodscope cache {kind} {path} is unusable ({type(error).__name__}: {error}); recomputing",
                      stacklevel=4)
        return None


# -- entries ----------------------------------------------------------------------------------------------------
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


def save(path: Path, outputs: Outputs, key: str) -> bool:
    """Write ``outputs`` under ``path`` atomically, with its key and checksums; ``False`` if not writable."""
    return write_arrays(path, _to_arrays(outputs), {"key": key, "kind": "entry", "name": outputs.name})


def load(path: Path, key: str) -> Outputs | None:
    """The cached outputs if ``path`` holds a valid entry for ``key``; ``None`` (with a warning) otherwise."""
    found = read_arrays(path, key)
    return None if found is None else _from_arrays(found[0], found[1]["name"])


# -- chunks of an unfinished extraction -----------------------------------------------------------------------
def chunk_path(path: Path, first_batch: int) -> Path:
    return path.with_name(f"{path.name}.part{first_batch:06d}")


def chunk_paths(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.parent.glob(f"{glob_escape(path.name)}.part*") if _PART.search(p.name))
    except OSError:
        return []


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def save_chunk(path: Path, key: str, arrays: dict[str, np.ndarray], first_batch: int, n_batches: int,
               batch_size: int) -> bool:
    """Write the outputs of batches ``first_batch .. first_batch + n_batches - 1`` of the entry ``path``."""
    return write_arrays(chunk_path(path, first_batch), arrays,
                        {"key": key, "kind": "chunk", "first_batch": first_batch, "n_batches": n_batches,
                         "batch_size": batch_size})


def load_chunks(path: Path, key: str, batch_size: int) -> tuple[list[dict[str, np.ndarray]], int]:
    """The finished chunks of ``path`` that follow one another from batch 0, and how many batches they hold.

    Chunks written for another key or batch size, or that fail their checks, are removed, with those after them.
    """
    parts, done = [], 0
    by_first = {int(_PART.search(p.name).group(1)): p for p in chunk_paths(path)}
    for first in sorted(by_first):
        chunk = by_first[first]
        found = read_arrays(chunk, key, kind="chunk") if first == done else None
        if found is None or found[1].get("batch_size") != batch_size or found[1].get("first_batch") != done:
            chunk.unlink(missing_ok=True)
            continue
        parts.append(found[0])
        done += int(found[1]["n_batches"])
    return parts, done


def load_shards(path: Path, key: str, batch_size: int) -> dict[int, tuple[dict[str, np.ndarray], int]]:
    """Every valid chunk of ``path``, by first batch: ``{first: (arrays, n_batches)}``, in any order.

    Unlike :func:`load_chunks` gaps are allowed (the Ray engine finishes shards out of order); chunks written for
    another key or batch size, or that fail their checks, are removed (with a warning) and so recomputed.
    """
    found = {}
    for chunk in chunk_paths(path):
        first = int(_PART.search(chunk.name).group(1))
        got = read_arrays(chunk, key, kind="chunk")
        if got is None or got[1].get("batch_size") != batch_size or got[1].get("first_batch") != first:
            chunk.unlink(missing_ok=True)
            continue
        found[first] = (got[0], int(got[1]["n_batches"]))
    return found


def remove_chunks(path: Path) -> None:
    for chunk in chunk_paths(path):
        try:
            chunk.unlink(missing_ok=True)
        except OSError:
            pass
