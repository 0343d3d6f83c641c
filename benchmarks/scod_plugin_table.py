"""SCOD AUC-RC of the plug-in rejector and its baselines on the CIFAR-10 benchmark (cached outputs only).

    PYTHONPATH=. python benchmarks/scod_plugin_table.py [--models cifar10_resnet20,cifar10_resnet56]

Narasimhan et al. (ICLR 2024): the test pool is the ID test split plus one OOD test set; an accepted misclassified
ID sample costs ``1 - c_fn``, an accepted OOD sample ``c_fn`` (``c_fn = 0.75``); the joint risk is the summed cost
of the accepted samples over their number, AUC-RC its area over coverage (x 100, lower is better). Rows:

* ``msp``: Chow's rule (selective classification only); ``energy``: OOD detection only.
* ``scod_plugin``: the plug-in rejector's budget family ``t(x)`` with the energy score as density ratio
  (``rho = exp(energy - median)``), ``pi_in = 0.5`` (default) and with the pool's true ID share ``pi_in = n_id /
  (n_id + n_ood)`` (the paper estimates ``pi_in`` from the test pool), and with ``maxlogit`` through the paper's
  ``theta(z) = -1/z`` (``ratio="inverse"``).
* ``scod_plugin fixed``: the fixed-cost Lemma 3.1 score with ``c_in = 0, c_out = 0.5`` (the earlier default).
* ``plug-in BB [L1] (our reading)``: the budget score ``t(x)`` (``c_fn = 0.75, pi_in = 0.5``) with the paper's
  ``theta(z) = -1/z`` applied to the L1 norm of the penultimate features, ``rho = 1 / ||z||_1`` - our guess at the
  paper's "Plug-in BB [L1]" (named after SIRC [L1] of Xia & Bouganis 2022, whose secondary score is that norm); the
  paper's text could not be read, so this is not a confirmed reproduction. Computed from the functions, since
  oodscope has no feature-norm detector.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.special import softmax

import oodscope
from benchmarks.common import OOD_SETS, auroc_fpr, cifar_bench, cifar_outputs
from oodscope.detectors.scod_plugin import lagrangian_score
from oodscope.metrics import scod_auc_rc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cifar10_resnet20,cifar10_resnet56")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    bench = cifar_bench()
    for model_name in args.models.split(","):
        out, _, _ = cifar_outputs(model_name, args.cache_dir, bench=bench, device="cpu")
        train, test = out["train"], out["test"]
        errors = test.logits.argmax(1) != test.labels
        rows = {
            "msp (Chow)": lambda n_ood: oodscope.create("msp"),
            "energy (OOD only)": lambda n_ood: oodscope.create("energy"),
            "scod_plugin (energy, pi_in=0.5)": lambda n_ood: oodscope.create("scod_plugin"),
            "scod_plugin (energy, pi_in=pool share)":
                lambda n_ood: oodscope.create("scod_plugin", pi_in=len(test) / (len(test) + n_ood)),
            "scod_plugin (maxlogit, ratio=inverse, pi_in=0.5)":
                lambda n_ood: oodscope.create("scod_plugin", ood="maxlogit", ratio="inverse"),
            "scod_plugin fixed (c_in=0, c_out=0.5)": lambda n_ood: oodscope.create("scod_plugin", c_in=0.0,
                                                                                    c_out=0.5),
        }
        oods = {s: out[s] for s in OOD_SETS}
        default = oodscope.create("scod_plugin").fit(train)
        tuned = oodscope.tune("scod_plugin", None, out["val"], {"tin_val": out["ood_val/tin"]}, train=train)
        print(f"\n{model_name}: scod_plugin rows for logit_detectors_cifar10.md (AUROC / FPR@95 %)\n")
        for setting, params, detector in [("default", default.get_params(), default),
                                          ("tuned", tuned.best_params, tuned.best_detector)]:
            id_scores = detector.score(test)
            cells = [auroc_fpr(id_scores, detector.score(oods[s])) for s in OOD_SETS]
            means = [np.mean(np.array(cells)[[0, 1]], axis=0), np.mean(np.array(cells)[[2, 3]], axis=0)]
            shown = ", ".join(f"{k}={v}" for k, v in params.items() if k in ("ood", "c_fn", "pi_in", "ratio"))
            print(f"| scod_plugin | {setting} | {shown} | "
                  + " | ".join(f"{a:.2f} / {f:.2f}" for a, f in [*cells, *means]) + " |")
        print(f"\n{model_name}: SCOD AUC-RC x 100 (c_fn = 0.75, lower is better; ID test accuracy "
              f"{100 * (1 - errors.mean()):.2f} %)\n")
        print("| rejector | " + " | ".join(s.split("/")[1] for s in OOD_SETS) + " | mean |")
        print("|---|" + "---|" * (len(OOD_SETS) + 1))
        for label, make in rows.items():
            cells = []
            for s in OOD_SETS:
                detector = make(len(out[s])).fit(train)
                cells.append(100 * scod_auc_rc(detector.score(test), errors, detector.score(out[s]), c_fn=0.75))
            print(f"| {label} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {np.mean(cells):.2f} |")

        def l1_plugin(x):
            msp = softmax(np.asarray(x.logits, dtype=np.float64), axis=1).max(axis=1)
            return lagrangian_score(msp, 1.0 / np.abs(x.features).sum(1), c_fn=0.75, pi_in=0.5)

        cells = [100 * scod_auc_rc(l1_plugin(test), errors, l1_plugin(out[s]), c_fn=0.75) for s in OOD_SETS]
        print("| plug-in BB [L1] (our reading: rho = 1 / feature L1 norm, pi_in=0.5) | "
              + " | ".join(f"{c:.2f}" for c in cells) + f" | {np.mean(cells):.2f} |")


if __name__ == "__main__":
    main()
