"""The built-in ``cifar10`` benchmark (OpenOOD v1.5 protocol at 32 x 32), built from the published datasets.

``oodscope bench cifar10 --model cifar10_resnet20`` downloads, once, into ``--data-root`` (or ``$OODSCOPE_DATA``,
default ``~/.cache/oodscope/data``):

* CIFAR-10 and CIFAR-100 (python pickles) and MNIST through torchvision (``pip install oodscope[vision]``;
  torchvision checks their md5 sums). Batch files already in the data root are checked against the same
  published md5 sums (:data:`CIFAR_MD5`) before they are read, and read with an unpickler that builds only
  dicts, lists, strings, numbers and plain numpy arrays (:func:`read_cifar_batch`): a planted file can run no code;
* Tiny ImageNet (``tiny-imagenet-200.zip``) and the Describable Textures Dataset (``dtd-r1.0.1.tar.gz``) from
  their published URLs, md5-checked (:data:`ARCHIVES`).

It then builds a benchmark folder ``<data-root>/oodscope-cifar10/`` (``.npz`` files + ``benchmark.toml``, see
:mod:`oodscope.data.spec`) and loads it like any other folder:

* ID train: the first 1,000 images per class of the CIFAR-10 train set (in file order); val: the first 100
  test images per class; test: the other 900 per class;
* near-OOD: CIFAR-100 test, Tiny ImageNet; far-OOD: MNIST test (gray, 28 -> 32, 3 channels), Textures (DTD);
* OOD val (tuning only): Tiny ImageNet.

For Tiny ImageNet OpenOOD v1.5 uses image lists (``benchmark_imglist/cifar10/test_tin.txt`` / ``val_tin.txt``,
images under ``images_classic/``). Put OpenOOD's ``benchmark_imglist`` and ``images_classic`` folders in the data
root and they are used as is; otherwise Tiny ImageNet's validation images (sorted by name) give the OOD val
set (the first 1,000) and the near-OOD test set (the rest), which is not OpenOOD's exact list. Images that are
not 32 x 32 are resized (shorter side, bilinear, antialiased) and center-cropped. Nothing is downloaded when
the files are already there, so a prepared data root works offline.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle  # only for the restricted unpickler of the CIFAR batches (read_cifar_batch): no class allowed
from pathlib import Path

import numpy as np

from .spec import IMAGE_SUFFIXES, load_benchmark_dir, load_image_list, read_image

ARCHIVES = {
    "tin": ("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de"),
    "dtd": ("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz", "fff73e5086ae6bdbea199a49dfb8a4c1"),
}
# md5 of the published CIFAR python batches, checked before a batch is read, and of the archives (checked by
# torchvision when it downloads them); the values of torchvision's CIFAR10/CIFAR100 datasets
CIFAR_MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
    "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
    "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
}
SPEC = """# built by oodscope.data.cifar10 (OpenOOD v1.5-style CIFAR-10 benchmark at 32 x 32)
name = "cifar10"
image_size = 32

[id]
train = "cifar10_train.npz"
val = "cifar10_val.npz"
test = "cifar10_test.npz"

[ood.val]
tin = "tin_val.npz"

[ood.near]
cifar100 = "cifar100_test.npz"
tin = "tin_test.npz"

[ood.far]
mnist = "mnist_test.npz"
textures = "textures.npz"
"""


def data_root(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$OODSCOPE_DATA``, else ``~/.cache/oodscope/data``."""
    return Path(path or os.environ.get("OODSCOPE_DATA") or Path.home() / ".cache" / "oodscope" / "data")


def _torchvision(what: str):
    try:
        import torchvision.datasets as datasets
    except ImportError as error:
        raise ValueError(f"the cifar10 benchmark needs {what}; install torchvision (pip install 'oodscope[vision]') "
                         "to download it, or put the files in the data root (--data-root / OODSCOPE_DATA)") from error
    return datasets


