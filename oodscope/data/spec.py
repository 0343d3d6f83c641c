"""Benchmark folders: a ``benchmark.toml`` naming ID splits and groups of OOD sets stored as ``.npz`` files.

Format (paths relative to the toml file)::

    name = "cifar10"
    image_size = 32
    [id]
    train = "cifar10_train.npz"
    val = "cifar10_val.npz"
    test = "cifar10_test.npz"
    [ood.val]            # tuning only
    tin = "tin_val.npz"
    [ood.near]
    cifar100 = "cifar100_test.npz"

Each ``.npz`` holds ``images`` (uint8, N x H x W x 3) and ``labels`` (int64; -1 for OOD).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np

from .benchmark import Benchmark, Split


def load_npz(path: str | Path, image_size: int | None = None, ood: bool = False) -> Split:
    """Read and check one ``.npz`` split; OOD sets get label -1 whatever the file holds."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    with np.load(path, allow_pickle=False) as archive:
        missing = {"images", "labels"} - set(archive.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)} (has {archive.files})")
        images, labels = archive["images"], archive["labels"]
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        raise ValueError(f"{path}: images are {images.shape[1]}x{images.shape[2]}, the spec says {image_size}")
    if labels.shape != (len(images),):
        raise ValueError(f"{path}: {len(images)} images but labels of shape {labels.shape}")
    labels = np.full(len(images), -1, np.int64) if ood else labels.astype(np.int64)
    return Split(images, labels)


def load_benchmark_dir(folder: str | Path) -> Benchmark:
    """Load a benchmark folder (see module docstring)."""
    folder = Path(folder)
    spec_path = folder / "benchmark.toml" if folder.is_dir() else folder
    if not spec_path.exists():
        raise FileNotFoundError(f"no benchmark.toml in {folder}")
    spec = tomllib.loads(spec_path.read_text())
    root = spec_path.parent
    size = spec.get("image_size")
    for key in ("name", "id", "ood"):
        if key not in spec:
            raise ValueError(f"{spec_path}: missing key {key!r}")
    splits = {}
    for role in ("train", "val", "test"):
        if role not in spec["id"]:
            raise ValueError(f"{spec_path}: [id] needs {role!r}")
        splits[role] = load_npz(root / spec["id"][role], size)
    ood_spec = dict(spec["ood"])
    ood_val = {name: load_npz(root / file, size, ood=True) for name, file in ood_spec.pop("val", {}).items()}
    ood = {group: {name: load_npz(root / file, size, ood=True) for name, file in sets.items()}
           for group, sets in ood_spec.items()}
    return Benchmark(name=spec["name"], ood=ood, ood_val=ood_val, **splits)
