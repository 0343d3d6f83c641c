"""Distribution density, tails and outliers: per-example prototypicality metrics and the detectors' scores.

Carlini, Erlingsson & Papernot, "Distribution Density, Tails, and Outliers in Machine Learning: Metrics and
Applications" (arXiv:1910.13427, 2019), Sec. 3: an example is *prototypical* (dense region) or *outlying* (tail) by
several metrics that agree with each other. This protocol computes the paper's five metrics (the ones asked for with
``--density-metrics``, by default the first three) on ``n`` seeded ID test images and ``n`` ID training images
(the paper's setting), all oriented so that **higher = more prototypical**:

* ``confidence`` (the paper's *conf*): the model's softmax probability of the true label;
* ``boundary`` (*adv*, adversarial robustness): the distance from the input to the nearest decision boundary,
  here the first-order (DeepFool) estimate ``(l_y - l_j) / ||grad_x (l_y - l_j)||_2`` with ``y`` the true label and
  ``j`` the strongest other class (negative when the model is wrong), in units of the raw input (``[0, 1]``
  pixels for uint8 images). For a linear model this is the exact distance to the ``y``/``j`` boundary; the paper
  runs an iterative attack instead;
* ``agreement`` (*agr*, ensemble agreement): minus the mean pairwise Jensen-Shannon divergence (nats) of the
  softmax outputs of the benchmark's model and the ``--ensemble`` models. The paper trains one architecture with
  several seeds; with the zoo it is ResNet-20/32/44/56, several depths (not computed without ``--ensemble``);
* ``holdout`` (*ret*, holdout retraining; as described with the paper's released metric values, the paper's own
  text not checked here): the model trained on the training data is fine-tuned on a held-out set disjoint from
  the measured examples, and the metric is minus the symmetric KL divergence
  ``KL(p || q) + KL(q || p)`` (:func:`symmetric_kl`) between its softmax outputs ``p`` before and ``q`` after (a
  prototypical example's output hardly moves). Construction: the ID training set is split by a seeded permutation
  into a *measured* half (the training subsample is drawn from it) and a *held-out* half, on which the benchmark's
  model is fine-tuned with the training engine (:data:`HOLDOUT_SCHEDULE`: cross-entropy, SGD with Nesterov
  momentum, cosine, crop and flip on image benchmarks). The zoo models were trained on the whole CIFAR-10 training
  set, so the held-out half is disjoint from the measured examples but was seen by the original model;
* ``privacy`` (*priv*, privacy-preserving training): models trained with DP-SGD (:mod:`oodscope.training.dpsgd`,
  Abadi et al. 2016) at the noise multipliers of :data:`PRIVACY`, several seeds each; the metric is the largest
  noise multiplier (the strongest privacy, smallest epsilon) at which at least 90 % of that level's models classify
  the example correctly (the description released with the paper's metric values: the smallest epsilon at which
  DP-SGD classifies it correctly 90 % of the time), 0 when no level does. On CPU the private models are
  softmax-regression heads on the benchmark model's frozen penultimate features of the whole ID training set, not
  whole networks: the epsilons (Opacus' RDP accountant, at ``delta`` = 1e-5, when ``oodscope[privacy]`` is
  installed) bound what the heads' training reveals, not the feature extractor's, which was trained without
  privacy on the same images.

Not computed: Feldman & Zhang's memorisation score (thousands of retrained models); the records say so.

Records: per metric pair, the Spearman correlation of the metrics on the training subsample (the paper's
finding is that they agree), and per detector and metric, the Spearman correlation of the detector's score on
the ID test subsample with the metric (a detector that tracks density has *negative* correlations: its OOD score
rises as prototypicality falls). Holdout and privacy records also carry their construction (split sizes, schedule,
noise multipliers, epsilons and the private heads' accuracies).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Sequence

import numpy as np

# the metrics live in oodscope.metrics; importable here too
from ..metrics.correlation import spearman
from ..metrics.density import mean_pairwise_js, strongest_private_level, symmetric_kl, true_label_confidence

N_IMAGES = 2000
METRICS = ("confidence", "boundary", "agreement", "holdout", "privacy")
NOT_COMPUTED = "Feldman & Zhang's memorisation (thousands of retrained models)"
HOLDOUT_SCHEDULE = {"epochs": 3, "max_steps": None, "lr": 0.01, "batch_size": 128}
# DP-SGD heads on frozen features stay accurate at large noise (on the zoo ResNet-20's CIFAR-10 features 99.5 %
# train accuracy at sigma 8), so the levels run up to where they fail (sigma 128: about 55 %)
PRIVACY = {"noise_multipliers": (4.0, 8.0, 16.0, 32.0, 64.0, 128.0), "models": 5, "epochs": 10, "lot_size": 256,
           "lr": 1.0, "max_norm": 1.0, "delta": 1e-5, "share_correct": 0.9}


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


def chosen_metrics(text: str | None, ensemble: bool) -> tuple[str, ...]:
    """The metrics of ``--density-metrics a,b`` (default: confidence, boundary and, with ``--ensemble``,
    agreement); an unknown name, or agreement without an ensemble, is an error saying what to pass."""
    if not text:
        return ("confidence", "boundary") + (("agreement",) if ensemble else ())
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"--density-metrics: unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    if "agreement" in names and not ensemble:
        raise ValueError("--density-metrics agreement needs further models: pass --ensemble MODEL,...")
    return tuple(dict.fromkeys(names))


def holdout_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(measured, held_out)`` row indices: a seeded permutation of ``range(n)`` cut in halves (the measured
    half gets the odd row), each sorted."""
    if n < 2:
        raise ValueError(f"holdout retraining needs at least 2 training images to split, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n - n // 2]), np.sort(order[n - n // 2:])


def holdout_retrain(model, images: np.ndarray, labels: np.ndarray, preprocess, *, seed: int = 0,
                    device: str = "cpu", checkpoint_dir=None, progress: bool = True,
                    schedule: dict[str, Any] | None = None):
    """``(model fine-tuned on the held-out images, history)`` with the training engine (cross-entropy,
    :data:`HOLDOUT_SCHEDULE`; crop and flip only on channels-last images)."""
    from ..training import finetune

    images = np.asarray(images)
    augmentation = images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3)
    tuned, history = finetune(model, (images, labels), "cross_entropy", preprocess=preprocess, seed=seed,
                              checkpoint_dir=checkpoint_dir, device=device, progress=progress,
                              augmentation=augmentation, **(schedule or HOLDOUT_SCHEDULE))
    tuned.eval()
    return tuned, history


