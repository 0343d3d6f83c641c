"""Distribution density, tails and outliers: per-example prototypicality metrics and the detectors' scores.

Carlini, Erlingsson & Papernot, "Distribution Density, Tails, and Outliers in Machine Learning: Metrics and
Applications" (arXiv:1910.13427, 2019), Sec. 3: an example is *prototypical* (dense region) or *outlying* (tail) by
several metrics that agree with each other. This protocol computes three of the paper's five on ``n`` seeded ID
test images and ``n`` ID training images (the paper's setting), all oriented so that **higher = more prototypical**:

* ``confidence`` (the paper's *conf*): the model's softmax probability of the true label;
* ``boundary`` (*adv*, adversarial robustness): the distance from the input to the nearest decision boundary,
  here the first-order (DeepFool) estimate ``(l_y - l_j) / ||grad_x (l_y - l_j)||_2`` with ``y`` the true label and
  ``j`` the strongest other class (negative when the model is wrong), in units of the raw input (``[0, 1]``
  pixels for uint8 images). For a linear model this is the exact distance to the ``y``/``j`` boundary; the paper
  runs an iterative attack instead;
* ``agreement`` (*agr*, ensemble agreement): minus the mean pairwise Jensen-Shannon divergence (nats) of the
  softmax outputs of the benchmark's model and the ``--ensemble`` models. The paper trains one architecture with
  several seeds; with the zoo it is ResNet-20/32/44/56, several depths (not computed without ``--ensemble``).

Not computed: *holdout retraining* and *privacy* (DP training), which need many training runs, and Feldman &
Zhang's memorisation score (thousands of retrained models); the protocol says so in its records.

Records: per metric pair, the Spearman correlation of the metrics on the training subsample (the paper's
finding is that they agree), and per detector and metric, the Spearman correlation of the detector's score on
the ID test subsample with the metric (a detector that tracks density has *negative* correlations: its OOD score
rises as prototypicality falls).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Sequence

import numpy as np

N_IMAGES = 2000
METRICS = ("confidence", "boundary", "agreement")
NOT_COMPUTED = "holdout retraining, privacy (DP training) and memorisation need many training runs"


def true_label_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Softmax probability of the true label, per row (float64)."""
    from scipy.special import softmax

    probabilities = softmax(np.asarray(logits, dtype=np.float64), axis=1)
    return probabilities[np.arange(len(labels)), np.asarray(labels)]


