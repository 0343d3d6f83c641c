"""Per-OOD-set AUROC / FPR@95 of the models that ``finetune_cifar10.py`` fine-tuned (read from its checkpoints).

The main script keeps each run's last checkpoint in ``CACHE/<method>-seed<s>/finetune.pt`` (under
``CACHE/<epochs>x<max_steps>`` with the current script; ``CACHE/<method>-seed<s>-<epochs>x<max_steps>`` for the
runs in ``finetune_cifar10.md``); the extraction cache makes this a re-read of the same outputs. Each method is
scored with its own score (MSP, or energy for energy-OE) and the control with both.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/finetune_cifar10_per_set.py --runs 3x79
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import oodscope
from oodscope.data.spec import load_benchmark_dir
from oodscope.models.cifar_resnet import build_cifar_resnet, cifar_preprocess
from oodscope.training.compare import subsample

BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-bench"
SCORES = {"cross_entropy": ("msp", "energy"), "oe": ("msp",), "energy_oe": ("energy",), "logitnorm": ("msp",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="3x79", help="the <epochs>x<max_steps> of the runs")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--per-set", type=int, default=2000)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "oodscope-finetune"))
    args = parser.parse_args()
    bench = load_benchmark_dir(BENCH)
    preprocess = cifar_preprocess("cifar10_resnet20")
    cache = Path(args.cache_dir)
    options = dict(preprocess=preprocess, cache_dir=cache, progress=False, batch_size=500)
    sets = {name: subsample(split, args.per_set)[0] for sets in bench.ood.values() for name, split in sets.items()}
    print(f"{'method':<14}{'score':<8}" + "".join(f"{name + ' AUROC':>16}{'FPR95':>8}" for name in sets))
    for method, scores in SCORES.items():
        results = {score: {name: [] for name in sets} for score in scores}
        for seed in args.seeds.split(","):
            path = cache / f"{method}-seed{seed}-{args.runs}" / "finetune.pt"
            model = build_cifar_resnet("cifar10_resnet20")
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
            model.eval()
            test = oodscope.extract(model, subsample(bench.test, args.per_set), name="test", **options)
            for name, images in sets.items():
                ood = oodscope.extract(model, images, name=name, **options)
                for score in scores:
                    detector = oodscope.create(score).fit(test)
                    m = oodscope.metrics.ood_metrics(detector.score(test), detector.score(ood))
                    results[score][name].append((100 * m["auroc"], 100 * m["fpr95"]))
        for score in scores:
            cells = "".join(f"{np.mean([v[0] for v in results[score][n]]):>16.2f}"
                            f"{np.mean([v[1] for v in results[score][n]]):>8.2f}" for n in sets)
            print(f"{method:<14}{score:<8}{cells}")


if __name__ == "__main__":
    main()