def _penultimate(outputs, who: str) -> np.ndarray:
    if outputs.features is None:
        raise ValueError(f"the privacy metric trains heads on the penultimate features, but {who} has none: the "
                         "model's last layer must be nn.Linear")
    return np.asarray(outputs.features)


def _private_heads(context) -> tuple[list[list[Any]], dict[str, Any]]:
    """The DP-SGD heads per noise multiplier (``PRIVACY['models']`` seeds each) on the ID training features, and
    the construction for the records."""
    from ..training.dpsgd import dp_epsilon, train_dp_linear

    bench = context.bench
    train = context.extract((bench.train.inputs, bench.train.labels), "density-privacy-train")
    features, labels = _penultimate(train, "the ID training set"), np.asarray(bench.train.labels)
    n_classes = int(np.asarray(train.logits).shape[1])
    p = PRIVACY
    heads = [[train_dp_linear(features, labels, n_classes, sigma, max_norm=p["max_norm"], lot_size=p["lot_size"],
                              epochs=p["epochs"], lr=p["lr"], seed=context.seed + 1000 * level + model,
                              device=context.device, progress=context.extract_options.get("progress", True))
              for model in range(p["models"])] for level, sigma in enumerate(p["noise_multipliers"])]
    rate, steps = p["lot_size"] / len(features), p["epochs"] * max(1, round(len(features) / p["lot_size"]))
    try:
        epsilons = [dp_epsilon(sigma, rate, steps, p["delta"]) for sigma in p["noise_multipliers"]]
    except ImportError:
        epsilons = None
    accuracy = [float(100 * np.mean([_predict(h, features) == labels for h in level])) for level in heads]
    construction = {"privacy_noise_multipliers": list(p["noise_multipliers"]), "privacy_epsilons": epsilons,
                    "privacy_train_accuracy": accuracy,
                    "privacy_construction": f"DP-SGD softmax heads on the frozen penultimate features of "
                                            f"{len(features)} ID training images, {p['models']} seeds per noise "
                                            f"multiplier, {p['epochs']} epochs ({steps} steps, Poisson lots of "
                                            f"{p['lot_size']}), C {p['max_norm']}, lr {p['lr']}, delta "
                                            f"{p['delta']:g}" + ("" if epsilons else
                                                                 "; epsilons need oodscope[privacy]")}
    return heads, construction