# -- readers of the published formats ------------------------------------------------------------------------------
def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_md5(path: Path, relative: str) -> None:
    """Raise ``ValueError`` unless ``path`` has the published md5 of ``relative`` (see :data:`CIFAR_MD5`)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (the folder is incomplete: delete {path.parent} to download "
                                "it again)")
    expected, found = CIFAR_MD5[relative], _md5(path)
    if found != expected:
        raise ValueError(f"{path}: md5 {found} is not the published {expected} of {relative}; the file is corrupt "
                         f"or not the CIFAR release (delete {path.parent} to download it again)")


# what the unpickler may build for an array: numpy's array reconstruction (old and new module names)
_ARRAY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"),
                  ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


def _plain_dtype(*args: object) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object dtypes are not allowed")
    return dtype


class _BatchUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings, bytes, numbers and plain (non-object) numpy arrays, nothing else:
    ``find_class`` refuses every other global, so no constructor or function of the file's choice runs."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ARRAY_GLOBALS:
            import importlib

            if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 moved numpy.core
                module = "numpy._core." + module[len("numpy.core."):]
            value = getattr(importlib.import_module(module), name)
            return _plain_dtype if value is np.dtype else value
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def read_cifar_batch(path: Path) -> dict:
    """One CIFAR python batch (a pickled dict of byte-string keys) with :class:`_BatchUnpickler`."""
    try:
        batch = _BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise ValueError(f"{path}: not a CIFAR python batch ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (a {type(batch).__name__}, not a dict)")
    return batch


def _read_cifar_pickles(files: list[Path], label_key: bytes, root: Path | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for file in files:
        if root is not None:  # published files: their md5 first
            verify_md5(file, file.relative_to(root).as_posix())
        batch = read_cifar_batch(file)
        if b"data" not in batch or label_key not in batch:
            raise ValueError(f"{file}: a CIFAR batch needs {b'data'!r} and {label_key!r}, has {sorted(batch)}")
        data = np.asarray(batch[b"data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{file}: CIFAR images must be uint8 N x 3072, got {data.dtype} {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        label_values = np.asarray(batch[label_key])
        if label_values.shape != (len(data),) or label_values.dtype.kind not in "iu":
            raise ValueError(f"{file}: {len(data)} images need {len(data)} integer labels, got "
                             f"{label_values.dtype} {label_values.shape}")
        labels.append(label_values.astype(np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def cifar10(root: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    folder = root / "cifar-10-batches-py"
    if not folder.exists():
        _torchvision("CIFAR-10").CIFAR10(str(root), train=True, download=True)
    train = _read_cifar_pickles([folder / f"data_batch_{i}" for i in range(1, 6)], b"labels", root)
    return train, _read_cifar_pickles([folder / "test_batch"], b"labels", root)


def cifar100_test(root: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-100-python"
    if not folder.exists():
        _torchvision("CIFAR-100").CIFAR100(str(root), train=False, download=True)
    return _read_cifar_pickles([folder / "test"], b"fine_labels", root)


def mnist_test(root: Path) -> np.ndarray:
    """MNIST test digits as uint8 N x 32 x 32 x 3 (bilinear 28 -> 32, gray copied to 3 channels)."""
    raw = root / "MNIST" / "raw"
    path = raw / "t10k-images-idx3-ubyte"
    if not path.exists() and not path.with_suffix(".gz").exists():
        _torchvision("MNIST").MNIST(str(root), train=False, download=True)
    data = path.read_bytes() if path.exists() else gzip.decompress(path.with_suffix(".gz").read_bytes())
    if int.from_bytes(data[:4], "big") != 2051:
        raise ValueError(f"{path}: not an IDX image file (bad magic number)")
    n, rows, cols = (int.from_bytes(data[4 * i:4 * i + 4], "big") for i in (1, 2, 3))
    digits = np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols).copy()
    import torch
    import torch.nn.functional as F

    resized = F.interpolate(torch.as_tensor(digits, dtype=torch.float32)[:, None], size=(32, 32),
                            mode="bilinear", align_corners=False, antialias=True)
    gray = np.clip(np.rint(resized[:, 0].numpy()), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=3)


def _download(root: Path, key: str) -> None:
    url, md5 = ARCHIVES[key]
    _torchvision(f"the {key} archive")  # a clear error when torchvision is missing
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(url, str(root), md5=md5)


def _read_folder(paths: list[Path]) -> np.ndarray:
    if not paths:
        raise ValueError("no images found")
    return np.stack([read_image(p, 32) for p in paths])


def tiny_imagenet(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(OOD val, near-OOD test) images: OpenOOD's lists when present, else the sorted TIN validation images."""
    lists = root / "benchmark_imglist" / "cifar10"
    if (lists / "test_tin.txt").exists() and (lists / "val_tin.txt").exists():
        images_root = root / "images_classic"
        return (load_image_list(lists / "val_tin.txt", images_root, 32, ood=True).inputs,
                load_image_list(lists / "test_tin.txt", images_root, 32, ood=True).inputs)
    folder = root / "tiny-imagenet-200" / "val" / "images"
    if not folder.exists():
        _download(root, "tin")
    images = _read_folder(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
    split = min(1000, len(images) // 2)
    return images[:split], images[split:]


def textures(root: Path) -> np.ndarray:
    folder = root / "dtd" / "images"
    if not folder.exists():
        _download(root, "dtd")
    return _read_folder(sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))


def first_per_class(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices (in order) of the first ``count`` samples of every class."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(labels)) - starts  # position of each sample within its class
    return np.sort(order[rank < count])


def build(root: str | os.PathLike | None = None, n_train_per_class: int = 1000, n_val_per_class: int = 100) -> Path:
    """Write ``<root>/oodscope-cifar10/`` (npz + benchmark.toml) from the published data; returns the folder."""
    root = data_root(root)
    out = root / "oodscope-cifar10"
    if (out / "benchmark.toml").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    (train_x, train_y), (test_x, test_y) = cifar10(root)
    keep = first_per_class(train_y, n_train_per_class)
    val = first_per_class(test_y, n_val_per_class)
    test = np.setdiff1d(np.arange(len(test_y)), val)
    c100_x, c100_y = cifar100_test(root)
    tin_val, tin_test = tiny_imagenet(root)
    ood = lambda n: np.full(n, -1, np.int64)  # noqa: E731
    arrays = {
        "cifar10_train": (train_x[keep], train_y[keep]), "cifar10_val": (test_x[val], test_y[val]),
        "cifar10_test": (test_x[test], test_y[test]), "cifar100_test": (c100_x, c100_y),
        "tin_val": (tin_val, ood(len(tin_val))), "tin_test": (tin_test, ood(len(tin_test))),
        "mnist_test": (mnist := mnist_test(root), ood(len(mnist))),
        "textures": (tex := textures(root), ood(len(tex))),
    }
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in arrays.items():
        np.savez(tmp / f"{name}.npz", images=images, labels=labels)
    (tmp / "benchmark.toml").write_text(SPEC)
    tmp.rename(out)
    return out


def prepare(request):
    """``oodscope bench cifar10``: build (once) and load the benchmark; the model defaults to ResNet-20."""
    from ..models.zoo import load_model
    from .builtin import Prepared

    bench = load_benchmark_dir(build(request.data_root))
    name = request.model or "cifar10_resnet20"
    model, preprocess = load_model(name, request.weights)
    return Prepared(bench, model, preprocess, name)
