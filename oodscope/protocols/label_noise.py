"""Label-noise robustness: the same detectors on classifiers fine-tuned with noisy labels.

Humblot-Renaux, Escalera & Moeslund, "A Noisy Elephant in the Room: Is Your Out-of-Distribution Detector Robust
to Label Noise?", CVPR 2024: post-hoc detectors on classifiers trained with label noise; the paper finds that
noise hurts OOD detection, and that the detectors which use the training labels or the feature space (class
means, KNN, Mahalanobis-style distances) degrade the most, while logit-based scores degrade with the accuracy.

Construction (seeded, stated in every record):

* the benchmark's model is fine-tuned on its ID training images with the training engine
  (:func:`oodscope.training.finetune`, plain cross-entropy) for each setting in :data:`SETTINGS`: clean labels
  (the control, the same schedule), **symmetric** noise (exactly ``round(rate N)`` labels, chosen at random, moved
  to a uniformly drawn *other* class) and **class-dependent** noise (the same share of every source class moved to
  one fixed target: for CIFAR-10 the flips of Patrini et al., CVPR 2017, truck -> automobile, bird -> airplane,
  deer -> horse, cat <-> dog; for other label sets ``c -> (c + 1) mod K``), at 20 and 40 %;
* schedule :data:`SCHEDULE` (SGD, Nesterov, cosine; crop and flip), resumable per setting under the cache;
* every detector is fitted on the fine-tuned model's training outputs **with the noisy labels** (what a user
  with noisy data has) and scored on ``n`` seeded images of the ID test set and of every OOD set.

Records: per setting and detector, ID accuracy (clean test labels), the mean AUROC per OOD group, and its change
against the clean-label control (``delta_<group>``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SETTINGS = (("clean", 0.0), ("symmetric", 0.2), ("symmetric", 0.4), ("class-dependent", 0.2),
            ("class-dependent", 0.4))
SCHEDULE = {"epochs": 10, "max_steps": None, "lr": 0.01, "batch_size": 128}
N_IMAGES = 2000
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_FLIPS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # Patrini et al. 2017: truck->automobile, bird->airplane, ...


def class_dependent_targets(n_classes: int, cifar10: bool) -> dict[int, int]:
    """Source class -> the class its noisy labels move to."""
    if cifar10:
        return dict(CIFAR10_FLIPS)
    return {c: (c + 1) % n_classes for c in range(n_classes)}


def noisy_labels(labels: np.ndarray, n_classes: int, kind: str, rate: float, seed: int = 0,
                 cifar10: bool = False) -> np.ndarray:
    """A copy of ``labels`` with label noise of ``kind`` (``"symmetric"`` or ``"class-dependent"``) at ``rate``.

    Symmetric: exactly ``round(rate N)`` rows, chosen without replacement, each get a uniformly drawn *other*
    class. Class-dependent: in every source class of :func:`class_dependent_targets`, ``round(rate N_c)`` of its
    rows move to the target class."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError("label noise: labels must be a non-empty 1-D array")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"label noise: labels must lie in [0, {n_classes}), got [{labels.min()}, {labels.max()}]")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"label noise: rate must be in [0, 1), got {rate!r}")
    if n_classes < 2:
        raise ValueError("label noise needs at least two classes")
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    if kind == "symmetric":
        rows = rng.choice(len(labels), int(round(rate * len(labels))), replace=False)
        shift = rng.integers(1, n_classes, len(rows))  # 1..K-1: never the true class
        noisy[rows] = (labels[rows] + shift) % n_classes
    elif kind == "class-dependent":
        for source, target in class_dependent_targets(n_classes, cifar10).items():
            members = np.flatnonzero(labels == source)
            rows = rng.choice(members, int(round(rate * len(members))), replace=False)
            noisy[rows] = target
    else:
        raise ValueError(f"label noise: kind must be 'symmetric' or 'class-dependent', got {kind!r}")
    return noisy


def _groups(context, per_set: int, seed: int):
    from ..training.compare import subsample

    bench = context.bench
    test = subsample(bench.test, per_set, seed)
    ood = {group: {name: subsample(split, per_set, seed)[0] for name, split in sets.items()}
           for group, sets in bench.ood.items()}
    return test, ood