def _predict(head, features: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return head(torch.as_tensor(features, dtype=torch.float32)).argmax(dim=1).numpy()


def _metrics(context, inputs, labels, name: str, chosen: Sequence[str],
             trained: dict[str, Any]) -> tuple[dict[str, np.ndarray], Any]:
    import torch

    outputs = context.extract((inputs, labels), name)
    scale = 255.0 if isinstance(inputs, np.ndarray) and inputs.dtype == np.uint8 else 1.0
    metrics = {}
    if "confidence" in chosen:
        metrics["confidence"] = true_label_confidence(outputs.logits, labels)
    if "boundary" in chosen:
        metrics["boundary"] = boundary_distance(context.model, inputs, labels, context.preprocess, scale=scale)
    if "agreement" in chosen:
        from scipy.special import softmax

        probabilities = [softmax(np.asarray(outputs.logits, np.float64), axis=1)]
        for member_name, member, preprocess in context.ensemble:
            with torch.no_grad():
                logits = [member(preprocess(torch.as_tensor(inputs[s:s + 500]))).numpy()
                          for s in range(0, len(inputs), 500)]
            probabilities.append(softmax(np.concatenate(logits).astype(np.float64), axis=1))
        metrics["agreement"] = -mean_pairwise_js(probabilities)
    if "holdout" in chosen:
        after = context.extract((inputs, labels), f"{name}-holdout", model=trained["holdout"])
        metrics["holdout"] = -symmetric_kl(outputs.logits, after.logits)
    if "privacy" in chosen:
        features = _penultimate(outputs, name)
        correct = np.array([[_predict(h, features) == np.asarray(labels) for h in level]
                            for level in trained["privacy"]])
        metrics["privacy"] = strongest_private_level(correct, PRIVACY["noise_multipliers"], PRIVACY["share_correct"])
    return metrics, outputs


def run(context) -> list[dict[str, Any]]:
    from types import SimpleNamespace

    bench = context.bench
    if bench.train.labels is None or bench.test.labels is None:
        raise ValueError("the density protocol needs class labels on the ID train and test sets")
    from ..training.compare import subsample

    chosen = chosen_metrics(context.options.get("density_metrics"), bool(context.ensemble))
    trained: dict[str, Any] = {}
    construction: dict[str, Any] = {}
    measured_split = bench.train
    if "holdout" in chosen:
        measured, held_out = holdout_split(len(bench.train.inputs), context.seed)
        labels = np.asarray(bench.train.labels)
        where = context.work_dir("density") / f"{bench.name}-holdout-seed{context.seed}"
        trained["holdout"], history = holdout_retrain(
            context.model, bench.train.inputs[held_out], labels[held_out], context.preprocess, seed=context.seed,
            device=context.device, checkpoint_dir=where, progress=context.extract_options.get("progress", True))
        measured_split = SimpleNamespace(inputs=bench.train.inputs[measured], labels=labels[measured])
        s = HOLDOUT_SCHEDULE
        construction.update({
            "holdout_construction": f"fine-tuned on the held-out {len(held_out)} of {len(labels)} ID training "
                                    f"images (seed {context.seed}), train subsample from the measured "
                                    f"{len(measured)}; {s['epochs']} epochs, lr {s['lr']}, batch {s['batch_size']}",
            "holdout_train_s": float(sum(history.seconds))})
    if "privacy" in chosen:
        trained["privacy"], privacy = _private_heads(context)
        construction.update(privacy)
    train_x, train_y = subsample(measured_split, N_IMAGES, context.seed)
    test_x, test_y = subsample(bench.test, N_IMAGES, context.seed + 1)
    train_metrics, _ = _metrics(context, train_x, train_y, f"density-train-{N_IMAGES}", chosen, trained)
    test_metrics, test_outputs = _metrics(context, test_x, test_y, f"density-test-{N_IMAGES}", chosen, trained)
    members = ", ".join(name for name, _, _ in context.ensemble) if context.ensemble else None
    common = {"setting": "density", "group": "density", "n_train": len(train_x), "n_test": len(test_x),
              "ensemble": members, "density_metrics": ",".join(chosen), "not_computed": NOT_COMPUTED, **construction}
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
    if first.get("holdout_construction"):
        lines.append(f"holdout: {first['holdout_construction']} ({first['holdout_train_s']:.0f} s)")
    if first.get("privacy_construction"):
        epsilons = first.get("privacy_epsilons") or [None] * len(first["privacy_noise_multipliers"])
        lines.append(f"privacy: {first['privacy_construction']}; per noise multiplier: " + ", ".join(
            f"{sigma:g} (" + ("" if eps is None else f"eps {eps:.3g}, ") + f"train accuracy {acc:.1f} %)"
            for sigma, eps, acc in zip(first["privacy_noise_multipliers"], epsilons,
                                       first["privacy_train_accuracy"])))
    lines.append(f"not computed: {first.get('not_computed')}")
    return "\n".join(lines)
