"""Open-set recognition on the ID classes: train on some, detect the others.

The OSR setting of Yang et al.'s generalized-OOD survey (IJCV 2024): a classifier is trained on ``K`` *known*
classes of the ID data; at test time the remaining classes are *unknown* and must be rejected while the known
ones are classified. For CIFAR-10 the standard protocol uses 6 known / 4 unknown classes in the five splits of
Neal et al., "Open Set Learning with Counterfactual Images", ECCV 2018 (the lists in :data:`CIFAR10_SPLITS`, as
published with Vaze et al., "Open-Set Recognition: a Good Closed-Set Classifier is All You Need?", ICLR 2022).

Construction, per split (seeded):

* the classifier: the benchmark model's architecture with a ``K``-way last ``nn.Linear`` and **every parameter
  re-initialised** (the benchmark's own weights have seen the unknown classes), trained from scratch with the
  training engine (:func:`oodscope.training.finetune`, cross-entropy, :data:`SCHEDULE`: SGD with Nesterov
  momentum, cosine, crop and flip) on the ID training images of the known classes, labels mapped to ``0..K-1``;
* every detector is fitted on that model's outputs on its training images and scored on the ID test images:
  known-class images are the ID side, unknown-class images the OOD side.

Records, per split and detector: closed-set accuracy on the known test images, AUROC (unknown vs known, percent),
OSCR (Dhamija et al. 2018, :func:`oodscope.metrics.oscr`, percent) and the training time. Benchmarks other than
CIFAR-10 get 5 seeded random 60/40 class splits, stated in the records.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

CIFAR10_SPLITS = ((0, 6, 4, 9, 1, 7), (7, 6, 4, 9, 0, 1), (1, 5, 7, 3, 9, 4), (8, 6, 1, 9, 0, 7),
                  (2, 4, 1, 7, 9, 6))
SCHEDULE = {"epochs": 20, "max_steps": None, "lr": 0.1, "batch_size": 128}


def class_splits(n_classes: int, cifar10: bool, seed: int = 0, n_splits: int = 5) -> list[tuple[int, ...]]:
    """The known classes of each split: Neal et al.'s for CIFAR-10, else seeded random 60 % subsets."""
    if cifar10:
        return [tuple(s) for s in CIFAR10_SPLITS]
    n_known = max(2, int(round(0.6 * n_classes)))
    if n_known >= n_classes:
        raise ValueError(f"open-set recognition needs at least 3 ID classes to leave some unknown, got {n_classes}")
    rng = np.random.default_rng(seed)
    return [tuple(int(c) for c in rng.permutation(n_classes)[:n_known]) for _ in range(n_splits)]


def fresh_classifier(model, n_known: int, seed: int):
    """A copy of ``model`` with a ``n_known``-way last ``nn.Linear`` and every parameter re-initialised."""
    import torch

    from ..training.heads import replace_module

    model = copy.deepcopy(model)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("open-set recognition trains a classifier: the model's last layer must be nn.Linear")
    name, last = linears[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        replace_module(model, name, torch.nn.Linear(last.in_features, n_known, bias=last.bias is not None))
        for module in model.modules():
            if hasattr(module, "reset_parameters") and module is not model:
                module.reset_parameters()
    return model


def run(context) -> list[dict[str, Any]]:
    from sklearn.base import clone

    from ..metrics import auroc, oscr
    from ..training import finetune

    bench = context.bench
    train_labels, test_labels = np.asarray(bench.train.labels), np.asarray(bench.test.labels)
    if (train_labels < 0).any() or (test_labels < 0).any():
        raise ValueError("open-set recognition needs class labels on the ID train and test sets")
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    cifar10 = n_classes == 10 and "cifar10" in bench.name.lower()
    splits = class_splits(n_classes, cifar10, context.seed)
    records = []
    for number, known in enumerate(splits):
        mapping = np.full(n_classes, -1)
        mapping[list(known)] = np.arange(len(known))
        train_rows = np.flatnonzero(mapping[train_labels] >= 0)
        known_rows, unknown_rows = np.flatnonzero(mapping[test_labels] >= 0), np.flatnonzero(mapping[test_labels] < 0)
        model = fresh_classifier(context.model, len(known), context.seed + number)
        where = context.work_dir("open-set") / f"{bench.name}-split{number}-{'-'.join(map(str, known))}"
        trained, history = finetune(model, (bench.train.inputs[train_rows], mapping[train_labels[train_rows]]),
                                    "cross_entropy", preprocess=context.preprocess, seed=context.seed + number,
                                    checkpoint_dir=where, device=context.device,
                                    progress=context.extract_options.get("progress", True), **SCHEDULE)
        trained.eval()
        train = context.extract((bench.train.inputs[train_rows], mapping[train_labels[train_rows]]),
                                f"osr{number}-train", model=trained)
        known_out = context.extract((bench.test.inputs[known_rows], mapping[test_labels[known_rows]]),
                                    f"osr{number}-known", model=trained)
        unknown_out = context.extract(bench.test.inputs[unknown_rows], f"osr{number}-unknown", model=trained)
        correct = known_out.logits.argmax(axis=1) == known_out.labels
        for label, detector in context.detectors.items():
            fitted = clone(detector).fit(train)
            known_scores, unknown_scores = fitted.score(known_out), fitted.score(unknown_out)
            records.append({"detector": label, "dataset": f"split {number}", "group": "open-set",
                            "setting": "open-set", "known": list(known),
                            "unknown": [c for c in range(n_classes) if c not in known],
                            "splits": "Neal et al. 2018" if cifar10 else f"random 60 % (seed {context.seed})",
                            "accuracy": float(100 * correct.mean()),
                            "auroc": float(100 * auroc(known_scores, unknown_scores)),
                            "oscr": float(100 * oscr(known_scores, correct, unknown_scores)),
                            "train_s": float(sum(history.seconds)),
                            "schedule": f"from scratch, {SCHEDULE['epochs']} epochs, lr {SCHEDULE['lr']}"})
    return records


def format_records(records: list[dict[str, Any]]) -> str:
    if not records:
        return "open-set recognition: no records"
    accuracy = {r["dataset"]: r["accuracy"] for r in records}
    lines = [f"open-set recognition ({records[0]['splits']} splits, {len(accuracy)} of them; classifier "
             f"{records[0]['schedule']}): closed-set accuracy " + ", ".join(f"{a:.1f}" for a in accuracy.values())
             + " %", f"{'detector':<22}{'AUROC':>16}{'OSCR':>16}   (mean ± std over the splits)"]
    by_detector: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_detector.setdefault(r["detector"], []).append(r)
    for name, rows in sorted(by_detector.items(), key=lambda item: -np.mean([r["oscr"] for r in item[1]])):
        a, o = np.array([r["auroc"] for r in rows]), np.array([r["oscr"] for r in rows])
        lines.append(f"{name:<22}{a.mean():>9.2f} ± {a.std():<4.2f}{o.mean():>9.2f} ± {o.std():<4.2f}")
    return "\n".join(lines)
