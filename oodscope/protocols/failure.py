"""Failure detection: reject what the model gets wrong, whatever the shift.

Guérin, Delmas, Ferreira & Guiochet, "Out-Of-Distribution Detection Is Not All You Need", AAAI 2023, and the
model-specific view of "Unified Out-Of-Distribution Detection: A Model-Specific Perspective" (Averly & Chao, ICCV
2023): a deployed classifier should reject a sample when its prediction on it is wrong, be the sample clean ID,
covariate-shifted ID or semantic OOD. The pool here is the ID test set, its covariate-shifted copy
(:func:`oodscope.data.corruptions.shifted_copy`, the ``--full-spectrum`` corruptions) and every OOD set; a sample
**should be rejected** when it is misclassified (clean or shifted ID) or semantic OOD, and accepted otherwise.

Per detector (its score as the rejection score, higher = reject first; :func:`oodscope.metrics.failure_metrics`):

* ``auroc``: AUROC of the score for the target "should reject" (percent);
* ``aurc`` / ``eaurc``: area under the risk-coverage curve with risk = share of accepted samples that should
  have been rejected, and its excess over the oracle (Geifman et al., ICLR 2019; percent, lower is better);
* ``scod_auc_rc``: the SCOD joint risk-coverage area with ``c_fn = 0.75`` (Narasimhan et al., ICLR 2024;
  :func:`oodscope.metrics.scod.scod_auc_rc`): ID and shifted-ID samples with their errors, OOD samples as OOD.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..metrics.failure import failure_metrics  # the metric lives in oodscope.metrics; importable here too


def _errors(outputs) -> np.ndarray:
    if outputs.logits is None or outputs.labels is None or (outputs.labels < 0).any():
        raise ValueError(f"failure detection needs class labels and logits on {outputs.name!r}")
    return (outputs.logits.argmax(axis=1) != outputs.labels).astype(np.float64)


def run(context) -> list[dict[str, Any]]:
    from ..data.corruptions import shifted_copy

    bench = context.bench
    clean = context.extract((bench.test.inputs, bench.test.labels), "test")  # a cache hit: for its errors
    errors = [_errors(clean)]
    shifted = None
    images = bench.test.inputs
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[3] == 3 and images.dtype == np.uint8:
        shifted_images, _ = shifted_copy(images, seed=context.seed)
        shifted = context.extract((shifted_images, bench.test.labels), "test_shifted")
        errors.append(_errors(shifted))
    ood_names = [name for sets in bench.ood.values() for name in sets]
    pool = "test+shifted+ood" if shifted is not None else "test+ood (no shifted copy: needs uint8 RGB images)"
    records = []
    for label, detector in context.detectors.items():
        id_scores = [context.scores(label, context.results.id_name)]
        if shifted is not None:
            id_scores.append(detector.score(shifted))
        values = failure_metrics(np.concatenate(id_scores), np.concatenate(errors),
                                 np.concatenate([context.scores(label, name) for name in ood_names]))
        records.append({"detector": label, "dataset": pool, "group": "failure", **values, "setting": "failure",
                        "error_rate_clean": 100.0 * float(errors[0].mean()),
                        "error_rate_shifted": 100.0 * float(errors[1].mean()) if shifted is not None else None})
    return records


def format_records(records: list[dict[str, Any]]) -> str:
    from ..results_io import format_table

    rows = sorted(records, key=lambda r: r["aurc"])
    first = rows[0] if rows else {}
    shifted = first.get("error_rate_shifted")
    head = (f"failure detection on {first.get('dataset')} (reject misclassified or OOD: "
            f"{first.get('reject_share', 0):.1f} % of the pool; error clean {first.get('error_rate_clean', 0):.1f} %"
            + (f", shifted {shifted:.1f} %)" if shifted is not None else ")"))
    return head + "\n" + format_table(rows, [("detector", "detector", ""), ("AUROC", "auroc", ".2f"),
                                             ("AURC", "aurc", ".2f"), ("E-AURC", "eaurc", ".2f"),
                                             ("SCOD AUC-RC", "scod_auc_rc", ".2f")])
