"""ID accuracy vs OOD AUROC across models: is a better classifier a better OOD detector?

Teney, Lin, Oh & Abbasnejad, "ID and OOD Performance Are Sometimes Inversely Correlated on Real-world Datasets",
NeurIPS 2023: across models, ID accuracy and OOD performance need not rise together. The models are the
benchmark's model and the ``--ensemble`` models (for the CIFAR-10 zoo: ResNet-20/32/44/56, as trained); each is
scored the same way (every detector fitted on its own training outputs, ``n`` seeded images per test set), and per
detector and OOD group the protocol reports the Spearman and Kendall rank correlations of ID accuracy with the
group's mean AUROC over the models. ``benchmarks/id_ood_correlation.py`` adds the fine-tuned variants of the
training benchmark (31 models) and draws the scatter plot.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..metrics.correlation import rank_correlations  # the metric lives in oodscope.metrics; importable here too

N_IMAGES = 2000


def correlations(rows: list[dict[str, Any]], detectors: Sequence[str], groups: Sequence[str],
                 subset: str = "all") -> list[dict[str, Any]]:
    """One record per detector and group over ``rows`` (one per model: ``id_accuracy`` and
    ``"<detector> <group> auroc"``, the layout of :func:`oodscope.training.compare.evaluate_model`)."""
    accuracy = [r["id_accuracy"] for r in rows]
    return [{"models": subset, "n": len(rows), "detector": detector, "group": group,
             **rank_correlations(accuracy, [r[f"{detector} {group} auroc"] for r in rows])}
            for detector in detectors for group in groups]


def run(context) -> list[dict[str, Any]]:
    from sklearn.base import clone

    from ..training.compare import evaluate_model

    members = [("benchmark model", context.model, context.preprocess)] + list(context.ensemble)
    if len(members) < 3:
        raise ValueError("the correlation protocol compares models: pass at least two more with --ensemble "
                         "(e.g. the other zoo ResNets)")
    rows = []
    for name, model, preprocess in members:
        # unfitted clones: each model's detectors are fitted on that model's own training outputs (the
        # benchmark's detectors are already fitted on the benchmark model's)
        fresh = [clone(detector) for detector in context.detectors.values()]
        row = evaluate_model(model, preprocess, context.bench, detectors=fresh,
                             per_set=N_IMAGES, cache_dir=context.extract_options.get("cache_dir"),
                             device=context.device)
        rows.append({"model": name, **row})
    groups = list(context.bench.ood)
    records = [{**r, "dataset": "models", "setting": "correlation", "per_set": N_IMAGES,
                "model_list": [m for m, _, _ in members]}
               for r in correlations(rows, list(context.detectors), groups)]
    records += [{"detector": None, "dataset": row["model"], "setting": "correlation-models", **row}
                for row in rows]
    return records


def format_records(records: list[dict[str, Any]]) -> str:
    models = [r for r in records if r["setting"] == "correlation-models"]
    table = [r for r in records if r["setting"] == "correlation"]
    lines = ["ID accuracy vs OOD AUROC (Teney et al. 2023) over " + ", ".join(
        f"{r['dataset']} ({r['id_accuracy']:.2f} %)" for r in models),
        f"{'detector':<22}{'group':<8}{'Spearman (p)':>16}{'Kendall (p)':>16}"]
    for r in table:
        lines.append(f"{r['detector']:<22}{r['group']:<8}{r['spearman']:>+8.2f} ({r['spearman_p']:.3f})"
                     f"{r['kendall']:>+8.2f} ({r['kendall_p']:.3f})")
    return "\n".join(lines)
