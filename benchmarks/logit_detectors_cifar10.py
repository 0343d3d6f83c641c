"""Results table for the logit detectors, ODIN and the SCOD plug-in on the CIFAR-10 benchmark.

    PYTHONPATH=. python benchmarks/logit_detectors_cifar10.py --models cifar10_resnet20,cifar10_resnet56

Per model: every detector with its paper defaults, and tuned with :func:`oodscope.tune` on the validation splits
(ID ``val`` = CIFAR-10 val, OOD ``ood_val/tin`` = TIN val), both fitted on the ID ``train`` split; reported on the
ID ``test`` split against every OOD test set: AUROC and FPR@95 (ID positive) in percent, near and far means.
Temperature scaling fits T on the ``val`` split (``fit(train, val=val)``), also when tuned (its grid adds fixed T).

ODIN re-runs the network (forward, backward, forward), which is slow on 2 CPU cores: it is evaluated on a fixed
seeded subsample of ``--odin-n`` samples per test set and tuned on ``--odin-tune-n`` samples of each validation
split over a reduced grid (T in {1, 1000} x eps in {0, 0.0014, 0.0028}); its rows are marked ``(n=...)``.
Finally the SCOD AUC-RC (c_fn = 0.75, lower is better) of MSP, Energy and the SCOD plug-in rejector on the
pool (ID test + one OOD set). The last run's tables are in ``benchmarks/logit_detectors_cifar10.md``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import oodscope
from benchmarks.common import OOD_SETS, auroc_fpr, cifar_bench, cifar_outputs, fmt_params, group_means, pair
from benchmarks.common import subsample_outputs
from oodscope.extraction.outputs import Outputs
from oodscope.metrics import scod_auc_rc

DETECTORS = ["msp", "maxlogit", "energy", "entropy", "temperature", "gen", "kl_matching", "scod_plugin"]
ODIN_GRID = {"temperature": [1.0, 1000.0], "epsilon": [0.0, 0.0014, 0.0028]}


def subsample(out: Outputs, n: int, seed: int, name: str) -> Outputs:
    """``n`` seeded rows of ``out`` with the model source (ODIN re-runs the network on them), 250 per batch."""
    sub = subsample_outputs(out, n, seed, device="cpu", batch_size=250)
    sub.name = name
    return sub


def evaluate_row(detector, test: Outputs, oods: dict[str, Outputs]) -> dict[str, tuple[float, float]]:
    id_scores = detector.score(test)
    return {name: auroc_fpr(id_scores, detector.score(outputs)) for name, outputs in oods.items()}


def shown_params(params: dict) -> str:
    return fmt_params({k: v for k, v in params.items() if k != "ood_params"})


def print_table(model_name: str, rows: list[tuple[str, str, str, dict]]) -> None:
    print(f"\n### {model_name}: AUROC / FPR@95 (%), ID = CIFAR-10 test\n")
    short = [s.split("/")[1] for s in OOD_SETS]
    print("| detector | setting | params | " + " | ".join(short) + " | near mean | far mean |")
    print("|---|---|---|" + "---|" * (len(short) + 2))
    for detector, setting, params, metrics in rows:
        means = group_means(metrics)
        cells = [pair(metrics[s]) for s in OOD_SETS] + [pair(means["near"]), pair(means["far"])]
        print(f"| {detector} | {setting} | {params} | " + " | ".join(cells) + " |")


def run_model(model_name: str, args) -> None:
    start = time.perf_counter()
    bench = cifar_bench()
    out, model, pre = cifar_outputs(model_name, args.cache_dir, bench=bench)
    train, val, test, tin_val = out["train"], out["val"], out["test"], out["ood_val/tin"]
    oods = {s: out[s] for s in OOD_SETS}
    acc = 100 * np.mean(test.logits.argmax(1) == test.labels)
    print(f"\n{model_name}: outputs ready in {time.perf_counter() - start:.1f} s, ID test accuracy {acc:.2f} %")

    rows = []
    for name in DETECTORS:
        default = oodscope.create(name).fit(train, val=val)
        shown = {k: v for k, v in default.get_params().items()}
        rows.append((name, "default", shown_params(shown), evaluate_row(default, test, oods)))
        grid = oodscope.create(name).grid
        if grid:
            tuned = oodscope.tune(name, None, val, {"tin_val": tin_val}, train=train, val=val)
            rows.append((name, "tuned", shown_params(tuned.best_params), evaluate_row(tuned.best_detector, test, oods)))

    # ODIN on fixed subsamples (re-runs the network)
    t0 = time.perf_counter()
    sub = {key: subsample(out[key], args.odin_n, 0, key) for key in ["test", *OOD_SETS]}
    val_sub = subsample(val, args.odin_tune_n, 1, "val")
    tin_sub = subsample(tin_val, args.odin_tune_n, 1, "tin_val")
    odin = oodscope.create("odin").fit(sub["test"])
    rows.append((f"odin (n={args.odin_n})", "default", shown_params(odin.get_params()),
                 evaluate_row(odin, sub["test"], {s: sub[s] for s in OOD_SETS})))
    tuned = oodscope.tune("odin", ODIN_GRID, val_sub, {"tin_val": tin_sub})
    rows.append((f"odin (n={args.odin_n})", f"tuned (n={args.odin_tune_n})", shown_params(tuned.best_params),
                 evaluate_row(tuned.best_detector, sub["test"], {s: sub[s] for s in OOD_SETS})))
    print(f"ODIN: {time.perf_counter() - t0:.0f} s; tuning table:\n{tuned}")
    print_table(model_name, rows)

    # SCOD: joint risk-coverage of accepting ID test + one OOD set
    errors = test.logits.argmax(1) != test.labels
    print(f"\n{model_name}: SCOD AUC-RC x 100 (c_fn = 0.75, lower is better)\n")
    print("| rejector | " + " | ".join(s.split('/')[1] for s in OOD_SETS) + " |")
    print("|---|" + "---|" * len(OOD_SETS))
    for name, kw in [("msp", {}), ("energy", {}), ("scod_plugin", {}), ("scod_plugin", {"c_in": 0.0, "c_out": 0.1}),
                     ("scod_plugin", {"c_in": 0.0, "c_out": 0.01}), ("scod_plugin", {"c_in": 0.0, "c_out": 0.001})]:
        detector = oodscope.create(name, **kw).fit(train)
        id_scores = detector.score(test)
        cells = [f"{100 * scod_auc_rc(id_scores, errors, detector.score(oods[s])):.2f}" for s in OOD_SETS]
        print(f"| {name} {shown_params(kw) if kw else ''} | " + " | ".join(cells) + " |")
    print(f"\n{model_name}: total {time.perf_counter() - start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="cifar10_resnet20,cifar10_resnet56")
    parser.add_argument("--odin-n", type=int, default=500)
    parser.add_argument("--odin-tune-n", type=int, default=250)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (1 is faster on a crowded machine)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for model_name in args.models.split(","):
        run_model(model_name, args)


if __name__ == "__main__":
    main()
