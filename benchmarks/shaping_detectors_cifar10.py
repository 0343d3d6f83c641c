"""Results table for the activation-shaping and head-geometry detectors on the CIFAR-10 benchmark.

    PYTHONPATH=. python benchmarks/shaping_detectors_cifar10.py --models cifar10_resnet20,cifar10_resnet56

Per model: every detector with its paper defaults and tuned on the validation splits (ID ``val`` = CIFAR-10 val,
OOD ``ood_val/tin`` = TIN val; best mean AUROC over the detector's ``grid`` with :func:`oodscope.tune`), both fitted on the ID ``train`` split and reported
on the ID ``test`` split against every OOD test set: AUROC and FPR@95 (ID positive) in percent, near and far
means. Outputs are extracted once per model and cached (``--cache-dir``, default: the oodscope cache).

AdaSCALE re-runs the network (forward, backward, forward per sample), which is slow on 2 CPU cores: it is fitted
on ``--adascale-fit`` ID training samples (default 5,000, the method's default) and evaluated on a fixed seeded
subsample of ``--adascale-n`` samples per test set (rows marked ``n=...``, with SCALE on the same subsample for
comparison), with defaults only (``--adascale-n 0`` skips it). The last run's tables are in
``benchmarks/shaping_detectors_cifar10.md``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import oodscope
from benchmarks.common import OOD_SETS, auroc_fpr, cifar_bench, cifar_outputs, fmt_params, group_means, pair
from benchmarks.common import subsample_outputs
from oodscope.extraction.outputs import Outputs
from oodscope.tuning import tune
DETECTORS = ["react", "ash_p", "ash_b", "ash_s", "scale", "vra", "dice", "optimal_shaping", "residual", "neco",
             "gradnorm", "fdbd", "she", "vim", "energy"]


def grid_search(name: str, val: Outputs, ood_val: Outputs, train: Outputs) -> tuple[dict, oodscope.Detector]:
    """Best mean-AUROC setting of the detector's grid (:func:`oodscope.tune` on val vs TIN val)."""
    result = tune(name, None, val, {"tin_val": ood_val}, train=train)
    return result.best_params, result.best_detector


def evaluate_row(detector, test: Outputs, oods: dict[str, Outputs]) -> dict[str, tuple[float, float]]:
    id_scores = detector.score(test)
    return {name: auroc_fpr(id_scores, detector.score(o)) for name, o in oods.items()}


def subsample(out: Outputs, inputs: np.ndarray, n: int, seed: int) -> Outputs:
    """``n`` seeded rows with the model source on the split's images (AdaSCALE re-runs the network)."""
    return subsample_outputs(out, n, seed, inputs=inputs, device="cpu", batch_size=250)


def print_table(model_name: str, rows: list[tuple[str, str, str, dict]]) -> None:
    print(f"\n### {model_name}: AUROC / FPR@95 (%), ID = CIFAR-10 test\n")
    short = [s.split("/")[1] for s in OOD_SETS]
    print("| detector | setting | params | " + " | ".join(short) + " | near mean | far mean |")
    print("|---" * (len(short) + 5) + "|")
    for detector, setting, params, metrics in rows:
        means = group_means(metrics)
        cells = [pair(metrics[s]) for s in OOD_SETS] + [pair(means["near"]), pair(means["far"])]
        print(f"| {detector} | {setting} | {params} | " + " | ".join(cells) + " |")


def run_model(model_name: str, cache_dir: str, adascale_n: int, adascale_fit: int, skip_tuning: bool,
              only: list[str] | None = None) -> None:
    bench = cifar_bench()
    start = time.perf_counter()
    out, _, _ = cifar_outputs(model_name, cache_dir, bench=bench, device="cpu")
    print(f"\n{model_name}: outputs of {len(out)} splits in {time.perf_counter() - start:.1f} s "
          f"(ID test accuracy {100 * np.mean(out['test'].logits.argmax(1) == out['test'].labels):.2f} %)")
    train, test, val, ood_val = out["train"], out["test"], out["val"], out["ood_val/tin"]
    oods = {s: out[s] for s in OOD_SETS}
    rows = []
    for name in DETECTORS if only is None else [d for d in DETECTORS if d in only]:
        start = time.perf_counter()
        detector = oodscope.create(name).fit(train)
        rows.append((name, "default", fmt_params(detector.get_params()), evaluate_row(detector, test, oods)))
        if not skip_tuning and oodscope.detectors.get(name).grid:
            params, tuned = grid_search(name, val, ood_val, train)
            rows.append((name, "tuned", fmt_params(params), evaluate_row(tuned, test, oods)))
        print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
    if adascale_n:
        start = time.perf_counter()
        splits = bench.datasets()
        sub_test = subsample(test, splits["test"].inputs, adascale_n, 0)
        sub_oods = {s: subsample(out[s], splits[s].inputs, adascale_n, i + 1) for i, s in enumerate(OOD_SETS)}
        detector = oodscope.create("adascale", fit_samples=adascale_fit).fit(train)
        metrics = evaluate_row(detector, sub_test, sub_oods)
        rows.append(("adascale", f"default, n={adascale_n}", fmt_params(detector.get_params()), metrics))
        scale = oodscope.create("scale").fit(train)
        rows.append(("scale", f"default, n={adascale_n}", "same subsample", evaluate_row(scale, sub_test, sub_oods)))
        print(f"  adascale: {time.perf_counter() - start:.1f} s", flush=True)
    print_table(model_name, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cifar10_resnet20,cifar10_resnet56")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--adascale-n", type=int, default=1000)
    parser.add_argument("--adascale-fit", type=int, default=5000, help="ID samples for AdaSCALE's CDF (default 5000)")
    parser.add_argument("--skip-tuning", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated subset of the post-hoc detectors ('' = none)")
    args = parser.parse_args()
    for model_name in args.models.split(","):
        only = None if args.only is None else [d for d in args.only.split(",") if d]
        run_model(model_name, args.cache_dir, args.adascale_n, args.adascale_fit, args.skip_tuning, only)


if __name__ == "__main__":
    main()
