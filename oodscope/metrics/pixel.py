"""Image- and pixel-level metrics of visual anomaly detection (anomaly maps against ground-truth masks).

All functions take ``maps`` ``(N, H, W)`` (higher = more anomalous) and boolean ``masks`` ``(N, H, W)`` and are
vectorised (sorting and cumulative sums over all pixels; connected components of the whole stack at once).

* ``pixel_auroc``: AUROC over all pixels of all test images, defect pixels positive (MVTec AD protocol).
* ``aupro``: area under the per-region-overlap curve (Bergmann et al., "The MVTec Anomaly Detection Dataset",
  IJCV 2021, Sec. 5.2): ``PRO(t) = mean_k |C_k ∩ {A >= t}| / |C_k|`` over all connected defect regions ``C_k``
  (8-connectivity) against ``FPR(t)`` over all defect-free pixels, integrated from FPR 0 to ``fpr_limit`` (0.3)
  and divided by ``fpr_limit`` (so 1 is perfect). The step curve is computed exactly at every distinct score and
  integrated with the trapezoidal rule, the curve being interpolated linearly at ``fpr_limit``.
* ``f1_max``: the best F1 score over all thresholds (image level by default; anomalib's ``F1Max``).
* ``pimo`` / ``aupimo``: Bertoldo et al., "AUPIMO: Redefining Visual Anomaly Detection Benchmarks with High Speed
  and Low Tolerance" (2024), Sec. 3. Thresholds are shared by all images and set on the *normal* images only:
  the shared FPR is the mean over normal images of each image's FPR (Eq. 2), each anomalous image gets its own
  TPR curve ``TPR_i(t)`` (Eq. 1), and ``AUPIMO_i = ∫ TPR_i d log(FPR) / log(U/L)`` over ``FPR ∈ [L, U] =
  [1e-5, 1e-4]`` (Eq. 3). One score per anomalous image; the benchmark number is their mean. The integral is
  evaluated on ``n_points`` thresholds at log-spaced shared-FPR levels in ``[L, U]`` (trapezoidal rule in
  ``log FPR``).
"""

from __future__ import annotations

import numpy as np

from .ood import auroc


def _check_maps(maps: np.ndarray, masks: np.ndarray, who: str) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"{who}: maps and masks must both be (N, H, W) and equal; got {maps.shape} and {masks.shape}")
    if masks.dtype != bool:
        if not np.isin(masks, (0, 1)).all():
            raise ValueError(f"{who}: masks must be boolean (or 0/1); binarise them first (e.g. mask > 127)")
        masks = masks.astype(bool)
    if not np.isfinite(maps).all():
        raise ValueError(f"{who}: {int((~np.isfinite(maps)).sum())} anomaly-map values are NaN or inf")
    return maps, masks


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of image scores, anomalous (label 1) against normal (label 0)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    return auroc(scores[~labels], scores[labels])


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """AUROC over all pixels (defect pixels positive)."""
    maps, masks = _check_maps(maps, masks, "pixel_auroc")
    if not masks.any() or masks.all():
        raise ValueError("pixel_auroc needs both defect and defect-free pixels in the masks")
    return auroc(maps[~masks], maps[masks])


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Largest F1 over all thresholds ``score >= t`` (positive = label 1)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    if not labels.any():
        raise ValueError("f1_max needs at least one positive (anomalous) sample")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[ends].astype(np.float64)
    predicted = (ends + 1).astype(np.float64)
    f1 = 2 * tp / (predicted + labels.sum())
    return float(f1.max())


def _regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected defect regions (8-connectivity within each image, never across images) of the mask stack."""
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    return ndimage.label(masks, structure=structure)


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, pro, thresholds)`` at every distinct score, thresholds decreasing, starting at ``(0, 0)``."""
    maps, masks = _check_maps(maps, masks, "aupro")
    labels, n_regions = _regions(masks)
    if n_regions == 0:
        raise ValueError("aupro needs at least one defect region in the masks")
    n_normal = int((~masks).sum())
    if n_normal == 0:
        raise ValueError("aupro needs defect-free pixels to compute the FPR")
    labels = labels.ravel()
    sizes = np.bincount(labels, minlength=n_regions + 1).astype(np.float64)
    # each defect pixel adds 1 / (|C_k| * K) to PRO; each defect-free pixel adds 1 / n_normal to FPR
    pro_step = np.where(labels > 0, 1.0 / (sizes[labels] * n_regions), 0.0)
    values = maps.ravel()
    order = np.argsort(-values, kind="stable")
    values = values[order]
    ends = np.r_[np.flatnonzero(np.diff(values)), values.size - 1]
    pro = np.cumsum(pro_step[order])[ends]
    fpr = np.cumsum(labels[order] == 0)[ends] / n_normal  # integer counts: the last FPR is exactly 1
    return np.r_[0.0, fpr], np.r_[0.0, pro], np.r_[np.inf, values[ends]]


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (see module docstring)."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro, _ = pro_curve(maps, masks)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:
        nxt = np.flatnonzero(~keep)[0]
        frac = (fpr_limit - fpr[nxt - 1]) / (fpr[nxt] - fpr[nxt - 1])
        x = np.r_[x, fpr_limit]
        y = np.r_[y, pro[nxt - 1] + frac * (pro[nxt] - pro[nxt - 1])]
    return float(np.trapezoid(y, x) / fpr_limit)


