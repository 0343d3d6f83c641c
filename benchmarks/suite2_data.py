"""Shared loading for the suite-II benchmark scripts: CIFAR-10 bench outputs (cached) and fixed subsamples.

``outputs(depth)`` extracts every split once with the spatially averaged activations of the stem and the three
stages (``relu``, ``layer1``, ``layer2``, ``layer3``) into the extraction cache (``$OODSCOPE_CACHE``, default
``/work/cache`` here); later calls read the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from oodscope.data.spec import load_benchmark_dir
from oodscope.extraction import Outputs
from oodscope.models.zoo import load_model
from oodscope.runner import extract_benchmark

BENCH = Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "cifar10-bench"
LAYERS = ["relu", "layer1", "layer2", "layer3"]
OOD = {"near": ["cifar100", "tin"], "far": ["mnist", "textures"]}
CACHE = os.environ.get("OODSCOPE_CACHE", "/work/cache")


def model(depth: int):
    return load_model(f"cifar10_resnet{depth}", str(BENCH / "models" / f"cifar10_resnet{depth}.pth"))


def outputs(depth: int, layers=LAYERS) -> tuple[dict[str, Outputs], object, object]:
    bench = load_benchmark_dir(BENCH)
    net, pre = model(depth)
    outs = extract_benchmark(bench, net, pre, layers=layers, cache_dir=CACHE, progress=False)
    for name, out in outs.items():
        out.name = name
    return outs, net, pre


def subsample(out: Outputs, n: int, seed: int = 0) -> Outputs:
    """A fixed random subset of ``n`` rows that keeps the model source (for detectors that re-run the model)."""
    if n >= len(out):
        return out
    index = np.sort(np.random.default_rng(seed).choice(len(out), n, replace=False))
    sub = out.subset(index, name=out.name)
    if out.source is not None:
        source = out.source
        sub.source = type(source)(model=source.model, inputs=source.inputs[index], preprocess=source.preprocess,
                                  device=source.device, batch_size=source.batch_size, head=source.head)
    return sub