def mean_pairwise_js(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """Mean over model pairs of the Jensen-Shannon divergence (nats) of their per-row output distributions."""
    if len(probabilities) < 2:
        raise ValueError("ensemble agreement needs at least two models")
    p = [np.clip(np.asarray(q, dtype=np.float64), 1e-300, None) for q in probabilities]

    def kl(a, b):
        return (a * (np.log(a) - np.log(b))).sum(axis=1)

    pairs = [(a, b) for a, b in combinations(p, 2)]
    return np.mean([0.5 * kl(a, (a + b) / 2) + 0.5 * kl(b, (a + b) / 2) for a, b in pairs], axis=0)


def boundary_distance(model, inputs: np.ndarray, labels: np.ndarray, preprocess, batch_size: int = 250,
                      scale: float = 1.0) -> np.ndarray:
    """First-order distance to the nearest ``y``/``j`` decision boundary, ``(l_y - l_j) / ||grad (l_y - l_j)||``,
    with gradients with respect to the raw input divided by ``scale`` (255 for uint8 images: ``[0, 1]`` units).
    Runs where the model's parameters are."""
    import torch

    target = next(model.parameters()).device
    out = np.empty(len(inputs))
    labels = np.asarray(labels)
    for start in range(0, len(inputs), batch_size):
        raw = torch.as_tensor(np.asarray(inputs[start:start + batch_size])).to(target).float() / scale
        raw.requires_grad_(True)
        x = raw * scale
        with torch.enable_grad():
            logits = model(preprocess(x) if preprocess is not None else x)
            logits = logits.logits if hasattr(logits, "logits") else logits
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            y = torch.as_tensor(labels[start:start + batch_size], device=logits.device)
            true = logits.gather(1, y[:, None])[:, 0]
            others = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
            margin = true - others
            (grad,) = torch.autograd.grad(margin.sum(), raw)
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        out[start:start + batch_size] = (margin.detach() / norm).double().cpu().numpy()
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _metrics(context, inputs, labels, name: str) -> dict[str, np.ndarray]:
    import torch

    outputs = context.extract((inputs, labels), name)
    scale = 255.0 if isinstance(inputs, np.ndarray) and inputs.dtype == np.uint8 else 1.0
    metrics = {"confidence": true_label_confidence(outputs.logits, labels),
               "boundary": boundary_distance(context.model, inputs, labels, context.preprocess, scale=scale)}
    if context.ensemble:
        from scipy.special import softmax

        probabilities = [softmax(np.asarray(outputs.logits, np.float64), axis=1)]
        for member_name, member, preprocess in context.ensemble:
            with torch.no_grad():
                logits = [member(preprocess(torch.as_tensor(inputs[s:s + 500]))).numpy()
                          for s in range(0, len(inputs), 500)]
            probabilities.append(softmax(np.concatenate(logits).astype(np.float64), axis=1))
        metrics["agreement"] = -mean_pairwise_js(probabilities)
    return metrics, outputs


def run(context) -> list[dict[str, Any]]:
    bench = context.bench
    if bench.train.labels is None or bench.test.labels is None:
        raise ValueError("the density protocol needs class labels on the ID train and test sets")
    from ..training.compare import subsample

    train_x, train_y = subsample(bench.train, N_IMAGES, context.seed)
    test_x, test_y = subsample(bench.test, N_IMAGES, context.seed + 1)
    train_metrics, _ = _metrics(context, train_x, train_y, f"density-train-{N_IMAGES}")
    test_metrics, test_outputs = _metrics(context, test_x, test_y, f"density-test-{N_IMAGES}")
    members = ", ".join(name for name, _, _ in context.ensemble) if context.ensemble else None
    common = {"setting": "density", "group": "density", "n_train": len(train_x), "n_test": len(test_x),
              "ensemble": members, "not_computed": NOT_COMPUTED}
    records = []
    for a, b in combinations(sorted(train_metrics), 2):
        records.append({"detector": None, "dataset": "train", "metric_pair": f"{a}~{b}",
                        "spearman": spearman(train_metrics[a], train_metrics[b]), **common})
    for label, detector in context.detectors.items():
        scores = detector.score(test_outputs)
        for metric, values in test_metrics.items():
            records.append({"detector": label, "dataset": "test", "metric": metric,
                            "spearman": spearman(scores, values), **common})
    return records


def format_records(records: list[dict[str, Any]]) -> str:
    pairs = [r for r in records if r.get("metric_pair")]
    detectors = [r for r in records if r.get("metric")]
    first = records[0] if records else {}
    metrics = list(dict.fromkeys(r["metric"] for r in detectors))
    lines = [f"density, tails and outliers (Carlini et al. 2019): {first.get('n_train')} train / "
             f"{first.get('n_test')} test images, higher metric = more prototypical"
             + (f"; ensemble: {first['ensemble']}" if first.get("ensemble") else "; no --ensemble: no agreement"),
             "metrics agree on train (Spearman): " + ", ".join(f"{r['metric_pair']} {r['spearman']:+.2f}"
                                                              for r in pairs),
             f"{'detector':<22}" + "".join(f"{m:>12}" for m in metrics) + "   (Spearman of the OOD score with "
             "the metric on ID test: negative = tracks density)"]
    by_detector: dict[str, dict[str, float]] = {}
    for r in detectors:
        by_detector.setdefault(r["detector"], {})[r["metric"]] = r["spearman"]
    for name, values in sorted(by_detector.items(), key=lambda item: item[1].get("confidence", 0.0)):
        lines.append(f"{name:<22}" + "".join(f"{values.get(m, float('nan')):>+12.2f}" for m in metrics))
    lines.append(f"not computed: {first.get('not_computed')}")
    return "\n".join(lines)
