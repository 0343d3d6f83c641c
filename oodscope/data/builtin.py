"""Resolve what ``oodscope bench NAME_OR_PATH`` runs: a built-in benchmark or a benchmark folder.

A built-in benchmark is a function ``prepare(request) -> Prepared`` named in :data:`BUILTIN` (module:function,
imported only when used). A folder with a ``benchmark.toml`` needs a model: ``--model SPEC`` (any spec of
:mod:`oodscope.models.spec`: a zoo name with ``--weights``, a TorchScript file, ``package.module:callable``, ...).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .benchmark import Benchmark

BUILTIN: dict[str, str] = {
    "digits": "oodscope.data.digits:prepare",
    "cifar10": "oodscope.data.cifar10:prepare",
    "clinc150": "oodscope.data.clinc150:prepare",
    "clinc150-ft": "oodscope.data.clinc150:prepare_finetuned",
    "clinc150-ftfull": "oodscope.data.clinc150:prepare_full_finetune",
}


@dataclass
class BenchRequest:
    """What the user asked for on the command line (or through the API)."""

    benchmark: str = "digits"
    model: str | None = None
    weights: str | None = None
    data_root: str | None = None
    cache_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    """A benchmark with the model to evaluate on it and that model's input preprocessing."""

    bench: Benchmark
    model: Any
    preprocess: Callable | None
    model_name: str = ""


def prepare(request: BenchRequest) -> Prepared:
    """Resolve ``request.benchmark``: a built-in name, or a folder holding ``benchmark.toml``."""
    name = request.benchmark
    if name in BUILTIN:
        module_name, function = BUILTIN[name].split(":")
        return getattr(importlib.import_module(module_name), function)(request)
    path = Path(name)
    if path.exists():
        from ..models.spec import ModelSpec, kind_of, load
        from .spec import load_benchmark_dir

        if request.model is None:
            raise ValueError(f"benchmark folder {path} needs --model: a zoo name (e.g. cifar10_resnet20, with "
                             "--weights), a TorchScript file, package.module:callable, torchvision:NAME, ...")
        kind_of(request.model)  # a bad --model is named before the data is read
        bench = load_benchmark_dir(path)
        model, preprocess, _ = load(ModelSpec(request.model, weights=request.weights))
        return Prepared(bench, model, preprocess, request.model)
    raise ValueError(f"unknown benchmark {name!r}: not a built-in ({', '.join(sorted(BUILTIN))}) "
                     f"and no such folder")
