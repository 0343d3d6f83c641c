"""Per-OOD-set AUROC / FPR@95 of the models that ``finetune_cifar10.py`` fine-tuned (read from its checkpoints).

The main script keeps each run's last checkpoint in ``CACHE/<method>-seed<s>/finetune.pt`` (under
``CACHE/<epochs>x<max_steps>`` with the current script; ``CACHE/<method>-seed<s>-<epochs>x<max_steps>`` for the
first runs of ``finetune_cifar10.md``); the extraction cache makes this a re-read of the same outputs. Each method is
scored with its own score (the objective's ``score_detector()``) and the control with MSP, energy and SCALE. The
objectives that change the network rebuild their head (``adapt``) before the checkpoint is loaded and deploy it.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/finetune_cifar10_per_set.py --runs 3x79
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import oodscope
from benchmarks.common import auroc_fpr, cifar_bench, cifar_weights
from oodscope.models.cifar_resnet import cifar_preprocess, load_cifar_resnet
from oodscope.safeio import load_torch
from oodscope.training.compare import subsample
METHODS = ("cross_entropy", "oe", "energy_oe", "logitnorm", "mixoe", "dos", "mos", "abet", "ish")
CONTROL_SCORES = ("msp", "energy", "scale")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="3x79", help="the <epochs>x<max_steps> of the runs")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--per-set", type=int, default=2000)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "oodscope-finetune"))
    args = parser.parse_args()
    bench = cifar_bench()
    preprocess = cifar_preprocess("cifar10_resnet20")
    cache = Path(args.cache_dir)
    options = dict(preprocess=preprocess, cache_dir=cache, progress=False, batch_size=500)
    sets = {name: subsample(split, args.per_set)[0] for sets in bench.ood.values() for name, split in sets.items()}
    print(f"{'method':<14}{'score':<14}" + "".join(f"{name + ' AUROC':>16}{'FPR95':>8}" for name in sets))
    for method in METHODS:
        objective = oodscope.detectors.get(method)()
        results: dict = {}
        for seed in args.seeds.split(","):
            flat = cache / f"{method}-seed{seed}-{args.runs}" / "finetune.pt"
            path = flat if flat.exists() else cache / args.runs / f"{method}-seed{seed}" / "finetune.pt"
            pretrained = load_cifar_resnet("cifar10_resnet20", cifar_weights("cifar10_resnet20"))
            model = objective.adapt(pretrained, 10, (bench.train.inputs, bench.train.labels), preprocess)  # MOS:
            # its k-means groups come from the pretrained model's features, as in training
            model.load_state_dict(load_torch(path, what="fine-tuning checkpoint")["model"])
            model = objective.deploy(model).eval()
            detectors = [oodscope.create(d) for d in CONTROL_SCORES] if method == "cross_entropy" else \
                [objective.score_detector()]
            layers = sorted({layer for d in detectors for layer in d.layer_names()})
            test = oodscope.extract(model, subsample(bench.test, args.per_set), name="test", layers=layers,
                                    **options)
            for name, images in sets.items():
                ood = oodscope.extract(model, images, name=name, layers=layers, **options)
                for detector in detectors:
                    detector.fit(test)
                    results.setdefault(detector.label, {n: [] for n in sets})[name].append(
                        auroc_fpr(detector.score(test), detector.score(ood)))
        for score, by_set in results.items():
            cells = "".join(f"{np.mean([v[0] for v in by_set[n]]):>16.2f}"
                            f"{np.mean([v[1] for v in by_set[n]]):>8.2f}" for n in sets)
            print(f"{method:<14}{score:<14}{cells}", flush=True)


if __name__ == "__main__":
    main()
