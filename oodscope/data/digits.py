"""The default benchmark, ``digits``: built only from data that scikit-learn ships (no download).

* ID: handwritten digits 0-4 of ``sklearn.datasets.load_digits`` (8 x 8, values 0-16), split per class into
  train 60 % / val 10 % / test 30 % with a fixed seed.
* ``near``: the digits 5-9 (same sensor and style, new classes: semantic shift).
* ``far``: 8 x 8 grayscale patches cut from the photographs of ``load_sample_images`` (china, flower),
  downsampled by block averaging and rescaled to the digits' 0-16 range.
* ``covariate``: the ID test digits rotated by 20-45 degrees and noised; same classes, new appearance. It is
  reported as its own group, to show how much each detector reacts to covariate shift.
"""

from __future__ import annotations

import numpy as np

from .benchmark import Benchmark, Split

ID_CLASSES = (0, 1, 2, 3, 4)


def _split_per_class(labels: np.ndarray, rng: np.random.Generator,
                     shares: tuple[float, float] = (0.6, 0.1)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    train, val, test = [], [], []
    for label in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == label))
        n_train, n_val = int(round(shares[0] * len(index))), int(round(shares[1] * len(index)))
        train.append(index[:n_train]), val.append(index[n_train:n_train + n_val]), test.append(index[n_train + n_val:])
    return tuple(np.sort(np.concatenate(parts)) for parts in (train, val, test))


def photo_patches(n: int, rng: np.random.Generator, block: int = 6) -> np.ndarray:
    """``n`` 8 x 8 patches (0-16) from scikit-learn's bundled sample photographs."""
    from sklearn.datasets import load_sample_images

    patches = []
    images = load_sample_images().images
    for photo_index, photo in enumerate(images):
        gray = photo.astype(np.float64).mean(axis=2)
        h, w = (gray.shape[0] // block) * block, (gray.shape[1] // block) * block
        small = gray[:h, :w].reshape(h // block, block, w // block, block).mean(axis=(1, 3))
        count = n // len(images) + (photo_index < n % len(images))
        rows = rng.integers(0, small.shape[0] - 8, count)
        cols = rng.integers(0, small.shape[1] - 8, count)
        windows = np.lib.stride_tricks.sliding_window_view(small, (8, 8))[rows, cols]
        patches.append(windows)
    patches = np.concatenate(patches)
    low = patches.min(axis=(1, 2), keepdims=True)
    span = np.maximum(patches.max(axis=(1, 2), keepdims=True) - low, 1e-9)
    return ((patches - low) / span * 16.0).astype(np.float32)


def covariate_shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate each image by +-20-45 degrees and add Gaussian noise (sd 2 on the 0-16 scale)."""
    from scipy.ndimage import rotate

    angles = rng.uniform(20, 45, len(images)) * rng.choice([-1, 1], len(images))
    rotated = np.stack([rotate(image, angle, reshape=False, order=1, mode="constant")
                        for image, angle in zip(images, angles)])
    noisy = rotated + rng.normal(0.0, 2.0, rotated.shape)
    return np.clip(noisy, 0.0, 16.0).astype(np.float32)


def load_digits_benchmark(seed: int = 0) -> Benchmark:
    """Build the ``digits`` benchmark deterministically from ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images.astype(np.float32), digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    is_id = np.isin(labels, ID_CLASSES)
    id_images, id_labels = images[is_id], labels[is_id]
    train, val, test = _split_per_class(id_labels, rng)
    near = images[~is_id]
    far = photo_patches(len(near), rng)
    shifted = covariate_shift(id_images[test], rng)
    ood = lambda n: np.full(n, -1, dtype=np.int64)  # noqa: E731 - OOD label
    return Benchmark(
        name="digits",
        train=Split(id_images[train], id_labels[train]),
        val=Split(id_images[val], id_labels[val]),
        test=Split(id_images[test], id_labels[test]),
        ood={"near": {"digits5-9": Split(near, ood(len(near)))},
             "far": {"photo-patches": Split(far, ood(len(far)))},
             "covariate": {"rotated-noisy": Split(shifted, ood(len(shifted)))}},
        class_names=[str(c) for c in ID_CLASSES],
    )


def prepare(request):
    """``oodscope bench digits``: the benchmark and its small CNN (trained once, then reused from the cache)."""
    from pathlib import Path

    from ..extraction.cache import default_cache_dir
    from ..models.digits_cnn import digits_preprocess, train_digits_cnn
    from .builtin import Prepared

    if request.model is not None:
        raise ValueError("the digits benchmark trains its own classifier; --model does not apply")
    bench = load_digits_benchmark(request.seed)
    weights = Path(request.cache_dir or default_cache_dir()) / "models" / f"digits_cnn-v1-seed{request.seed}.pt"
    model = train_digits_cnn(bench.train.inputs, bench.train.labels, n_classes=len(bench.class_names),
                             seed=request.seed, cache_path=weights)
    return Prepared(bench, model, digits_preprocess(), "digits_cnn")
