"""Reading the files users hand to oodscope (benchmark ``.npz`` files, ``--weights``, checkpoints), pickle-free,
and writing result files atomically.

Every reader here refuses pickled Python objects (``np.load(..., allow_pickle=False)``,
``torch.load(..., weights_only=True)``): a planted file cannot run code. A file that is truncated, corrupt or
not of the expected kind gives a ``ValueError`` that names the file (and the array) and says what is wrong,
instead of a library traceback, and never advises loading it unsafely. :func:`write_atomic` writes a file so
that a reader (or a killed writer) only ever sees the old content or the new one, never a truncated file.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np


def load_npz(path: str | Path, keys: Iterable[str] | None = None, what: str = "data file") -> dict[str, np.ndarray]:
    """The arrays ``keys`` (default: all) of the ``.npz`` file at ``path``, read without pickle.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for a truncated or
    corrupt archive, a file that is not a ``.npz`` archive, missing arrays, or an object (pickled) array.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{what} {path} is truncated or corrupt (not a readable .npz archive: {error}); "
                         "download or write it again") from None
    except ValueError as error:
        if "pickle" not in str(error):
            raise ValueError(f"{what} {path} is corrupt ({error})") from None
        raise ValueError(f"{what} {path} is not a .npz archive (it is truncated or corrupt, or a pickle, which "
                         "oodscope never loads); write it with numpy.savez") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{what} {path} holds a single .npy array, not a .npz archive of named arrays "
                         "(write it with numpy.savez(path, images=..., labels=...))")
    with archive:
        names = list(archive.files) if keys is None else list(keys)
        missing = [k for k in names if k not in archive.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)} (has {archive.files})")
        arrays = {}
        for key in names:
            try:
                arrays[key] = archive[key]
            except ValueError as error:
                if "Object arrays" in str(error) or "pickle" in str(error):
                    raise ValueError(f"{path}: array {key!r} is an object array (pickled Python objects), which "
                                     "oodscope never loads; store plain numeric arrays") from None
                raise ValueError(f"{what} {path}: array {key!r} is corrupt ({error})") from None
            except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as error:
                raise ValueError(f"{what} {path}: array {key!r} is truncated or corrupt ({error}); download or "
                                 "write the file again") from None
    return arrays


def load_torch(path: str | Path, what: str = "weights file") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with errors that name the file.

    A truncated or corrupt file, or one that holds pickled Python objects beyond tensors and plain containers
    (a whole pickled model, a custom class), raises a ``ValueError`` saying so.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (MemoryError, OSError):
        raise
    except Exception as error:  # noqa: BLE001 - torch raises many kinds here; none may escape unexplained
        message = str(error)
        found = re.search(r"GLOBAL ([\w.]+)", message)
        if "Weights only load failed" in message and ("can still be loaded" in message or found):
            holds = f"a pickled {found.group(1)}" if found else "pickled Python objects"
            raise ValueError(f"{what} {path} holds {holds}, not only tensors; oodscope loads tensors and plain "
                             "containers only (loading objects can run code). Save a state dict instead: "
                             "torch.save(model.state_dict(), path)") from None
        raise ValueError(f"{what} {path} is truncated or corrupt, or not a PyTorch file "
                         f"({type(error).__name__}); download or save it again") from None


def _default_file_mode() -> int:
    """``0o666`` less the process umask: the mode a plain ``open(path, "w")`` gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically: a temporary file in the same folder, then
    ``os.replace``. The folder must exist; the temporary file is removed when the write fails. Returns the path."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    handle = tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(raw)
            os.fchmod(handle.fileno(), _default_file_mode())  # mkstemp makes 0600; give what open() would
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path
