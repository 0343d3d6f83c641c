"""A self-contained ``report.html`` for one benchmark run (its ``results.json``: :mod:`oodscope.results_io`).

Rendered from the Jinja2 template ``templates/report.html.j2``: a sortable, filterable leaderboard (detector x
OOD group), notes on degenerate results, a heatmap of AUROC per detector and OOD set, optional full-spectrum and
covariate-shift tables, one section per detector (anchor ``#det-NAME``: its parameters, its per-set metrics, ROC
curves of every OOD set against the ID test and log-scale score histograms as an inline PNG), and the run's
metadata (model, weights hash, data hashes, package versions, timings). It needs no network and no files beside
it; the only script is the table sorting and filtering. matplotlib is imported lazily.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..evaluation import METRICS, Results
from ..results_io import command_line, package_versions  # noqa: F401 - re-exported

METRIC_LABELS = {"auroc": "AUROC", "fpr95": "FPR@95", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out"}


# -- figures -----------------------------------------------------------------------------------------------------
def _roc_points(id_scores: np.ndarray, ood_scores: np.ndarray, max_points: int = 400) -> tuple[np.ndarray, ...]:
    """ROC curve (x: share of ID flagged, y: share of OOD flagged), thinned to about ``max_points``."""
    scores = np.concatenate([id_scores, ood_scores])
    is_ood = np.r_[np.zeros(len(id_scores), bool), np.ones(len(ood_scores), bool)]
    order = np.argsort(-scores, kind="mergesort")
    scores, is_ood = scores[order], is_ood[order]
    ends = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tpr = np.r_[0.0, np.cumsum(is_ood)[ends] / max(1, len(ood_scores))]
    fpr = np.r_[0.0, np.cumsum(~is_ood)[ends] / max(1, len(id_scores))]
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), max_points)).astype(int))
    return fpr[keep], tpr[keep]


def detector_figure(detector: str, by_set: Mapping[str, np.ndarray], id_name: str,
                    extra_id: Mapping[str, np.ndarray] | None = None, bins: int = 50) -> bytes:
    """PNG bytes: ROC curves of every OOD set vs the ID test (left) and score histograms (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra_id = dict(extra_id or {})
    fig, (roc_ax, hist_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    id_scores = by_set[id_name]
    sets = {**{id_name: id_scores}, **extra_id, **{k: v for k, v in by_set.items() if k != id_name}}
    values = np.concatenate(list(sets.values()))
    low, high = np.percentile(values, [0.5, 99.5])
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    for index, (name, scores) in enumerate(sets.items()):
        color = "0.25" if name == id_name else f"C{index}"
        if name != id_name:
            fpr, tpr = _roc_points(id_scores, scores)
            roc_ax.plot(fpr, tpr, color=color, linewidth=1.4, linestyle="--" if name in extra_id else "-",
                        label=name)
        hist_ax.hist(np.clip(scores, edges[0], edges[-1]), bins=edges, density=True, color=color,
                     histtype="stepfilled" if name == id_name else "step", alpha=0.35 if name == id_name else 0.9,
                     linewidth=1.3, label=f"{name} (ID)" if name == id_name else name)
    roc_ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8)
    roc_ax.set(xlabel=f"share of {id_name} flagged (FPR)", ylabel="share of set flagged (TPR)",
               title=f"{detector}: ROC vs {id_name}", xlim=(0, 1), ylim=(0, 1.01))
    hist_ax.set_yscale("log")  # a saturated detector piles most scores in one bin: linear counts hide the rest
    hist_ax.set(xlabel="score (higher = more OOD)", ylabel="density (log scale)", title=f"{detector}: scores")
    roc_ax.legend(fontsize=7, loc="lower right")
    hist_ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.9, wspace=0.22)  # tight_layout is slow
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


# -- HTML ---------------------------------------------------------------------------------------------------------
TEMPLATE = "report.html.j2"
OOD_INTRO = ("Mean over each group's OOD sets; metrics in percent; FPR@95 = share of OOD accepted when 95 % of ID is "
             "kept; higher AUROC is better.")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None,
           best: Sequence[bool] | None = None) -> dict[str, Any]:
    """A table for the template: header labels, rows of formatted cells, which rows are bold."""
    return {"headers": list(headers or columns), "rows": [[_cell(row.get(c, "")) for c in columns] for row in rows],
            "best": list(best) if best is not None else None}