def run(context) -> list[dict[str, Any]]:
    import torch
    from sklearn.base import clone

    from ..evaluation import evaluate
    from ..training import finetune

    bench = context.bench
    if bench.train.labels is None or (np.asarray(bench.train.labels) < 0).any():
        raise ValueError("the label-noise protocol needs the ID training labels")
    linear = [m for m in context.model.modules() if isinstance(m, torch.nn.Linear)]
    if not linear:
        raise ValueError("the label-noise protocol fine-tunes the classifier: its last layer must be nn.Linear")
    n_classes = linear[-1].out_features
    cifar10 = n_classes == 10 and "cifar10" in bench.name.lower()
    test_data, ood_data = _groups(context, N_IMAGES, context.seed)
    records, control = [], {}
    for kind, rate in SETTINGS:
        labels = bench.train.labels if rate == 0 else noisy_labels(bench.train.labels, n_classes, kind, rate,
                                                                    context.seed, cifar10)
        setting = "clean" if rate == 0 else f"{kind} {int(round(100 * rate))}%"
        where = context.work_dir("label-noise") / f"{bench.name}-{setting.replace(' ', '-').replace('%', 'pct')}"
        tuned, history = finetune(context.model, (bench.train.inputs, labels), "cross_entropy",
                                  preprocess=context.preprocess, seed=context.seed, checkpoint_dir=where,
                                  device=context.device, progress=context.extract_options.get("progress", True),
                                  **SCHEDULE)
        tuned.eval()
        train = context.extract((bench.train.inputs, labels), f"noise-{setting}-train", model=tuned)
        test = context.extract(test_data, "noise-test", model=tuned)
        ood = {group: {name: context.extract(images, f"noise-{name}", model=tuned) for name, images in sets.items()}
               for group, sets in ood_data.items()}
        detectors = {label: clone(d) for label, d in context.detectors.items()}
        results = evaluate(detectors, test, ood, train=train)
        accuracy = float(100 * np.mean(test.logits.argmax(1) == test.labels))
        noise_share = float(100 * np.mean(np.asarray(labels) != np.asarray(bench.train.labels)))
        by_detector: dict[str, dict[str, float]] = {}
        for r in results.group_means():
            by_detector.setdefault(r["detector"], {})[r["group"]] = float(r["auroc"])
        for label, groups in by_detector.items():
            if rate == 0:
                control[label] = groups
            record = {"detector": label, "dataset": setting, "group": "label-noise", "setting": "label-noise",
                      "noise": kind, "rate": rate, "noisy_share": noise_share, "id_accuracy": accuracy,
                      "train_s": float(sum(history.seconds)), "n_per_set": N_IMAGES,
                      "schedule": f"{SCHEDULE['epochs']} epochs, lr {SCHEDULE['lr']}, batch {SCHEDULE['batch_size']}"}
            for group, value in groups.items():
                record[f"auroc_{group}"] = value
                record[f"delta_{group}"] = value - control.get(label, {}).get(group, float("nan"))
            records.append(record)
    return records


def format_records(records: list[dict[str, Any]]) -> str:
    if not records:
        return "label noise: no records"
    groups = sorted({key[6:] for r in records for key in r if key.startswith("auroc_")})
    settings = list(dict.fromkeys(r["dataset"] for r in records))
    accuracy = {r["dataset"]: r["id_accuracy"] for r in records}
    head = " / ".join(groups)
    lines = [f"label noise (Humblot-Renaux et al. 2024): fine-tuned {records[0]['schedule']}; ID accuracy "
             + ", ".join(f"{s} {accuracy[s]:.2f} %" for s in settings),
             f"{'detector':<18}" + "".join(f"{(s if s == 'clean' else 'change, ' + s):>28}" for s in settings)
             + f"   (AUROC {head}; the noisy columns: change against clean)"]
    rows: dict[str, dict[str, str]] = {}
    for r in records:
        values = [r[f"auroc_{g}"] if r["dataset"] == "clean" else r[f"delta_{g}"] for g in groups]
        text = " / ".join(f"{v:.1f}" if r["dataset"] == "clean" else f"{v:+.1f}" for v in values)
        rows.setdefault(r["detector"], {})[r["dataset"]] = text
    for name, cells in rows.items():
        lines.append(f"{name:<18}" + "".join(f"{cells.get(s, ''):>28}" for s in settings))
    return "\n".join(lines)