def pimo(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray | None = None,
         fpr_bounds: tuple[float, float] = (1e-5, 1e-4), n_points: int = 300
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image overlap curves: ``(shared_fpr (T,), tprs (n_anomalous, T), thresholds (T,))``; a pixel counts as
    positive when its score is above the threshold.

    ``labels`` (1 = anomalous) defaults to "mask has a defect pixel". Thresholds are the normal-pixel scores at
    which the shared FPR first reaches ``n_points`` log-spaced levels in ``fpr_bounds`` (Bertoldo et al. 2024).
    """
    maps, masks = _check_maps(maps, masks, "pimo")
    labels = masks.reshape(len(masks), -1).any(axis=1) if labels is None else np.asarray(labels).astype(bool)
    low, high = fpr_bounds
    if not 0.0 < low < high <= 1.0:
        raise ValueError(f"pimo: fpr_bounds must satisfy 0 < low < high <= 1, got {fpr_bounds}")
    normal, anomalous = maps[~labels], maps[labels]
    if len(normal) == 0 or len(anomalous) == 0:
        raise ValueError("pimo needs normal images (to set thresholds) and anomalous images (to score)")
    empty = np.flatnonzero(~masks[labels].reshape(int(labels.sum()), -1).any(axis=1))
    if empty.size:
        raise ValueError(f"pimo: {empty.size} anomalous images have an empty mask (e.g. index "
                         f"{np.flatnonzero(labels)[empty[0]]}); their TPR is undefined")
    pixels = np.sort(normal.ravel())[::-1]
    n = pixels.size
    if low * n < 1:
        raise ValueError(f"pimo: the normal images hold {n} pixels, too few to reach a shared FPR of {low:g} "
                         f"(need at least {int(np.ceil(1 / low))}); use more normal images or larger fpr_bounds")
    # shared FPR = mean over normal images of their FPR = pooled FPR (all images have the same size). For a
    # level reached by c normal pixels, the thresholds that give exactly that FPR form (pixels[c], pixels[c-1]];
    # like a dense threshold sweep, the curve takes the lowest of them (the largest TPR at that FPR): a pixel
    # is positive when its score is *above* pixels[c].
    levels = np.geomspace(low, high, n_points)
    counts = np.ceil(levels * n - 1e-9).astype(np.int64)
    thresholds = pixels[np.clip(counts, 0, n - 1)]
    above = n - np.searchsorted(pixels[::-1], thresholds, side="right")  # normal pixels > threshold
    shared_fpr = above / n
    # per anomalous image: share of its defect pixels >= each threshold, one searchsorted over all images
    flat = anomalous.reshape(len(anomalous), -1)
    defect = masks[labels].reshape(len(anomalous), -1)
    values = np.where(defect, flat, -np.inf)
    values.sort(axis=1)
    width = values.shape[1]
    offsets = np.arange(len(values))[:, None]
    # rank-transform so that rows can be searched together: (row, value) -> row * (M + 1) + rank(value)
    pooled = np.unique(np.concatenate([values[np.isfinite(values)], thresholds]))
    rank_v = np.where(np.isfinite(values), np.searchsorted(pooled, values), -1)
    rank_t = np.searchsorted(pooled, thresholds)
    stride = pooled.size + 2
    keyed = (rank_v + 1 + offsets * stride).ravel()
    queries = (rank_t[None, :] + 1 + offsets * stride)
    below = np.searchsorted(keyed, queries.ravel(), side="right").reshape(queries.shape) - offsets * width
    n_defect = defect.sum(axis=1)[:, None]
    tprs = (width - below) / n_defect
    return shared_fpr, tprs, thresholds


def aupimo(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray | None = None,
           fpr_bounds: tuple[float, float] = (1e-5, 1e-4), n_points: int = 300) -> np.ndarray:
    """AUPIMO of every anomalous image (Bertoldo et al. 2024, Eq. 3), in [0, 1]; report the mean."""
    fpr, tprs, _ = pimo(maps, masks, labels, fpr_bounds, n_points)
    x = np.log(np.clip(fpr, fpr_bounds[0], fpr_bounds[1]))
    return np.trapezoid(tprs, x, axis=1) / np.log(fpr_bounds[1] / fpr_bounds[0])
