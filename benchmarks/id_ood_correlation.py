"""ID accuracy vs OOD AUROC across models: is a better classifier a better OOD detector?

Teney, Lin, Oh & Abbasnejad, "ID and OOD Performance Are Sometimes Inversely Correlated on Real-world Datasets",
NeurIPS 2023: across models, ID accuracy and OOD performance need not rise together. Here the models are the four
CIFAR-10 ResNets of the shared zoo (20/32/44/56, as trained) and the fine-tuned ResNet-20 variants of
``benchmarks/finetune_cifar10.py`` (every objective x seed in its results file). For each detector and OOD group the
script prints the Spearman and Kendall rank correlations of ID accuracy with AUROC, over all models, over the zoo
only and over the fine-tuned variants only, and draws the scatter plot.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/id_ood_correlation.py \
        --finetuned benchmarks/results/finetune_cifar10_3ep.json --out benchmarks/results/id_ood_correlation.json

The zoo models are scored the same way as the fine-tuned ones (``oodscope.training.compare.evaluate_model``, the
same fixed subsample of ``--per-set`` images per test set), so all points are comparable.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from benchmarks.common import cifar_bench, cifar_weights, write_json
from oodscope.safeio import write_atomic

ZOO = ("cifar10_resnet20", "cifar10_resnet32", "cifar10_resnet44", "cifar10_resnet56")
DETECTORS = ("msp", "energy", "knn")
GROUPS = ("near", "far")


def zoo_rows(per_set: int, cache: Path) -> list[dict]:
    from oodscope.models.cifar_resnet import cifar_preprocess, load_cifar_resnet
    from oodscope.training.compare import evaluate_model

    bench = cifar_bench()
    rows = []
    for name in ZOO:
        model = load_cifar_resnet(name, cifar_weights(name))
        row = evaluate_model(model, cifar_preprocess(name), bench, per_set=per_set, cache_dir=cache)
        rows.append({"model": name, "kind": "zoo", **row})
        print(name, {k: round(v, 2) for k, v in row.items() if k == "id_accuracy" or "auroc" in k}, flush=True)
    return rows


def correlations(rows: list[dict]) -> list[dict]:
    """The protocol's rank correlations over all models, the zoo only and the fine-tuned variants only."""
    from oodscope.protocols.correlation import correlations as over

    return [record for subset, chosen in (("all", rows), ("zoo", [r for r in rows if r["kind"] == "zoo"]),
                                          ("fine-tuned", [r for r in rows if r["kind"] == "fine-tuned"]))
            for record in over(chosen, DETECTORS, GROUPS, subset)]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(GROUPS), len(DETECTORS), figsize=(12, 7), sharex=True)
    for i, group in enumerate(GROUPS):
        for j, detector in enumerate(DETECTORS):
            ax = axes[i, j]
            for kind, marker in (("zoo", "s"), ("fine-tuned", "o")):
                chosen = [r for r in rows if r["kind"] == kind]
                ax.scatter([r["id_accuracy"] for r in chosen], [r[f"{detector} {group} auroc"] for r in chosen],
                           marker=marker, label=kind, alpha=0.8)
            ax.set_title(f"{detector}, {group}-OOD")
            ax.set_xlabel("ID accuracy (%)")
            ax.set_ylabel("AUROC (%)")
    axes[0, 0].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetuned", default="benchmarks/results/finetune_cifar10_3ep.json")
    parser.add_argument("--per-set", type=int, default=2000)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "oodscope-finetune"))
    parser.add_argument("--out", default="benchmarks/results/id_ood_correlation.json")
    args = parser.parse_args()

    finetuned = json.loads(Path(args.finetuned).read_text())
    if finetuned["args"]["per_set"] != args.per_set:
        raise SystemExit(f"--per-set {args.per_set} differs from the fine-tuning run's {finetuned['args']['per_set']}")
    rows = zoo_rows(args.per_set, Path(args.cache_dir))
    rows += [{"model": f"resnet20+{r['method']} seed {r['seed']}", "kind": "fine-tuned", **r}
             for r in finetuned["rows"]]
    table = correlations(rows)
    out = write_json(args.out, {"rows": rows, "correlations": table})
    plot(rows, out.with_suffix(".png"))
    print("| models | n | detector | group | Spearman rho (p) | Kendall tau (p) |\n|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['models']} | {r['n']} | {r['detector']} | {r['group']} | {r['spearman']:+.2f} "
              f"({r['spearman_p']:.3f}) | {r['kendall']:+.2f} ({r['kendall_p']:.3f}) |")


if __name__ == "__main__":
    main()
