"""Generative OOD on the shared CIFAR-10 bench: a PixelCNN's likelihood, its famous failure and the corrections.

One PixelCNN (discretised logistic, :mod:`oodscope.generative.pixelcnn`) is trained on the 10,000 ID train images
with a CPU schedule (``--epochs``, default 3; Adam, lr 1e-3, batch 64, seed 0), and, for the likelihood ratio, a
background model on the same images with 20 % of the values replaced by uniform noise. The four detectors share
those two models. Scores on a fixed random subsample of ``--per-set`` images of the ID test set and of each OOD set
(CIFAR-100 and Tiny ImageNet near, MNIST and Textures far): AUROC and FPR@95 (percent), and the bits/dim of the ID
test images next to the published CIFAR-10 figures of the architecture (PixelCNN 3.00, PixelCNN++ 2.92).

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/generative_cifar10.py --epochs 3 \
        --out benchmarks/results/generative_cifar10.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-bench"
DETECTORS = ("pixelcnn_nll", "likelihood_ratio", "input_complexity", "typicality")
PUBLISHED_BPD = {"PixelCNN (van den Oord et al. 2016)": 3.00, "PixelCNN++ (Salimans et al. 2017)": 2.92}


def main() -> None:
    import oodscope
    from oodscope.data.spec import load_benchmark_dir
    from oodscope.metrics import ood_metrics
    from oodscope.training.compare import subsample

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--train", type=int, default=0, help="ID training images (0: all 10,000)")
    parser.add_argument("--per-set", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/generative_cifar10.json")
    args = parser.parse_args()

    bench = load_benchmark_dir(BENCH)
    train = subsample(bench.train, args.train)[0]
    test = subsample(bench.test, args.per_set)[0]
    ood = {f"{group}/{name}": subsample(split, args.per_set)[0] for group, sets in bench.ood.items()
           for name, split in sets.items()}
    settings = dict(hidden=args.hidden, blocks=args.blocks, epochs=args.epochs, device=args.device)
    rows, fits = [], {}
    for name in DETECTORS:
        start = time.perf_counter()
        detector = oodscope.create(name, **settings).fit(train)
        fits[name] = time.perf_counter() - start
        id_scores = detector.score(test)
        for set_name, images in ood.items():
            values = ood_metrics(id_scores, detector.score(images))
            rows.append({"detector": name, "dataset": set_name, "auroc": 100 * values["auroc"],
                         "fpr95": 100 * values["fpr95"]})
        print(name, f"fit {fits[name]:.1f} s", {r["dataset"]: round(r["auroc"], 2) for r in rows
                                                 if r["detector"] == name}, flush=True)
    nll = oodscope.create("pixelcnn_nll", **settings).fit(train)  # the shared model (cached in memory)
    bpd = {"id_test": float(np.mean(nll.score(test))),
           **{name: float(np.mean(nll.score(images))) for name, images in ood.items()}}
    ratio = oodscope.create("likelihood_ratio", **settings).fit(train)
    result = {"args": vars(args), "rows": rows, "fit_seconds": fits, "bits_per_dim": bpd,
              "training": nll.training_, "background_training": ratio.background_training_,
              "published_bpd": PUBLISHED_BPD}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    sets = list(ood)
    print("| score | " + " | ".join(f"{s} AUROC / FPR95" for s in sets) + " |")
    print("|---|" + "---|" * len(sets))
    for name in DETECTORS:
        cells = {r["dataset"]: r for r in rows if r["detector"] == name}
        print(f"| {name} | " + " | ".join(f"{cells[s]['auroc']:.2f} / {cells[s]['fpr95']:.2f}" for s in sets) + " |")
    print("bits/dim:", {k: round(v, 3) for k, v in bpd.items()}, "training per epoch:", nll.training_)


if __name__ == "__main__":
    main()
