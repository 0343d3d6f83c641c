"""Synthetic OOD unit tests: inputs that any reasonable detector should flag.

Bitterwolf, Müller & Hein, "In or Out? Fixing ImageNet Out-of-Distribution Detection Evaluation", ICML 2023 (the
NINCO paper's "OOD unit tests": noise, constant and simple synthetic images that are OOD for any natural-image
task). Each test set has ``n`` images of the ID test set's size (uint8, seeded):

* ``uniform_noise``: pixels uniform in 0..255; ``gaussian_noise``: N(128, 64^2) per pixel, clipped;
* ``rademacher``: each pixel 0 or 255 with probability 1/2;
* ``constant``: one uniform random colour per image;
* ``blobs``: Gaussian-smoothed noise thresholded at its median, two random colours (NINCO's blobs);
* ``low_freq_noise``: uniform noise on a 4 x 4 grid upsampled bilinearly to full size;
* ``inverted_id``: ``255 - x`` of ID test images; ``shuffled_patches_id``: ID test images cut into a 4 x 4 grid of
  patches, shuffled per image.

A detector **passes** a test when its AUROC (ID test vs the test set) is at least ``bar`` (90 by default).
"""

from __future__ import annotations

from typing import Any

import numpy as np

TESTS = ("uniform_noise", "gaussian_noise", "rademacher", "constant", "blobs", "low_freq_noise", "inverted_id",
         "shuffled_patches_id")
BAR = 90.0
N_IMAGES = 1000


def _smooth(noise: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(noise, sigma=(0, sigma, sigma))


def make_test(name: str, id_images: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """The ``n`` images of unit test ``name`` at the size of ``id_images`` (``N x H x W x 3`` uint8)."""
    rng = np.random.default_rng([seed, TESTS.index(name)])
    _, h, w, c = id_images.shape
    if name == "uniform_noise":
        return rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    if name == "gaussian_noise":
        return np.clip(rng.normal(128.0, 64.0, (n, h, w, c)), 0, 255).astype(np.uint8)
    if name == "rademacher":
        return (rng.integers(0, 2, (n, h, w, c)) * 255).astype(np.uint8)
    if name == "constant":
        return np.broadcast_to(rng.integers(0, 256, (n, 1, 1, c), dtype=np.uint8), (n, h, w, c)).copy()
    if name == "blobs":
        field = _smooth(rng.normal(size=(n, h, w)), sigma=max(h, w) / 10)
        mask = field > np.median(field.reshape(n, -1), axis=1)[:, None, None]
        colours = rng.integers(0, 256, (2, n, 1, 1, c), dtype=np.uint8)
        return np.where(mask[..., None], colours[0], colours[1]).astype(np.uint8)
    if name == "low_freq_noise":
        import torch

        coarse = torch.from_numpy(rng.uniform(0, 255, (n, c, 4, 4)).astype(np.float32))
        fine = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        return fine.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()
    picked = id_images[rng.choice(len(id_images), n, replace=len(id_images) < n)]
    if name == "inverted_id":
        return (255 - picked).astype(np.uint8)
    if name == "shuffled_patches_id":
        ph, pw = h // 4, w // 4
        patches = picked[:, :4 * ph, :4 * pw].reshape(n, 4, ph, 4, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(
            n, 16, ph, pw, c)
        order = rng.permuted(np.tile(np.arange(16), (n, 1)), axis=1)
        shuffled = patches[np.arange(n)[:, None], order].reshape(n, 4, 4, ph, pw, c).transpose(0, 1, 3, 2, 4, 5)
        out = picked.copy()
        out[:, :4 * ph, :4 * pw] = shuffled.reshape(n, 4 * ph, 4 * pw, c)
        return out
    raise ValueError(f"unknown unit test {name!r}; known: {', '.join(TESTS)}")


def run(context, bar: float = BAR, n: int | None = None) -> list[dict[str, Any]]:
    n = n or N_IMAGES
    from ..evaluation import METRICS
    from ..metrics import ood_metrics

    images = context.bench.test.inputs
    if not (isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype == np.uint8):
        raise ValueError("--protocol unit-tests needs an ID test set of uint8 N x H x W x C images")
    id_scores = {label: context.scores(label, context.results.id_name) for label in context.detectors}
    records = []
    for test in TESTS:
        outputs = context.extract(make_test(test, images, n, context.seed), f"unit-{test}")
        for label, detector in context.detectors.items():
            values = ood_metrics(id_scores[label], detector.score(outputs))
            record = {"detector": label, "dataset": test, "group": "unit-tests",
                      **{k: 100.0 * values[k] for k in METRICS}, "setting": "unit-tests"}
            record["passed"] = bool(record["auroc"] >= bar)
            record["bar"] = bar
            records.append(record)
    return records


def format_records(records: list[dict[str, Any]]) -> str:
    from ..results_io import format_table

    detectors = list(dict.fromkeys(r["detector"] for r in records))
    tests = list(dict.fromkeys(r["dataset"] for r in records))
    cell = {(r["detector"], r["dataset"]): r["auroc"] for r in records}
    bar = records[0]["bar"] if records else BAR
    rows = [{"detector": d, **{t: cell[(d, t)] for t in tests},
             "passed": sum(cell[(d, t)] >= bar for t in tests)} for d in detectors]
    rows.append({"detector": f"share passing (AUROC >= {bar:g})",
                 **{t: 100.0 * np.mean([cell[(d, t)] >= bar for d in detectors]) for t in tests},
                 "passed": None})
    columns = [("detector", "detector", "")] + [(t.replace("_", "\n", 1), t, ".1f") for t in tests] + \
        [("passed", "passed", "")]
    return "OOD unit tests (AUROC, ID test vs each synthetic set)\n" + format_table(rows, columns)
