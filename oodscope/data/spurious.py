"""A spurious-correlation split of an image benchmark: a coloured frame that goes with the class in training only.

Spurious OOD (Ming, Yin & Li, "On the Impact of Spurious Correlation for Out-of-Distribution Detection", AAAI
2022; the Waterbirds setting of ASCOOD): an environmental feature correlates with the label in the training data
but does not define the class, and OOD inputs that carry it are hard to reject. Built here from any benchmark of
uint8 ``N x H x W x 3`` images by painting a ``width``-pixel frame around every image:

* **train**: the frame has the colour of the image's class (:data:`PALETTE`, one colour per class) with
  probability ``correlation`` (default 0.9, Waterbirds' level), otherwise one of the other classes' colours,
  uniformly;
* **val / test** (ID): a uniformly random palette colour, independent of the class (the correlation is broken: the
  accuracy there is that of the invariant features);
* **OOD**: every OOD set twice, in group ``"spurious"`` with a uniformly random palette colour (each OOD image
  carries the cue of some class; set ``NAME+class-frame``) and in group ``"non-spurious"`` with a neutral grey
  frame that no class has (``NAME+grey-frame``).

Seeded; the images inside the frame are unchanged.
"""

from __future__ import annotations

import numpy as np

from .benchmark import Benchmark, Split

#: frame colours, one per class (the first ``K`` are used; matplotlib's tab10, then more distinct colours)
PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                    [140, 86, 75], [227, 119, 194], [188, 189, 34], [23, 190, 207], [255, 255, 255],
                    [0, 0, 0], [255, 0, 255], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], np.uint8)
NEUTRAL = np.array([127, 127, 127], np.uint8)  # the non-spurious OOD frame: no class has it


def paint_frame(images: np.ndarray, colours: np.ndarray, width: int) -> np.ndarray:
    """A copy of ``images`` (``N x H x W x 3`` uint8) with a ``width``-pixel frame of ``colours[i]`` on image ``i``."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"spurious frame: expected uint8 N x H x W x 3 images, got {images.dtype} {images.shape}")
    h, w = images.shape[1:3]
    if not (isinstance(width, (int, np.integer)) and 1 <= width and 2 * width < min(h, w)):
        raise ValueError(f"spurious frame: width must be an integer in [1, {(min(h, w) - 1) // 2}] for {h} x {w} "
                         f"images, got {width!r}")
    frame = np.ones((h, w), bool)
    frame[width:h - width, width:w - width] = False
    out = images.copy()
    out[:, frame] = np.asarray(colours, np.uint8).reshape(len(images), 1, 3)
    return out


def spurious_colours(labels: np.ndarray, n_classes: int, correlation: float, rng: np.random.Generator) -> np.ndarray:
    """Per image, its class's palette index with probability ``correlation``, else another class's, uniformly."""
    labels = np.asarray(labels)
    other = (labels + rng.integers(1, n_classes, len(labels))) % n_classes  # uniform over the K - 1 others
    return np.where(rng.random(len(labels)) < correlation, labels, other)


def spurious_benchmark(bench: Benchmark, correlation: float = 0.9, width: int = 2, seed: int = 0) -> Benchmark:
    """The benchmark with the class-correlated frame in training, broken in val/test, and spurious / non-spurious
    copies of its OOD sets (see the module docstring)."""
    if not (isinstance(correlation, (int, float)) and 0 <= correlation <= 1):
        raise ValueError(f"spurious split: correlation must lie in [0, 1], got {correlation!r}")
    labels = np.asarray(bench.train.labels)
    n_classes = int(labels.max()) + 1
    if labels.min() < 0 or n_classes < 2 or n_classes > len(PALETTE):
        raise ValueError(f"spurious split: needs 2 to {len(PALETTE)} classes with labels >= 0, got labels "
                         f"{labels.min()}..{labels.max()}")
    rng = np.random.default_rng(seed)

    def random_cue(split: Split) -> Split:
        return Split(paint_frame(split.inputs, PALETTE[rng.integers(0, n_classes, len(split))], width), split.labels)

    train = Split(paint_frame(bench.train.inputs, PALETTE[spurious_colours(labels, n_classes, correlation, rng)],
                              width), labels)
    sets = {name: split for group in bench.ood.values() for name, split in group.items()}
    ood = {"spurious": {f"{name}+class-frame": random_cue(split) for name, split in sets.items()},
           "non-spurious": {f"{name}+grey-frame": Split(paint_frame(split.inputs, np.tile(NEUTRAL, (len(split), 1)),
                                                                    width), split.labels)
                            for name, split in sets.items()}}
    return Benchmark(name=f"{bench.name}-spurious{correlation:g}", train=train, val=random_cue(bench.val),
                     test=random_cue(bench.test), ood=ood, class_names=list(bench.class_names))
