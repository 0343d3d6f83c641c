"""Full-spectrum OOD evaluation: covariate-shifted ID images count as in-distribution.

Yang, Zhou & Liu, "Full-Spectrum Out-of-Distribution Detection", IJCV 2023: a detector should flag semantic
shift (new classes) but not covariate shift (the same classes under a new appearance). The shifted ID set here
is :func:`oodscope.data.corruptions.shifted_copy` of the ID test set (CIFAR-10-C-style corruptions).

Given the scores of an ordinary run (:class:`~oodscope.evaluation.Results`) and each detector's scores on the
shifted copy, :func:`full_spectrum_records` gives

* the full-spectrum metrics per OOD set: ID = clean test + shifted test (records with ``setting`` =
  ``"full-spectrum"``), and
* how much each detector reacts to the covariate shift alone (``setting`` = ``"shift-sensitivity"``, dataset
  = the shifted copy): AUROC/AUPR of clean test vs shifted test (50 = blind to the shift) and ``flagged``, the
  share of shifted ID images flagged as OOD at the threshold that keeps 95 % of the clean ID test
  (:func:`oodscope.thresholds.threshold_for_keep`; about 5 = no reaction): the false-alarm rate on shifted ID at
  95 % TPR on clean ID. With the shifted set in the OOD role of :func:`~oodscope.metrics.fpr_at_tpr` (which counts
  OOD *accepted*) it is ``100 (1 - fpr_at_tpr(clean, shifted))``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .evaluation import METRICS, Results
from .metrics import ood_metrics
from .thresholds import flag, threshold_for_keep

SHIFTED = "test_shifted"


def flagged_share(clean_scores: np.ndarray, shifted_scores: np.ndarray, keep: float = 0.95) -> float:
    """Percent of ``shifted_scores`` flagged at ``threshold_for_keep(clean_scores, keep)`` (the one rule of
    :mod:`oodscope.thresholds`), ``100 (1 - fpr_at_tpr(clean, shifted, keep))`` up to rounding."""
    threshold = threshold_for_keep(np.ravel(clean_scores), keep)
    shifted = np.ravel(np.asarray(shifted_scores, dtype=np.float64))
    if shifted.size == 0:
        raise ValueError("flagged_share: shifted_scores is empty")
    return float(100.0 * np.count_nonzero(flag(shifted, threshold)) / shifted.size)


def full_spectrum_records(results: Results, shifted_scores: Mapping[str, np.ndarray],
                          shifted_accuracy: float | None = None, shifted_name: str = SHIFTED
                          ) -> list[dict[str, Any]]:
    """Full-spectrum records per OOD set and group mean, then one shift-sensitivity record per detector."""
    records: list[dict[str, Any]] = []
    for detector, by_set in results.scores.items():
        if detector not in shifted_scores:
            raise ValueError(f"full spectrum: no scores of detector {detector!r} on {shifted_name!r}")
        clean, shifted = by_set[results.id_name], np.asarray(shifted_scores[detector])
        id_scores = np.concatenate([clean, shifted])
        for group, names in results.groups.items():
            rows = []
            for name in names:
                values = ood_metrics(id_scores, by_set[name])
                rows.append({"detector": detector, "dataset": name, "group": group,
                             **{k: 100.0 * values[k] for k in METRICS}, "setting": "full-spectrum"})
            records += rows
            records.append({"detector": detector, "dataset": "mean", "group": group,
                            **{k: float(np.mean([r[k] for r in rows])) for k in METRICS},
                            "setting": "full-spectrum"})
    for detector, by_set in results.scores.items():
        clean, shifted = by_set[results.id_name], np.asarray(shifted_scores[detector])
        values = ood_metrics(clean, shifted)
        record = {"detector": detector, "dataset": shifted_name, "group": "covariate_shift",
                  **{k: 100.0 * values[k] for k in METRICS}, "setting": "shift-sensitivity",
                  "flagged": flagged_share(clean, shifted)}
        if shifted_accuracy is not None:
            record["shifted_accuracy"] = shifted_accuracy
        records.append(record)
    return records


def score_shifted(bench: Any, model: Any, preprocess: Any, detectors: Mapping[str, Any], *, seed: int = 0,
                  **extract_options: Any) -> tuple[dict[str, np.ndarray], float | None, float]:
    """Build the shifted copy of ``bench.test``, extract it once (cached) and score it with fitted detectors.

    Returns ``(scores by detector, accuracy on the shifted copy in percent, seconds)``.
    """
    import time

    from .data.corruptions import shifted_copy
    from .evaluation import id_accuracy
    from .extraction.extract import extract

    images = bench.test.inputs
    if not (isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[3] == 3
            and images.dtype == np.uint8):
        raise ValueError(f"--full-spectrum needs an ID test set of uint8 N x H x W x 3 images; benchmark "
                         f"{bench.name!r} has {type(images).__name__} {getattr(images, 'shape', '')}")
    start = time.perf_counter()
    shifted, _ = shifted_copy(images, seed=seed)
    outputs = extract(model, (shifted, bench.test.labels), name=f"{bench.name}-{SHIFTED}", preprocess=preprocess,
                      **extract_options)
    outputs.name = SHIFTED
    scores = {name: detector.score(outputs) for name, detector in detectors.items()}
    return scores, id_accuracy(outputs), time.perf_counter() - start
