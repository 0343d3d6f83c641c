"""NAC on ResNet-20: the same neuron states binned with the authors' interval edges and with pytorch-ood's.

    PYTHONPATH=. python benchmarks/nac_interval_edges.py [--n-train 1000 --n-eval 500]

NAC-UE (Liu et al., ICLR 2024) scores a sample by the training coverage of the intervals its neuron states fall
in. oodscope takes the authors' edges (``oodscope.detectors.nac.interval_edges``); pytorch-ood 0.4.0 spaces them
log-uniformly from 1e-6 to 0.5, mirrored around 0.5 (re-written here from its documented construction, so that
pytorch-ood itself is not needed). Both binnings run on oodscope's states of the same fixed subsamples (train, ID
test, CIFAR-100), with coverage ``min(count / o_star, 1)`` (``o_star = 50``) per interval, averaged over the 64
penultimate units. Prints the CIFAR-100 AUROC of each binning and quantiles of the ID test states: the states agree
with pytorch-ood's, so the edges explain the difference of the two libraries
(``benchmarks/distance_detectors_vs_pytorch_ood.py``).
"""

from __future__ import annotations

import argparse

import numpy as np

import oodscope
from benchmarks.common import cifar_model, cifar_subset_outputs
from oodscope.detectors.nac import interval_edges
from oodscope.metrics import auroc

O_STAR = 50


def pytorch_ood_edges(m: int, eps: float = 1e-6) -> np.ndarray:
    """pytorch-ood's ``m`` intervals: log-spaced edges from ``eps`` to 0.5, mirrored to (0.5, 1)."""
    left = np.logspace(np.log10(eps), np.log10(0.5), m // 2 + 1)
    return np.r_[left, (1 - left[::-1])[1:]]


def coverage_scores(states: dict[str, np.ndarray], edges: np.ndarray) -> dict[str, np.ndarray]:
    """NAC-UE's score (higher = more OOD: minus the mean coverage) of every set, coverage counted on ``train``."""
    n_bins, units = len(edges) - 1, states["train"].shape[1]
    bins = {k: np.clip(np.searchsorted(edges, v, side="right") - 1, 0, n_bins - 1) for k, v in states.items()}
    counts = np.bincount((bins["train"] + np.arange(units) * n_bins).ravel(), minlength=units * n_bins)
    coverage = np.minimum(counts.reshape(units, n_bins) / O_STAR, 1.0)
    return {k: -coverage[np.arange(units), b].mean(axis=1) for k, b in bins.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-eval", type=int, default=500)
    args = parser.parse_args()
    model, preprocess = cifar_model("cifar10_resnet20")
    sizes = {"train": args.n_train, "test": args.n_eval, "near/cifar100": args.n_eval}
    nac = oodscope.create("nac")
    states = {split: nac.states(cifar_subset_outputs("cifar10_resnet20", model, preprocess, split, n))[0]
              for split, n in sizes.items()}
    quantiles = np.quantile(states["test"], [0.05, 0.5, 0.95]).round(4)
    for label, edges in (("authors", interval_edges(50)), ("pytorch-ood", pytorch_ood_edges(50))):
        scores = coverage_scores(states, edges)
        print(f"{label:<12} cifar100 AUROC {100 * auroc(scores['test'], scores['near/cifar100']):.2f}  "
              f"ID test state quantiles (5/50/95 %) {quantiles}")


if __name__ == "__main__":
    main()
