"""Know your limits: inputs scaled far away from the data.

Hein, Andriushchenko & Bitterwolf, "Why ReLU networks yield high-confidence predictions far away from the training
data and how to mitigate the problem", CVPR 2019 (and Ulmer & Cinà, "Know Your Limits: Uncertainty Estimation with
ReLU Classifiers Fails at Reliable OOD Detection", UAI 2021): for a ReLU network, ``f(alpha x)`` becomes linear in
``alpha`` as ``alpha`` grows, so softmax confidence goes to 1 and a confidence-based detector *accepts* inputs far
from the data. The protocol multiplies the **model input** (after the preprocessing) of ``n`` ID test images by
``alpha`` in {1, 10, 100, 1000} and reports, per detector and ``alpha``, the AUROC of clean ID test vs the scaled
images (50: blind; below 50: the scaled images look *more* ID than ID) and ``flagged``, the share flagged at the
threshold keeping 95 % of the clean ID test. Detectors warn with ``SaturationWarning`` where rows exceed the
training data's magnitude by more than 1e6 times; the warnings are counted in ``saturation_warnings``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

ALPHAS = (1.0, 10.0, 100.0, 1000.0)
N_IMAGES = 1000


class ScaledInput:
    """The preprocessing followed by ``x -> alpha x`` (keyed for the cache by both)."""

    def __init__(self, preprocess, alpha: float):
        self.preprocess, self.alpha = preprocess, float(alpha)
        from ..extraction.extract import preprocess_key

        self.cache_key = f"ScaledInput(alpha={self.alpha!r}, {preprocess_key(preprocess)})"

    def __call__(self, x):
        return self.alpha * (self.preprocess(x) if self.preprocess is not None else x.float())

    def to(self, device):
        if hasattr(self.preprocess, "to"):
            self.preprocess.to(device)
        return self


def run(context, alphas=ALPHAS, n: int | None = None) -> list[dict[str, Any]]:
    n = n or N_IMAGES
    from ..detectors.base import SaturationWarning
    from ..extraction.extract import extract
    from ..fullspectrum import flagged_share
    from ..metrics import auroc

    bench = context.bench
    pick = np.random.default_rng(context.seed).choice(len(bench.test), min(n, len(bench.test)), replace=False)
    pick.sort()
    id_scores = {label: context.scores(label, context.results.id_name) for label in context.detectors}
    layers = sorted({layer for d in context.detectors.values() for layer in d.layer_names()})
    records = []
    for alpha in alphas:
        outputs = extract(context.model, bench.test.inputs[pick], name=f"{bench.name}-scaled-{alpha:g}",
                          preprocess=ScaledInput(context.preprocess, alpha), layers=layers,
                          **context.extract_options)
        confidence = float(np.mean(_softmax_max(outputs.logits)))
        for label, detector in context.detectors.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SaturationWarning)
                scores = detector.score(outputs)
            records.append({"detector": label, "dataset": f"alpha={alpha:g}", "group": "scaling",
                            "alpha": alpha, "auroc": 100.0 * auroc(id_scores[label], scores),
                            "flagged": flagged_share(id_scores[label], scores), "mean_msp": 100.0 * confidence,
                            "saturation_warnings": sum(issubclass(w.category, SaturationWarning) for w in caught),
                            "setting": "scaling"})
    return records


def _softmax_max(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return (np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)).max(axis=1)


def format_records(records: list[dict[str, Any]]) -> str:
    from ..results_io import format_table

    detectors = list(dict.fromkeys(r["detector"] for r in records))
    alphas = list(dict.fromkeys(r["alpha"] for r in records))
    cell = {(r["detector"], r["alpha"]): r for r in records}
    rows = [{"detector": d, **{f"a{a:g}": cell[(d, a)]["auroc"] for a in alphas},
             **{f"f{a:g}": cell[(d, a)]["flagged"] for a in alphas}} for d in detectors]
    msp = {a: cell[(detectors[0], a)]["mean_msp"] for a in alphas} if detectors else {}
    columns = [("detector", "detector", "")] + [(f"AUROC\nx{a:g}", f"a{a:g}", ".1f") for a in alphas] + \
        [(f"flagged %\nx{a:g}", f"f{a:g}", ".1f") for a in alphas]
    return ("inputs scaled by alpha (clean ID test vs scaled ID test; mean MSP "
            + ", ".join(f"x{a:g} {m:.1f}" for a, m in msp.items()) + ")\n" + format_table(rows, columns))
