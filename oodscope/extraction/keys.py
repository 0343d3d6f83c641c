"""Cache keys of everything that can change a model's outputs, or a clear refusal to cache.

:func:`module_key` digests a ``torch.nn.Module`` as a whole: every tensor of its ``state_dict``, every buffer
(non-persistent ones too), and for every submodule its class (qualified name and the bytecode of its methods,
so an edited ``forward`` is another key) and the plain-Python attributes in its ``__dict__`` (numbers,
strings, tuples, lists, dicts, arrays, tensors, dtypes, named functions, ... recursively), except torch's own
bookkeeping (``_parameters``, hooks, ``training``, ...). A submodule may name attributes that never change its
outputs (counters, memo tables) in a ``cache_ignore`` tuple. :func:`value_key` digests any other value the same
way. What cannot be digested (a lambda or local function, an object without ``__dict__``, a lock, a file...)
raises :class:`Uncacheable` with a one-line reason, and the caller does not cache: a stale entry is never
returned for another configuration.

Objects with a ``cache_key`` attribute are keyed by it (their own, documented, description).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import pathlib
import types
from typing import Any

import numpy as np
import torch
from torch import nn

from .cache import digest_array

# torch's own bookkeeping (parameters, buffers and submodules are keyed through the state dict and the module
# tree; hooks are oodscope's probes or the user's observers; eval mode is set by extract) and flags that
# libraries set on a module's first forward pass or mirror from its mode (transformers: output-capturing hooks
# installed, the kernels mode that follows train()/eval())
_TORCH_INTERNALS = frozenset(nn.Module().__dict__) | {"training", "_compiled_call_impl"}
_LIBRARY_BOOKKEEPING = frozenset({"_output_capturing_hooks_installed", "_is_hf_initialized", "_kernels_mode"})
_MAX_DEPTH = 24


class Uncacheable(Exception):
    """A value whose influence on the outputs cannot be keyed; its message is a one-line reason."""


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _is_local(function: Any) -> bool:
    name = getattr(function, "__qualname__", "")
    return "<lambda>" in name or "<locals>" in name


def _const(value: Any, h: "hashlib._Hash") -> None:
    """A code constant, the same in every process (frozensets of strings are ordered by a salted hash)."""
    if isinstance(value, types.CodeType):
        _code_bytes(value, h)
    elif isinstance(value, (tuple, frozenset)):
        h.update(f"{type(value).__name__}{len(value)}(".encode())
        items = value if isinstance(value, tuple) else sorted(value, key=repr)
        for item in items:
            _const(item, h)
        h.update(b")")
    else:
        h.update(repr(value).encode())


def _code_bytes(code: types.CodeType, h: "hashlib._Hash") -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    _const(code.co_consts, h)


@functools.lru_cache(maxsize=None)
def _class_digest(cls: type) -> str:
    """Qualified names and method bytecode of ``cls`` and its bases below ``nn.Module``/``object``."""
    h = hashlib.sha256()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        h.update(_qualname(klass).encode())
        for name, member in sorted(vars(klass).items()):
            function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            code = getattr(function, "__code__", None)
            if isinstance(code, types.CodeType):
                h.update(name.encode())
                _code_bytes(code, h)
    return h.hexdigest()


def _tensor_bytes(tensor: torch.Tensor, h: "hashlib._Hash") -> None:
    values = tensor.detach()
    if values.layout != torch.strided or values.device.type == "meta":
        raise Uncacheable(f"a {values.layout} tensor on {values.device}")
    values = values.cpu().contiguous().reshape(-1)
    h.update(f"{values.dtype}{tuple(tensor.shape)}".encode())
    if values.numel():
        h.update(values.view(torch.uint8).numpy().tobytes())


class _Digest:
    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.active: set[int] = set()  # objects being digested (cycles)
        self.modules: dict[int, str] = {}  # id -> path of modules already keyed as a whole

    def tag(self, text: str) -> None:
        self.h.update(text.encode())
        self.h.update(b"\x00")

    # -- modules ---------------------------------------------------------------------------------------------
    def module(self, module: nn.Module, where: str) -> None:
        self.tag(f"module {where}")
        state = module.state_dict()
        for name, value in state.items():
            self.tag(f"state {name}")
            if isinstance(value, torch.Tensor):
                _tensor_bytes(value, self.h)
            else:  # get_extra_state() values
                self.value(value, f"{where} state {name!r}", 0)
        for name, buffer in module.named_buffers():
            if name not in state:  # non-persistent buffers change outputs too
                self.tag(f"buffer {name}")
                _tensor_bytes(buffer, self.h)
        named = list(module.named_modules(remove_duplicate=False))
        for name, sub in named:
            self.modules.setdefault(id(sub), f"{where}.{name}" if name else where)
        for name, sub in named:
            if isinstance(sub, torch.jit.ScriptModule):  # TorchScript: its code and state define its outputs
                self.tag(f"torchscript {name} {getattr(sub, 'original_name', '')} {_script_code(sub)}")
                continue
            self.tag(f"submodule {name} {_qualname(type(sub))} {_class_digest(type(sub))}")
            ignore = set(getattr(sub, "cache_ignore", ()) or ())
            for attr, value in sorted(vars(sub).items()):
                if attr in _TORCH_INTERNALS or attr in _LIBRARY_BOOKKEEPING or attr in ignore:
                    continue
                self.tag(f"attr {attr}")
                self.value(value, f"{where} attribute {(name + '.') if name else ''}{attr}", 0)

    # -- any value ---------------------------------------------------------------------------------------------
    def value(self, value: Any, where: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise Uncacheable(f"{where} is nested too deeply to be keyed")
        kind = type(value)
        if value is None or value is Ellipsis or kind in (bool, int, float, complex, str, bytes):
            self.tag(f"{kind.__name__}:{value!r}")
        elif isinstance(value, enum.Enum):
            self.tag(f"enum {_qualname(kind)}:{value.name}")
        elif isinstance(value, (bool, int, float, complex, str, bytes)):  # subclasses (np.float64, IntEnum...)
            self.tag(f"{_qualname(kind)}:{value!r}")
        elif isinstance(value, np.generic):
            self.tag(f"np {value.dtype.str}:{value.tobytes().hex()}")
        elif isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                self.tag(f"object-array {value.shape}")
                self.value(value.tolist(), where, depth + 1)
            else:
                self.tag(f"array {digest_array(value)}")
        elif isinstance(value, torch.Tensor):
            self.tag("tensor")
            try:
                _tensor_bytes(value, self.h)
            except Uncacheable as error:
                raise Uncacheable(f"{where} is {error}") from None
        elif isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format, range, slice,
                                pathlib.PurePath)):
            self.tag(f"{_qualname(kind)}:{value}")
        elif isinstance(value, nn.Module):
            if id(value) in self.modules:  # keyed as a whole already: its position is enough
                self.tag(f"module-ref {self.modules[id(value)]}")
            else:
                self._guarded(value, where, lambda: self.module(value, where))
        elif isinstance(value, (tuple, list)):
            self.tag(f"{_qualname(kind)} {len(value)}")
            self._guarded(value, where, lambda: [self.value(v, f"{where}[{i}]", depth + 1)
                                                 for i, v in enumerate(value)])
        elif isinstance(value, (dict, set, frozenset)):
            self.tag(f"{_qualname(kind)} {len(value)}")
            self._guarded(value, where, lambda: self._unordered(value, where, depth))
        elif isinstance(value, functools.partial):
            self.tag("partial")
            self._guarded(value, where, lambda: [self.value(value.func, where, depth + 1),
                                                 self.value(value.args, where, depth + 1),
                                                 self.value(value.keywords, where, depth + 1)])
        elif isinstance(value, type):
            self.tag(f"class {_qualname(value)} {_class_digest(value)}")
        elif isinstance(value, types.ModuleType):
            self.tag(f"python-module {value.__name__}")
        elif isinstance(value, (types.FunctionType, types.MethodType)):
            self._function(value, where, depth)
        elif isinstance(value, (types.BuiltinFunctionType, types.BuiltinMethodType, np.ufunc)):
            if isinstance(getattr(value, "__self__", None), (type(None), types.ModuleType)) or isinstance(value,
                                                                                                      np.ufunc):
                self.tag(f"builtin {_qualname(value)}")
            else:
                raise Uncacheable(f"{where} is a method bound to a {type(value.__self__).__name__}")
        elif isinstance(value, logging.Logger):
            self.tag("logger")  # where messages go never changes outputs
        elif getattr(value, "cache_key", None) is not None and not callable(value.cache_key):
            self.tag(f"cache_key {_qualname(kind)}:{value.cache_key}")
        elif hasattr(value, "__dict__") or hasattr(kind, "__slots__"):
            self._object(value, where, depth)
        else:
            raise Uncacheable(f"{where} is a {_qualname(kind)}, which cannot be keyed")

    def _guarded(self, value: Any, where: str, run: Any) -> None:
        if id(value) in self.active:
            self.tag("cycle")
            return
        self.active.add(id(value))
        try:
            run()
        finally:
            self.active.discard(id(value))

    def _unordered(self, value: Any, where: str, depth: int) -> None:
        items = value.items() if isinstance(value, dict) else ((v, None) for v in value)
        digests = []
        for k, v in items:
            sub = _Digest()
            sub.active, sub.modules = self.active, self.modules
            sub.value(k, f"{where} key", depth + 1)
            if isinstance(value, dict):
                sub.value(v, f"{where}[{k!r}]", depth + 1)
            digests.append(sub.h.hexdigest())
        for digest in sorted(digests):
            self.tag(digest)

    def _function(self, value: Any, where: str, depth: int) -> None:
        function = getattr(value, "__func__", value)
        if not isinstance(getattr(function, "__code__", None), types.CodeType):
            raise Uncacheable(f"{where} is a {_qualname(type(value))}, which cannot be keyed")
        if _is_local(function):
            raise Uncacheable(f"{where} is a lambda or local function ({function.__qualname__}), whose "
                              "captured values cannot be keyed")
        self.tag(f"function {_qualname(function)}")
        _code_bytes(function.__code__, self.h)
        self._guarded(value, where, lambda: self._function_values(value, function, where, depth))

    def _function_values(self, value: Any, function: Any, where: str, depth: int) -> None:
        self.value(function.__defaults__, f"{where} defaults", depth + 1)
        self.value(function.__kwdefaults__, f"{where} defaults", depth + 1)
        for name in function.__code__.co_names:  # module constants it reads (numbers, strings, arrays)
            constant = function.__globals__.get(name)
            if constant is not None and isinstance(constant, (bool, int, float, complex, str, bytes, tuple,
                                                               np.ndarray, np.generic)):
                self.tag(f"global {name}")
                self.value(constant, f"{where} global {name}", depth + 1)
        if isinstance(value, types.MethodType):
            self.value(value.__self__, f"{where} (bound object)", depth + 1)

    def _object(self, value: Any, where: str, depth: int) -> None:
        kind = type(value)
        self.tag(f"object {_qualname(kind)} {_class_digest(kind)}")
        state = dict(getattr(value, "__dict__", {}) or {})
        for slot in (s for klass in kind.__mro__ for s in getattr(klass, "__slots__", ()) or ()):
            if isinstance(slot, str) and slot not in ("__dict__", "__weakref__") and hasattr(value, slot):
                state[slot] = getattr(value, slot)
        if not state and not hasattr(value, "__dict__"):
            raise Uncacheable(f"{where} is a {_qualname(kind)}, which cannot be keyed")

        def run() -> None:
            for name, item in sorted(state.items()):
                self.tag(f"field {name}")
                self.value(item, f"{where}.{name}", depth + 1)

        self._guarded(value, where, run)


def _script_code(module: Any) -> str:
    """sha256 of a TorchScript module's code (its methods compiled to TorchScript), or of its graph."""
    try:
        code = module.code
    except (AttributeError, RuntimeError):
        code = str(getattr(module, "graph", ""))
    return hashlib.sha256(str(code).encode()).hexdigest()


def module_key(module: nn.Module, what: str = "model") -> str:
    """Digest of everything in ``module`` that can change its outputs; :class:`Uncacheable` if it cannot be."""
    digest = _Digest()
    digest.module(module, what)
    return digest.h.hexdigest()


def value_key(value: Any, what: str = "value") -> str:
    """Digest of any other value (see the module docstring); :class:`Uncacheable` if it cannot be."""
    digest = _Digest()
    digest.value(value, what, 0)
    return digest.h.hexdigest()
