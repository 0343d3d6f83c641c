"""Save and load fitted detectors: one zip file, no pickle anywhere.

``save(detector, path)`` writes (atomically: a temporary file in the same folder, then ``os.replace``) a zip with

* ``detector.json``: ``{"format": "oodscope-detector", "format_version": 1, "oodscope_version": ...,
  "detector": <registered name>, "class": "module:qualname", "params": {name: node}, "state": {attribute: node}}``
  where ``state`` holds every fitted attribute (name ending in ``_``);
* ``arrays.npz``: the numpy arrays the nodes refer to (read with ``np.load(..., allow_pickle=False)``);
* ``torch.pt``: ``{"modules": {ref: state_dict}, "tensors": {ref: tensor}}`` (read with
  ``torch.load(..., weights_only=True)``).

A *node* is JSON: ``None``, bools, ints, floats (``repr`` round-trips exactly), strings and lists stand for
themselves; everything else is an object ``{"$": kind, ...}``: ``array`` / ``scalar`` / ``dtype`` (a reference
into the npz), ``tuple``, ``set``, ``frozenset``, ``dict`` (string keys), ``pairs`` (other keys), ``bytes``,
``detector`` (a nested fitted detector, recursively), ``faiss`` (``IndexFlatL2`` / ``IndexFlatIP``: the
vectors, re-added on load), ``module`` (a torch state dict plus the train/eval mode and frozen parameters),
``tensor``, ``torch_device``, ``torch_dtype``, ``class`` / ``numpy_type`` (a reference to a class, never
called), ``argument`` (a network the user passed as a parameter, see below) and ``object``: any other object,
as its class (``module:qualname``), its ``__reduce_ex__`` constructor arguments and its state
(``__getstate__()`` or ``__dict__``, as a node). Loading creates ``object`` nodes only for classes in
:data:`ALLOWED` (oodscope, scikit-learn, PyOD), checked *before* the module is imported; anything else is refused
with a ``ValueError``, so loading a file never runs code the file names.

**Networks.** A state dict does not say how to build its module. A detector whose fitted state holds torch
modules defines ``_init_networks(self) -> None``: ``load`` calls it after the parameters and all non-network
fitted attributes are restored (inside a forked torch RNG, so the global RNG is untouched); it re-creates every
network attribute with its architecture (its weights do not matter), and ``load`` then fills in the saved
state dicts (strictly: same keys, shapes and dtypes). Image detectors rebuild their ``backbone_`` from the
``backbone`` parameter. ``save`` refuses a detector holding networks without the hook.

**User networks as parameters.** A parameter that is an ``nn.Module`` or a ``Backbone`` (e.g. ``backbone=``)
is stored as its state dict only; ``load(path, backbone=the_same_network)`` must pass it again (the saved
weights are loaded into it). Other parameters follow the node rules above, or ``save`` refuses them naming the
parameter.
"""

from __future__ import annotations

import copyreg
import importlib
import io
import json
import os
import sys
import secrets
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .detectors import registry
from .detectors.base import Detector, NotFittedError

FORMAT = "oodscope-detector"
FORMAT_VERSION = 1
#: module prefixes whose classes ``load`` may instantiate for ``object`` nodes
ALLOWED = ("oodscope.", "sklearn.", "pyod.")
_BUILTIN_TYPES = {t.__name__: t for t in (bool, int, float, complex, str, bytes)}
_PRIMITIVES = (type(None), bool, int, float, str)
_KINDS = {"backbone": "oodscope.imagead.Backbone", "module": "torch nn.Module"}


def save(detector: Detector, path: str | os.PathLike) -> Path:
    """Write the fitted ``detector`` to ``path`` (one zip file, see the module docstring); returns the path."""
    path = Path(path)
    if not isinstance(detector, Detector):
        raise TypeError(f"save expects a fitted oodscope Detector, got {type(detector).__name__}")
    if not hasattr(detector, "input_dims_"):
        raise NotFittedError(f"{detector.name or type(detector).__name__} is not fitted: call fit(train) before "
                             f"saving it to {path}")
    writer = _Writer()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "oodscope_version": _version(),
            **writer.detector(detector, "")}
    _write_atomic(path, meta, writer)
    return path


def load(path: str | os.PathLike, **arguments: Any) -> Detector:
    """Read a detector written by :func:`save`; scores are bit-identical to the saved detector's.

    ``arguments`` pass again the networks the detector was given as parameters (e.g. ``backbone=net``).
    """
    path = Path(path)
    meta, arrays, torch_state = _read(path)
    reader = _Reader(path, arrays, torch_state)
    return reader.top(meta, dict(arguments))