def leaderboard_rows(means: Sequence[Mapping[str, Any]], groups: Sequence[str],
                     seconds: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per detector: AUROC and FPR@95 per group and their average over groups, best first."""
    rows: dict[str, dict[str, Any]] = {}
    for record in means:
        row = rows.setdefault(record["detector"], {"detector": record["detector"]})
        row[f"{record['group']} auroc"] = record["auroc"]
        row[f"{record['group']} fpr95"] = record["fpr95"]
    for row in rows.values():
        row["mean auroc"] = float(np.mean([row[f"{g} auroc"] for g in groups if f"{g} auroc" in row]))
        if seconds is not None and row["detector"] in seconds:
            row["time [s]"] = float(seconds[row["detector"]])
    return sorted(rows.values(), key=lambda r: -r["mean auroc"])


def _leaderboard(means: Sequence[Mapping[str, Any]], groups: Sequence[str],
                 seconds: Mapping[str, float] | None) -> dict[str, Any]:
    rows = leaderboard_rows(means, groups, seconds)
    columns = ["detector"] + [f"{g} {m}" for g in groups for m in ("auroc", "fpr95")] + ["mean auroc"]
    headers = ["detector"] + [f"{g} {METRIC_LABELS[m]}" for g in groups for m in ("auroc", "fpr95")] + ["mean AUROC"]
    if seconds is not None:
        columns.append("time [s]")
        headers.append("fit+score [s]")
    return _table(rows, columns, headers, best=[i == 0 for i in range(len(rows))])


def heat_color(auroc: float) -> str:
    """Background of a heatmap cell: red at AUROC 50 or below (blind or inverted), yellow at 75, green at 100."""
    share = float(np.clip((auroc - 50.0) / 50.0, 0.0, 1.0))
    return f"hsl({120.0 * share:.0f}, 65%, 80%)"


def anchor(name: str) -> str:
    """An HTML id for a detector label (letters, digits, ``-`` and ``_``)."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _heatmap(results: Results) -> dict[str, Any]:
    """AUROC per detector (leaderboard order) and (group, dataset); a dataset name that appears in several groups
    (one data set under two protocols) is labelled with its group."""
    pairs = [(group, name) for group, names in results.groups.items() for name in names]
    repeated = {name for _, name in pairs if sum(n == name for _, n in pairs) > 1}
    columns = [f"{name} ({group})" if name in repeated else name for group, name in pairs]
    order = [r["detector"] for r in leaderboard_rows(results.group_means(), list(results.groups))]
    by_key = {(r["detector"], r["group"], r["dataset"]): r["auroc"] for r in results.records}
    rows = []
    for detector in order:
        cells = [{"value": f"{by_key[detector, g, n]:.4f}", "text": f"{by_key[detector, g, n]:.1f}",
                  "color": heat_color(by_key[detector, g, n])} if (detector, g, n) in by_key else
                 {"value": "", "text": "", "color": "#fff"} for g, n in pairs]
        rows.append({"detector": detector, "anchor": anchor(detector), "cells": cells})
    return {"columns": columns, "rows": rows}


def _params(detector: Any) -> dict[str, str]:
    if detector is None or not hasattr(detector, "get_params"):
        return {}
    return {k: repr(v) for k, v in detector.get_params(deep=False).items()}


def render_report(results: Results, meta: Mapping[str, Any], *, title: str = "oodscope benchmark report",
                  full_spectrum: Sequence[Mapping[str, Any]] = (), shifted_scores: Mapping[str, np.ndarray] | None = None,
                  shifted_name: str = "test_shifted", detectors: Mapping[str, Any] | None = None,
                  intro: str = OOD_INTRO) -> str:
    """The report as one HTML string (a Jinja2 template; figures inline, no network)."""
    import jinja2

    groups = list(results.groups)
    means = {r["detector"]: r for r in leaderboard_rows(results.group_means(), groups)}
    notes = results.degenerate_notes()
    sections = []
    names = list(results.scores) or list(dict.fromkeys(r["detector"] for r in results.records))
    ranked = sorted(names, key=lambda d: -means.get(d, {}).get("mean auroc", -1.0))  # leaderboard order
    for detector in ranked:
        png = None
        if detector in results.scores:  # per-sample scores (a benchmark run): ROC curves and histograms
            extra = {shifted_name: shifted_scores[detector]} if shifted_scores and detector in shifted_scores else None
            figure = detector_figure(detector, results.scores[detector], results.id_name, extra)
            png = base64.b64encode(figure).decode("ascii")
        per_set = [r for r in results.records if r["detector"] == detector]
        sections.append({"name": detector, "anchor": anchor(detector), "png": png,
                         "mean_auroc": means.get(detector, {}).get("mean auroc"),
                         "params": _params((detectors or {}).get(detector)),
                         "note": " ".join(n for n in notes if n.startswith(f"{detector}:")),
                         "per_set": _table(per_set, ["group", "dataset", *METRICS],
                                           ["group", "dataset", *[METRIC_LABELS[m] for m in METRICS]])})
    fs_table = shift_table = None
    if full_spectrum:
        fs_means = [r for r in full_spectrum if r.get("setting") == "full-spectrum" and r["dataset"] == "mean"]
        shift = [r for r in full_spectrum if r.get("setting") == "shift-sensitivity"]
        fs_table = _leaderboard(fs_means, groups, None)
        columns = ["detector", "auroc", "flagged"] + (["shifted_accuracy"] if shift and "shifted_accuracy"
                                                      in shift[0] else [])
        shift_table = _table(sorted(shift, key=lambda r: r["flagged"]), columns,
                             ["detector", "AUROC clean vs shifted", "flagged [%]", "accuracy on shifted [%]"][
                                 :len(columns)])
    environment = jinja2.Environment(loader=jinja2.PackageLoader("oodscope.report", "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.get_template(TEMPLATE).render(
        title=title, benchmark=str(meta.get("benchmark", "")), model=str(meta.get("model", "")),
        id_accuracy=results.id_accuracy, id_name=results.id_name, notes=notes,
        leaderboard=_leaderboard(results.group_means(), groups, results.seconds), heatmap=_heatmap(results),
        full_spectrum=fs_table, shift=shift_table, shifted_name=shifted_name, detectors=sections,
        meta=_meta_rows(meta), intro=intro)


def _meta_rows(meta: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(key, value)`` pairs; a mapping value becomes ``k: v`` lines (escaped by the template, joined with
    line breaks that the template marks safe)."""
    from markupsafe import Markup, escape

    rows = []
    for key, value in meta.items():
        if isinstance(value, Mapping):
            value = Markup("<br>").join(Markup("{}: <code>{}</code>").format(k, _cell(v)) for k, v in value.items())
        else:
            value = escape(_cell(value))
        rows.append((str(key), value))
    return rows


def write_report(path: str | Path, results: Results, meta: Mapping[str, Any], **options: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(results, meta, **options), encoding="utf-8")
    return path

