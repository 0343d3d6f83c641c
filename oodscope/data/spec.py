"""Benchmark folders: a ``benchmark.toml`` naming ID splits and groups of OOD sets.

Format (paths relative to the toml file)::

    name = "cifar10"
    image_size = 32
    image_root = "images"    # optional: default root of OpenOOD image lists (default: the toml's folder)
    [id]
    train = "cifar10_train.npz"
    val = "cifar10_val.npz"
    test = "cifar10_test.npz"
    [ood.val]            # tuning only
    tin = "tin_val.npz"
    [ood.near]
    cifar100 = "cifar100_test.npz"
    tin = { list = "benchmark_imglist/cifar10/test_tin.txt", root = "images_classic" }
    [ood.far]
    textures = "textures/"       # an image folder

A dataset source is one of

* a ``.npz`` file with ``images`` (uint8, N x H x W x 3) and ``labels`` (int64; -1 for OOD);
* an image folder: class sub-folders (labels = sorted sub-folder index, as torchvision's ``ImageFolder``) or
  images directly inside (label -1);
* an OpenOOD v1.5 image list (``.txt``, one ``relative/path.png label`` line per image), relative to ``root``
  (the table form above) or to the spec's ``image_root``.

Images read from files are converted to RGB and, when not ``image_size`` square, resized (shorter side,
bilinear with antialiasing) and center-cropped, as the usual ``Resize(s), CenterCrop(s)`` evaluation transform.
OOD sets always get label -1. Identical images shared by an ID split and an OOD set are counted
(:func:`find_overlaps`) and reported with a warning.
"""

from __future__ import annotations

import difflib
import tomllib
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .benchmark import Benchmark, Split

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
TOP_KEYS = {"name", "image_size", "image_root", "description", "id", "ood"}
ID_KEYS = ("train", "val", "test")


RESERVED_GROUPS = ("val",)  # [ood.val]: OOD sets for tuning only, never on the leaderboard
_TUNING_WORDS = ("validation", "valid", "tune", "tuning")


class OverlapWarning(UserWarning):
    """ID and OOD sets of a benchmark share identical images."""


class SpecWarning(UserWarning):
    """A benchmark spec that loads but probably does not say what its author meant."""


def _warn_near_reserved(spec_path: Path, group: str) -> None:
    """Warn when an OOD group's name is a near miss of a reserved one (``[ood.vall]`` for ``[ood.val]``)."""
    if group in RESERVED_GROUPS:
        return
    lowered = group.lower()
    close = difflib.get_close_matches(lowered, RESERVED_GROUPS, n=1, cutoff=0.6)
    if not close and lowered in _TUNING_WORDS:
        close = ["val"]
    if close:
        warnings.warn(f"{spec_path}: [ood.{group}] looks like a misspelling of the reserved group [ood.{close[0]}] "
                      f"(OOD sets for tuning only), but is used as a test group on the leaderboard; rename it "
                      f"[ood.{close[0]}] if it holds tuning data", SpecWarning, stacklevel=3)


def load_npz(path: str | Path, image_size: int | None = None, ood: bool = False) -> Split:
    """Read and check one ``.npz`` split; OOD sets get label -1 whatever the file holds."""
    from ..safeio import load_npz as read_npz

    path = Path(path)
    arrays = read_npz(path, ("images", "labels"))  # names the file: truncated, corrupt, object arrays, ...
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        raise ValueError(f"{path}: images are {images.shape[1]}x{images.shape[2]}, the spec says {image_size}")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: {len(images)} images need integer labels of shape ({len(images)},), "
                         f"got {labels.dtype} {labels.shape}")
    labels = np.full(len(images), -1, np.int64) if ood else labels.astype(np.int64)
    return Split(images, labels)


# -- image files ---------------------------------------------------------------------------------------------
def read_image(path: Path, image_size: int | None) -> np.ndarray:
    """One image file as uint8 H x W x 3 RGB, resized (shorter side) and center-cropped to ``image_size``."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image_size is not None and image.size != (image_size, image_size):
                width, height = image.size
                scale = image_size / min(width, height)
                size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
                image = image.resize(size, Image.BILINEAR, reducing_gap=None)
                left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
                image = image.crop((left, top, left + image_size, top + image_size))
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def _stack(paths: list[Path], image_size: int | None, where: str) -> np.ndarray:
    if not paths:
        raise ValueError(f"{where}: no images found")
    images = [read_image(p, image_size) for p in paths]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{where}: images have different sizes {sorted(shapes)[:4]}; set image_size in the spec")
    return np.stack(images)


def image_folder_files(folder: Path) -> tuple[list[Path], np.ndarray | None]:
    """The images of a folder and their labels: class sub-folders (``ImageFolder`` layout, labels by sorted folder
    name), or images directly inside (labels ``None``)."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), None
    paths, labels = [], []
    for label, sub in enumerate(classes):
        files = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, np.int64)