# -- writing ---------------------------------------------------------------------------------------------------
class _Writer:
    """Turns values into nodes, collecting arrays, tensors and module state dicts (deduplicated by identity)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.modules: dict[str, dict] = {}
        self.tensors: dict[str, Any] = {}
        self._refs: dict[int, str] = {}
        self._keep: list[Any] = []  # keeps deduplicated objects alive, so their ids stay unique
        self._networks = 0  # modules met in the fitted state of the detector being written
        self._in_param = False

    def detector(self, det: Detector, where: str) -> dict:
        if not hasattr(det, "input_dims_") and not self._in_param:  # a parameter may be an unfitted template
            raise NotFittedError(f"cannot save {where or 'the detector'}: {type(det).__name__} is not fitted")
        params = {k: self.param(k, v, f"{where}parameter {k!r}") for k, v in det.get_params(deep=False).items()}
        outer, self._networks = self._networks, 0
        state = {k: self.encode(v, f"{where}{k}") for k, v in vars(det).items() if k.endswith("_")}
        networks, self._networks = self._networks, outer
        if networks and not callable(getattr(det, "_init_networks", None)):
            raise ValueError(f"cannot save {where or det.name}: {type(det).__qualname__} holds torch networks but "
                             "defines no _init_networks() to rebuild them on load (see oodscope.persistence)")
        return {"detector": det.name, "class": _qualified(type(det)), "params": params, "state": state}

    def param(self, name: str, value: Any, where: str) -> Any:
        if _is_backbone(value) or _is_module(value):
            model = value.model if _is_backbone(value) else value
            networks, module = self._networks, self.encode(model, where)
            self._networks = networks  # the user passes it again; the detector's hook need not rebuild it
            return {"$": "argument", "name": name, "kind": "backbone" if _is_backbone(value) else "module",
                    "class": _qualified(type(model)), "module": module}
        outer, self._in_param = self._in_param, True
        try:
            return self.encode(value, where)
        finally:
            self._in_param = outer

    def encode(self, v: Any, where: str) -> Any:
        if type(v) in _PRIMITIVES:
            return v
        if type(v) is np.ndarray or isinstance(v, (np.generic, np.dtype)):
            return self._numpy(v, where)
        if type(v) is list:
            return [self.encode(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if type(v) in (tuple, set, frozenset):
            return {"$": type(v).__name__, "items": [self.encode(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if type(v) is dict:
            return self._dict(v, where)
        if type(v) is bytes:
            return {"$": "bytes", "hex": v.hex()}
        if isinstance(v, Detector):
            return {"$": "detector", **self.detector(v, f"{where}.")}
        if "torch" in sys.modules and (node := self._torch(v, where)) is not None:
            return node
        if type(v).__module__.split(".")[0] == "faiss":
            return self._faiss(v, where)
        if isinstance(v, type):
            return self._class(v, where)
        return self._object(v, where)

    def _numpy(self, v: Any, where: str) -> dict:
        kind = "array" if isinstance(v, np.ndarray) else "scalar" if isinstance(v, np.generic) else "dtype"
        value = v if kind == "array" else np.asarray(v) if kind == "scalar" else np.empty(0, v)
        if value.dtype.hasobject:
            raise ValueError(f"cannot save {where}: numpy {kind} of dtype {value.dtype} holds Python objects")
        value, axes = _layout(value)
        node = {"$": kind, "ref": self._array(value, v)}
        return node if axes is None else {**node, "axes": axes}

    def _array(self, value: np.ndarray, key: Any) -> str:
        if id(key) not in self._refs:
            self._refs[id(key)] = ref = f"a{len(self.arrays)}"
            self.arrays[ref] = value
            self._keep.append(key)
        return self._refs[id(key)]

    def _dict(self, v: dict, where: str) -> dict:
        if all(type(k) is str for k in v):
            return {"$": "dict", "items": {k: self.encode(x, f"{where}[{k!r}]") for k, x in v.items()}}
        return {"$": "pairs", "items": [[self.encode(k, f"{where}.<key>"), self.encode(x, f"{where}[{k!r}]")]
                                        for k, x in v.items()]}

    def _torch(self, v: Any, where: str) -> dict | None:
        import torch

        if isinstance(v, torch.nn.Module):
            if self._in_param:
                raise ValueError(f"cannot save {where}: a network nested inside a parameter cannot be restored; "
                                 "pass networks as parameters of their own")
            self._networks += 1
            if id(v) not in self._refs:
                self._refs[id(v)] = f"m{len(self.modules)}"
                self.modules[self._refs[id(v)]] = v.state_dict()
                self._keep.append(v)
            return {"$": "module", "ref": self._refs[id(v)], "class": _qualified(type(v)),
                    "training": [n for n, m in v.named_modules() if m.training],
                    "frozen": [n for n, p in v.named_parameters() if not p.requires_grad]}
        if isinstance(v, torch.Tensor):
            if id(v) not in self._refs:
                self._refs[id(v)] = f"t{len(self.tensors)}"
                self.tensors[self._refs[id(v)]] = v
                self._keep.append(v)
            return {"$": "tensor", "ref": self._refs[id(v)], "device": str(v.device)}
        if isinstance(v, torch.device):
            return {"$": "torch_device", "value": str(v)}
        if isinstance(v, torch.dtype):
            return {"$": "torch_dtype", "value": str(v).removeprefix("torch.")}
        return None

    def _faiss(self, index: Any, where: str) -> dict:
        kind = type(index).__name__
        if kind not in ("IndexFlatL2", "IndexFlatIP"):
            raise ValueError(f"cannot save {where}: faiss {kind} is not supported (only the exact IndexFlatL2 and "
                             "IndexFlatIP); fit with the exact index to save the detector")
        vectors = (index.reconstruct_n(0, index.ntotal) if index.ntotal
                   else np.empty((0, index.d), np.float32))
        return {"$": "faiss", "index": kind, "dim": int(index.d), "vectors": self._numpy(vectors, where)}

    def _class(self, cls: type, where: str) -> dict:
        if cls.__module__ == "builtins" and cls.__name__ in _BUILTIN_TYPES:
            return {"$": "class", "class": f"builtins:{cls.__name__}"}
        if issubclass(cls, np.generic) and np.dtype(cls).type is cls and not np.dtype(cls).hasobject:
            return {"$": "numpy_type", "dtype": np.dtype(cls).str}
        _check_allowed(_qualified(cls), lambda m: ValueError(f"cannot save {where}: {m}"))
        return {"$": "class", "class": _qualified(cls)}

    def _object(self, v: Any, where: str) -> dict:
        def refuse(why: str) -> ValueError:
            return ValueError(f"cannot save {where}: {type(v).__module__}.{type(v).__qualname__} {why}")

        try:
            reduced = v.__reduce_ex__(4)
        except Exception as e:
            raise refuse(f"cannot be reduced ({e})") from None
        if isinstance(reduced, str) or len(reduced) < 2 or any(x is not None for x in reduced[3:6]):
            raise refuse("is not a plain object (saved by reference or as a container)")
        fn, args, state = reduced[0], tuple(reduced[1]), reduced[2] if len(reduced) > 2 else None
        if fn is copyreg.__newobj__ or (getattr(fn, "__name__", "") == "newObj"
                                       and getattr(fn, "__module__", "").startswith("sklearn.")):
            cls, args, call = args[0], args[1:], False  # cls.__new__(cls, *args), then the state
        elif isinstance(fn, type):
            cls, call = fn, True  # cls(*args), then the state
        else:
            raise refuse(f"is built by {getattr(fn, '__qualname__', fn)!r}, which load cannot trust")
        _check_allowed(_qualified(cls), lambda m: refuse(f"cannot be saved: {m}"))
        if call and not _reduces_to_call(cls) or not (state is None or isinstance(state, dict)
                                                      or hasattr(v, "__setstate__")):
            raise refuse("has a reduction that load does not rebuild")
        if _is_backbone(v) and isinstance(state, dict) and state.get("memo") is not None:
            state = {**state, "memo": {}}  # a cache of layer outputs keyed by array identity
        node = {"$": "object", "class": _qualified(cls), "state": self.encode(state, where)}
        if args:
            node.update(args=self.encode(list(args), f"{where}.<args>"), call=call)
        return node


def _write_atomic(path: Path, meta: dict, writer: _Writer) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # same folder: same disk
    try:
        with open(tmp, "xb") as f:  # a new file with the usual permissions (mkstemp's would be owner-only)
            with zipfile.ZipFile(f, "w") as zf:
                zf.writestr("detector.json", json.dumps(meta, indent=1), compress_type=zipfile.ZIP_DEFLATED)
                if writer.arrays:
                    buffer = io.BytesIO()
                    np.savez(buffer, **writer.arrays)
                    zf.writestr("arrays.npz", buffer.getvalue())
                if writer.modules or writer.tensors:
                    import torch

                    buffer = io.BytesIO()
                    torch.save({"modules": writer.modules, "tensors": writer.tensors}, buffer)
                    zf.writestr("torch.pt", buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -- reading ---------------------------------------------------------------------------------------------------
_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, json.JSONDecodeError, UnicodeDecodeError, KeyError,
            RuntimeError, ValueError, TypeError)


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray], dict]:
    """The header, arrays and torch state of a detector file, with the file's problems as ``ValueError``."""
    if not zipfile.is_zipfile(path):
        if not path.exists():
            raise FileNotFoundError(f"no detector file {path}")
        raise ValueError(f"{path} is not an oodscope detector file (not a zip archive, or truncated or corrupted); "
                         "save the detector again with detector.save(path)")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "detector.json" not in names:
                raise _FileError(f"{path} is a zip archive but not an oodscope detector file (no detector.json); "
                                 "write detector files with detector.save(path)")
            meta = json.loads(zf.read("detector.json"))
            _check_header(path, meta)
            arrays = {}
            if "arrays.npz" in names:
                with np.load(io.BytesIO(zf.read("arrays.npz")), allow_pickle=False) as npz:
                    arrays = {k: npz[k] for k in npz.files}
            torch_state = {"modules": {}, "tensors": {}}
            if "torch.pt" in names:
                import torch

                torch_state = torch.load(io.BytesIO(zf.read("torch.pt")), map_location="cpu", weights_only=True)
    except _FileError:
        raise
    except Exception as e:
        if not isinstance(e, _CORRUPT) and type(e).__name__ != "UnpicklingError":
            raise
        raise _FileError(f"{path} is a corrupted or truncated oodscope detector file ({type(e).__name__}: {e}); "
                         "save the detector again") from e
    return meta, arrays, torch_state


