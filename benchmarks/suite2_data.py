"""Shared loading for the suite-II benchmark scripts: CIFAR-10 bench outputs (cached) and fixed subsamples.

``outputs(depth)`` extracts every split once with the spatially averaged activations of the stem and the three
stages (``relu``, ``layer1``, ``layer2``, ``layer3``) into the extraction cache (``$OODSCOPE_CACHE``, default
the oodscope cache); later calls read the cache.
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
CACHE = os.environ.get("OODSCOPE_CACHE")


def model(depth: int):
    return load_model(f"cifar10_resnet{depth}", str(BENCH / "models" / f"cifar10_resnet{depth}.pth"))


def outputs(depth: int, layers=LAYERS) -> tuple[dict[str, Outputs], object, object]:
    bench = load_benchmark_dir(BENCH)
    net, pre = model(depth)
    outs = extract_benchmark(bench, net, pre, layers=layers, cache_dir=CACHE, progress=False)
    for name, out in outs.items():
        out.name = name
    return outs, net, pre


def sub_outputs(depth: int, net, pre, key: str, n: int, seed: int = 0) -> Outputs:
    """Outputs (with ``LAYERS`` and the model source) of a fixed random subset of ``n`` images of split ``key``;
    cached under the name ``cifar10-sub<n>-<key>`` (the key of ResNet-20 entries carries no depth, as before)."""
    import oodscope

    split = load_benchmark_dir(BENCH).datasets()[key]
    index = np.sort(np.random.default_rng(seed).choice(len(split.inputs), min(n, len(split.inputs)), replace=False))
    prefix = "cifar10" if depth == 20 else f"cifar10-r{depth}"
    out = oodscope.extract(net, (split.inputs[index], split.labels[index]),
                           name=f"{prefix}-sub{n}-{key.replace('/', '-')}", preprocess=pre, layers=LAYERS,
                           cache_dir=CACHE, progress=False)
    out.name = key
    return out