def load_image_folder(folder: str | Path, image_size: int | None = None, ood: bool = False) -> Split:
    """Class sub-folders (``ImageFolder`` layout, labels by sorted folder name) or a flat folder of images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    paths, labels = image_folder_files(folder)
    images = _stack(paths, image_size, f"image folder {folder}")
    if ood or labels is None:
        labels = np.full(len(paths), -1, np.int64)
    return Split(images, labels)


def load_image_list(list_file: str | Path, root: str | Path, image_size: int | None = None,
                    ood: bool = False) -> Split:
    """An OpenOOD v1.5 image list: ``relative/path label`` per line, paths relative to ``root``."""
    list_file, root = Path(list_file), Path(root)
    if not list_file.exists():
        raise FileNotFoundError(f"image list {list_file} does not exist")
    paths, labels = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{list_file}, line {number}: expected 'relative/path label', got {line!r}")
        path = root / parts[0]
        if not path.exists():
            raise FileNotFoundError(f"{list_file}, line {number}: image {path} does not exist "
                                    f"(is the list's root {root} right?)")
        paths.append(path)
        labels.append(int(parts[1]))
    images = _stack(paths, image_size, f"image list {list_file}")
    return Split(images, np.full(len(paths), -1, np.int64) if ood else np.asarray(labels, np.int64))


def load_source(entry: Any, base: Path, image_size: int | None, ood: bool, where: str,
                image_root: Path | None = None) -> Split:
    """One dataset source of a spec: a ``.npz``, an image folder, an image list, or ``{list=, root=}``."""
    root = image_root or base
    if isinstance(entry, dict):
        unknown = set(entry) - {"list", "root", "path"}
        if unknown or ("list" in entry) == ("path" in entry):
            raise ValueError(f"{where}: a table source takes either 'path' or 'list' (with optional 'root'); "
                             f"got keys {sorted(entry)}")
        if "list" in entry:
            return load_image_list(base / entry["list"], base / entry.get("root", root), image_size, ood)
        entry = entry["path"]
    if not isinstance(entry, str):
        raise ValueError(f"{where}: expected a file or folder name, got {entry!r}")
    path = base / entry
    if path.suffix == ".npz":
        return load_npz(path, image_size, ood)
    if path.suffix == ".txt":
        return load_image_list(path, root, image_size, ood)
    if path.is_dir():
        return load_image_folder(path, image_size, ood)
    if not path.exists():
        raise FileNotFoundError(f"{where}: data file {path} does not exist")
    raise ValueError(f"{where}: {path} is neither a .npz file, an image list (.txt) nor an image folder")


# -- overlap between ID and OOD --------------------------------------------------------------------------------
def image_hashes(images: np.ndarray, block: int = 4096) -> np.ndarray:
    """A 64-bit hash per image (vectorised): two random integer projections of the flattened bytes.

    The projections run as float64 matrix products; with weights below 2**32 and bytes below 2**8 every
    product and partial sum stays below 2**53, so they are exact integers. Identical images get identical
    hashes; :func:`count_shared` confirms hash matches byte by byte.
    """
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    weights = np.random.default_rng(20240611).integers(1, 2**32, size=(flat.shape[1], 2)).astype(np.float64)
    out = np.empty(len(flat), dtype=np.uint64)
    for start in range(0, len(flat), block):  # blocks of rows bound the float64 copy
        acc = (flat[start:start + block].astype(np.float64) @ weights).astype(np.uint64)
        out[start:start + block] = (acc[:, 0] << np.uint64(21)) ^ acc[:, 1]
    return out


def count_shared(a: np.ndarray, b: np.ndarray) -> int:
    """How many images of ``b`` are byte-identical to some image of ``a``."""
    if a.shape[1:] != b.shape[1:]:
        return 0
    hash_a, hash_b = image_hashes(a), image_hashes(b)
    candidates = np.flatnonzero(np.isin(hash_b, hash_a))
    if candidates.size == 0:
        return 0
    order = np.argsort(hash_a, kind="stable")
    first = order[np.searchsorted(hash_a[order], hash_b[candidates])]
    flat_a, flat_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    same = (flat_a[first] == flat_b[candidates]).all(axis=1)
    return int(same.sum())


def find_overlaps(bench: Benchmark) -> dict[str, int]:
    """For every OOD set (``group/name``): how many of its images are identical to an ID image."""
    id_parts = [s.inputs for s in (bench.train, bench.val, bench.test) if isinstance(s.inputs, np.ndarray)]
    if not id_parts or len({p.shape[1:] for p in id_parts}) != 1:
        return {}
    id_images = np.concatenate(id_parts)
    overlaps = {}
    for name, split in bench.datasets().items():
        if name in ID_KEYS or not isinstance(split.inputs, np.ndarray):
            continue
        shared = count_shared(id_images, split.inputs)
        if shared:
            overlaps[name] = shared
    return overlaps


# -- the spec ----------------------------------------------------------------------------------------------------
def load_benchmark_dir(folder: str | Path, check_overlap: bool = True) -> Benchmark:
    """Load a benchmark folder (see module docstring); warns when ID and OOD sets share images."""
    folder = Path(folder)
    spec_path = folder / "benchmark.toml" if folder.is_dir() else folder
    if not spec_path.exists():
        raise FileNotFoundError(f"no benchmark.toml in {folder}")
    try:
        spec = tomllib.loads(spec_path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{spec_path}: not valid TOML: {error}") from error
    root = spec_path.parent
    for key in ("name", "id", "ood"):
        if key not in spec:
            raise ValueError(f"{spec_path}: missing key {key!r}")
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise ValueError(f"{spec_path}: unknown keys {sorted(unknown)}; known: {sorted(TOP_KEYS)}")
    size = spec.get("image_size")
    if size is not None and not (isinstance(size, int) and size > 0):
        raise ValueError(f"{spec_path}: image_size must be a positive integer, got {size!r}")
    image_root = root / spec["image_root"] if "image_root" in spec else None
    unknown = set(spec["id"]) - set(ID_KEYS)
    if unknown:
        raise ValueError(f"{spec_path}: unknown keys in [id]: {sorted(unknown)}; [id] takes train, val, test")
    splits = {}
    sources: dict[str, str] = {}
    for role in ID_KEYS:
        if role not in spec["id"]:
            raise ValueError(f"{spec_path}: [id] needs {role!r}")
        splits[role] = load_source(spec["id"][role], root, size, False, f"{spec_path} [id].{role}", image_root)
        sources[role] = str(spec["id"][role])
    if not isinstance(spec["ood"], dict) or not all(isinstance(v, dict) for v in spec["ood"].values()):
        raise ValueError(f"{spec_path}: [ood] must hold tables [ood.<group>] mapping dataset names to files")
    ood: dict[str, dict[str, Split]] = {}
    for group, sets in spec["ood"].items():
        _warn_near_reserved(spec_path, group)
        ood[group] = {}
        for name, entry in sets.items():
            where = f"{spec_path} [ood.{group}].{name}"
            ood[group][name] = load_source(entry, root, size, True, where, image_root)
            sources[f"{'ood_val' if group == 'val' else group}/{name}"] = str(entry)
    ood_val = ood.pop("val", {})
    bench = Benchmark(name=spec["name"], ood=ood, ood_val=ood_val, **splits)
    bench.sources = {name: sources[name] for name in bench.datasets()}
    if check_overlap:
        bench.overlaps = find_overlaps(bench)
        for name, count in bench.overlaps.items():
            warnings.warn(f"benchmark {bench.name!r}: {count} of {len(bench.datasets()[name])} images of OOD set "
                          f"{name!r} are identical to ID images", OverlapWarning, stacklevel=2)
    return bench


def select_groups(bench: Benchmark, groups: str | list[str] | None) -> Benchmark:
    """Keep only the OOD groups named in ``groups`` (``"near,far"``); unknown names raise ``ValueError``."""
    if groups is None or groups == "all":
        return bench
    names = [g.strip() for g in groups.split(",") if g.strip()] if isinstance(groups, str) else list(groups)
    unknown = [g for g in names if g not in bench.ood]
    if unknown or not names:
        raise ValueError(f"unknown OOD group(s) {unknown or names} for benchmark {bench.name!r}; "
                         f"its groups are {', '.join(bench.ood)}")
    bench.ood = {g: bench.ood[g] for g in names}
    return bench