class _FileError(ValueError):
    """A problem with a detector file (raised as a ``ValueError`` naming the file)."""


def _check_header(path: Path, meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _FileError(f"{path} is not an oodscope detector file (detector.json has no format "
                         f"{FORMAT!r}); write detector files with detector.save(path)")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise _FileError(f"{path} has format_version {version!r}, but oodscope {_version()} reads version "
                         f"{FORMAT_VERSION}; load it with the oodscope version that wrote it "
                         f"({meta.get('oodscope_version', 'unknown')}) or upgrade oodscope")


class _Pending:
    """Stands for a saved module until the detector's ``_init_networks`` re-creates it."""

    def __init__(self, node: dict):
        self.node = node


class _Reader:
    def __init__(self, path: Path, arrays: dict[str, np.ndarray], torch_state: dict):
        self.path, self.arrays, self.torch = path, arrays, torch_state
        self.pending: list[tuple[tuple, dict]] = []

    def fail(self, message: str) -> _FileError:
        return _FileError(f"{self.path}: {message}")

    def top(self, meta: dict, arguments: dict[str, Any]) -> Detector:
        try:
            return self.detector(meta, "", arguments)
        except _FileError:
            raise
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
            raise self.fail(f"cannot rebuild the saved detector ({type(e).__name__}: {e}); the file is corrupted "
                            "or was written by an incompatible oodscope") from e

    def detector(self, node: dict, where: str, arguments: dict[str, Any] | None = None) -> Detector:
        cls = self._detector_class(node, where)
        arguments = {} if arguments is None else arguments
        params = {k: self.param(k, v, arguments, f"{where}parameter {k!r}") for k, v in node["params"].items()}
        if arguments:
            raise self.fail(f"unexpected arguments {sorted(arguments)}: pass only the networks the detector was "
                            "given as parameters")
        det = cls(**params)
        outer, self.pending = self.pending, []
        try:
            for key, value in node["state"].items():
                if not (key.isidentifier() and key.endswith("_") and not key.startswith("__")):
                    raise self.fail(f"{where}{key!r} is not the name of a fitted attribute")
                setattr(det, key, self.decode(value, f"{where}{key}", (key,)))
            if self.pending:
                with _untouched_rng():
                    det._init_networks()
                for steps, module_node in self.pending:
                    self._fill(_follow(det, steps), module_node, where + ".".join(map(str, steps)))
        finally:
            self.pending = outer
        return det

    def _detector_class(self, node: dict, where: str) -> type[Detector]:
        name = node.get("detector")
        if not name:
            cls = self._class(node["class"], where)
        else:
            try:
                cls = registry.get(name)
            except registry.UnknownDetectorError as e:
                raise self.fail(f"{e}. The file needs the oodscope version that wrote it "
                                f"or the plugin that registers {name!r}") from None
        if not (isinstance(cls, type) and issubclass(cls, Detector)):
            raise self.fail(f"{where or 'the file'} names {node['class']!r}, which is not a detector")
        return cls

    def param(self, name: str, node: Any, arguments: dict[str, Any], where: str) -> Any:
        if not (isinstance(node, dict) and node.get("$") == "argument"):
            return self.decode(node, where, None)
        kind = _KINDS[node["kind"]]
        if name not in arguments:
            raise self.fail(f"parameter {name!r} was a user-supplied {kind} ({node['class']}), which is not "
                            f"stored in the file; pass it again: oodscope.load({str(self.path)!r}, "
                            f"{name}=<the same network>)")
        value = arguments.pop(name)
        if not (_is_backbone(value) if node["kind"] == "backbone" else _is_module(value)):
            raise self.fail(f"parameter {name!r} must be a {kind} like the saved one ({node['class']}), "
                            f"got {type(value).__name__}")
        self._fill(value.model if _is_backbone(value) else value, node["module"], where)
        return value

    def decode(self, node: Any, where: str, steps: tuple | None) -> Any:
        if node is None or type(node) in (bool, int, float, str):
            return node
        if type(node) is list:
            return [self.decode(x, f"{where}[{i}]", _step(steps, i)) for i, x in enumerate(node)]
        kind = node["$"]
        if kind in ("array", "scalar", "dtype"):
            value = self.arrays[node["ref"]]
            value = value.transpose(node["axes"]) if "axes" in node else value
            return value if kind == "array" else value[()] if kind == "scalar" else value.dtype
        if kind in ("tuple", "set", "frozenset"):
            items = [self.decode(x, f"{where}[{i}]", _step(steps, i)) for i, x in enumerate(node["items"])]
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[kind](items)
        if kind == "dict":
            return {k: self.decode(x, f"{where}[{k!r}]", _step(steps, k)) for k, x in node["items"].items()}
        if kind == "pairs":
            pairs = [(self.decode(k, f"{where}.<key>", None), x) for k, x in node["items"]]
            return {k: self.decode(x, f"{where}[{k!r}]", _step(steps, k)) for k, x in pairs}
        if kind == "bytes":
            return bytes.fromhex(node["hex"])
        if kind == "detector":
            return self.detector(node, f"{where}.")
        if kind == "module":
            if steps is None:
                raise self.fail(f"{where}: a network inside a set or a dict key cannot be restored")
            self.pending.append((steps, node))
            return _Pending(node)
        if kind in ("tensor", "torch_device", "torch_dtype"):
            return self._torch(node)
        if kind == "faiss":
            return self._faiss(node, where)
        if kind == "class":
            return self._class(node["class"], where)
        if kind == "numpy_type":
            return np.dtype(node["dtype"]).type
        if kind == "object":
            return self._object(node, where, steps)
        raise self.fail(f"{where}: unknown node kind {kind!r}; the file was written by a newer oodscope")

    def _torch(self, node: dict) -> Any:
        import torch

        if node["$"] == "torch_device":
            return torch.device(node["value"])
        if node["$"] == "torch_dtype":
            dtype = getattr(torch, node["value"])
            if not isinstance(dtype, torch.dtype):
                raise self.fail(f"{node['value']!r} is not a torch dtype")
            return dtype
        return self.torch["tensors"][node["ref"]].to(node["device"])

    def _faiss(self, node: dict, where: str) -> Any:
        import faiss

        if node["index"] not in ("IndexFlatL2", "IndexFlatIP"):
            raise self.fail(f"{where}: unsupported faiss index {node['index']!r}")
        index = getattr(faiss, node["index"])(int(node["dim"]))
        vectors = self.arrays[node["vectors"]["ref"]]
        if len(vectors):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return index

    def _class(self, name: str, where: str) -> type:
        module, _, qualname = name.partition(":")
        if module == "builtins" and qualname in _BUILTIN_TYPES:
            return _BUILTIN_TYPES[qualname]
        _check_allowed(name, lambda m: self.fail(f"refused to load {where or 'the detector'}: {m}; loading never "
                                                 "imports or runs code outside the allow-list (the file may be "
                                                 "corrupted or malicious)"))
        value: Any = importlib.import_module(module)
        for part in qualname.split("."):
            value = getattr(value, part, None)
        if not isinstance(value, type) or _qualified(value) != name:  # no walking out of the module to others
            raise self.fail(f"{where}: {name!r} is not a class defined there")
        return value

    def _object(self, node: dict, where: str, steps: tuple | None) -> Any:
        cls = self._class(node["class"], where)
        args = self.decode(node.get("args", []), f"{where}.<args>", None)
        if node.get("call") and not _reduces_to_call(cls):
            raise self.fail(f"{where}: {node['class']} is not rebuilt by calling it; refused")
        obj = cls(*args) if node.get("call") else cls.__new__(cls, *args)
        state = self.decode(node["state"], where, steps)
        if state is None:
            return obj
        if hasattr(obj, "__setstate__"):
            obj.__setstate__(state)
        elif isinstance(state, dict):
            obj.__dict__.update(state)
        else:
            raise self.fail(f"{where}: {node['class']} has state of type {type(state).__name__} but no __setstate__")
        return obj

    def _fill(self, module: Any, node: dict, where: str) -> None:
        """Load a saved state dict into the re-created ``module`` (same keys, shapes and dtypes)."""
        import torch

        if isinstance(module, _Pending) or not isinstance(module, torch.nn.Module):
            raise self.fail(f"{where}: _init_networks() did not re-create this network ({node['class']})")
        saved = self.torch["modules"][node["ref"]]
        current = module.state_dict()
        wrong = [k for k in saved if k in current and current[k].dtype != saved[k].dtype]
        if wrong:
            raise self.fail(f"{where}: the re-created network has other dtypes for {wrong[:5]}")
        try:
            module.load_state_dict(saved, strict=True)
        except RuntimeError as e:
            raise self.fail(f"{where}: the saved weights do not fit the network ({e})") from None
        training, frozen = set(node["training"]), set(node["frozen"])
        for name, m in module.named_modules():
            m.training = name in training
        for name, p in module.named_parameters():
            p.requires_grad_(name not in frozen)


def _layout(a: np.ndarray) -> tuple[np.ndarray, list[int] | None]:
    """A C-contiguous array and the axes that give back ``a`` with its own memory layout, when one exists.

    The layout matters: BLAS rounds differently on a transposed operand, and scores must be bit-identical.
    """
    if a.ndim < 2 or a.flags.c_contiguous:
        return a, None
    order = [int(i) for i in np.argsort([-s for s in a.strides], kind="stable")]
    base = a.transpose(order)
    if not base.flags.c_contiguous:
        return a, None  # a strided view: saved as a copy
    return base, [int(i) for i in np.argsort(order)]


def _step(steps: tuple | None, key: Any) -> tuple | None:
    return None if steps is None else steps + (key,)


def _follow(root: Any, steps: tuple) -> Any:
    """The value at ``steps`` (attribute names of objects, keys/indices of containers) from ``root``."""
    value = root
    for key in steps:
        value = value[key] if isinstance(value, (list, tuple, dict)) else getattr(value, key)
    return value


# -- helpers ---------------------------------------------------------------------------------------------------
def _qualified(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _check_allowed(name: str, error) -> None:
    """Raise ``error(message)`` unless the class ``module:qualname`` lies in :data:`ALLOWED` (no import needed)."""
    module, _, qualname = name.partition(":")
    if not (module + ".").startswith(ALLOWED) or not qualname or "<" in qualname or "__" in qualname:
        raise error(f"class {name!r} is not in the allow-list ({', '.join(p + '*' for p in ALLOWED)})")


def _reduces_to_call(cls: type) -> bool:
    """Whether ``cls`` asks to be rebuilt as ``cls(*args)`` (it defines ``__reduce__``, like sklearn's ``Tree``).

    Other classes are only ever created with ``cls.__new__``: a file cannot make load run their ``__init__``.
    """
    return any("__reduce__" in vars(k) or "__reduce_ex__" in vars(k) for k in cls.__mro__ if k is not object)


def _is_module(value: Any) -> bool:
    return "torch" in sys.modules and isinstance(value, sys.modules["torch"].nn.Module)


def _is_backbone(value: Any) -> bool:
    return type(value).__name__ == "Backbone" and type(value).__module__ == "oodscope.imagead.base"


@contextmanager
def _untouched_rng() -> Iterator[None]:
    """Torch's global RNG (CPU, and CUDA where initialised) as it was, whatever building the networks draws."""
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def _version() -> str:
    from . import __version__

    return __version__
