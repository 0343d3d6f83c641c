"""A self-contained ``report.html`` for one benchmark run (its ``results.json``: :mod:`oodscope.results_io`).

The report holds a leaderboard (detector x OOD group, then every set), optional full-spectrum and
covariate-shift tables, one figure per detector (ROC curves of every OOD set against the ID test, score
histograms of every set) embedded as base64 PNGs, and the run's metadata (model, weights hash, data hashes,
package versions, timings). It needs no network and no files beside it. matplotlib is imported lazily.
"""

from __future__ import annotations

import base64
import html
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
    hist_ax.set(xlabel="score (higher = more OOD)", ylabel="density", title=f"{detector}: scores")
    roc_ax.legend(fontsize=7, loc="lower right")
    hist_ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.9, wspace=0.22)  # tight_layout is slow
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


# -- HTML ---------------------------------------------------------------------------------------------------------
STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}
th{background:#f2f2f2} td:first-child,th:first-child{text-align:left}
tr.best td{font-weight:bold} figure{margin:1em 0} img{max-width:100%}
code{background:#f6f6f6;padding:0 0.2em} .note{color:#555;font-size:0.9em}
"""
LOADED_SCRIPT = ("<script>window.addEventListener('load',function(){var n=0;for(var i=0;i<document.images.length;"
                 "i++){var im=document.images[i];if(im.complete&&im.naturalWidth>0)n++;}"
                 "document.body.setAttribute('data-images-loaded',String(n));});</script>")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return html.escape(str(value))


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None,
           table_id: str = "", best: Sequence[bool] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in (headers or columns))
    body = []
    for index, row in enumerate(rows):
        cls = ' class="best"' if best is not None and best[index] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_cell(row.get(c, ''))}</td>" for c in columns) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


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


def _leaderboard_html(means: Sequence[Mapping[str, Any]], groups: Sequence[str], seconds: Mapping[str, float] | None,
                      table_id: str) -> str:
    rows = leaderboard_rows(means, groups, seconds)
    columns = ["detector"] + [f"{g} {m}" for g in groups for m in ("auroc", "fpr95")] + ["mean auroc"]
    headers = ["detector"] + [f"{g} {METRIC_LABELS[m]}" for g in groups for m in ("auroc", "fpr95")] + ["mean AUROC"]
    if seconds is not None:
        columns.append("time [s]")
        headers.append("fit+score [s]")
    return _table(rows, columns, headers, table_id, best=[i == 0 for i in range(len(rows))])


def render_report(results: Results, meta: Mapping[str, Any], *, title: str = "oodscope benchmark report",
                  full_spectrum: Sequence[Mapping[str, Any]] = (), shifted_scores: Mapping[str, np.ndarray] | None = None,
                  shifted_name: str = "test_shifted") -> str:
    """The report as one HTML string (figures inline)."""
    groups = list(results.groups)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    summary = [f"benchmark <code>{html.escape(str(meta.get('benchmark', '')))}</code>",
               f"model <code>{html.escape(str(meta.get('model', '')))}</code>"]
    if results.id_accuracy is not None:
        summary.append(f"ID accuracy ({html.escape(results.id_name)}) <b id='id-accuracy'>"
                       f"{results.id_accuracy:.2f} %</b>")
    parts.append("<p>" + ", ".join(summary) + "</p>")
    parts.append("<h2>Leaderboard</h2><p class='note'>Mean over each group's OOD sets; metrics in percent; "
                 "FPR@95 = share of OOD accepted when 95 % of ID is kept; higher AUROC is better.</p>")
    parts.append(_leaderboard_html(results.group_means(), groups, results.seconds, "leaderboard"))
    notes = results.degenerate_notes()
    if notes:
        parts.append("<h3>Results that need a word</h3><ul id='degenerate-notes'>"
                     + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Every OOD set</h2>")
    columns = ["detector", "group", "dataset", *METRICS]
    parts.append(_table(results.records, columns, ["detector", "group", "dataset",
                                                   *[METRIC_LABELS[m] for m in METRICS]], "per-dataset"))
    if full_spectrum:
        fs_means = [r for r in full_spectrum if r.get("setting") == "full-spectrum" and r["dataset"] == "mean"]
        shift = [r for r in full_spectrum if r.get("setting") == "shift-sensitivity"]
        parts.append(f"<h2>Full-spectrum</h2><p class='note'>ID = {html.escape(results.id_name)} + its "
                     f"covariate-shifted copy <code>{html.escape(shifted_name)}</code> (common corruptions).</p>")
        parts.append(_leaderboard_html(fs_means, groups, None, "full-spectrum"))
        parts.append("<h3>Reaction to covariate shift</h3><p class='note'>Clean ID test vs its shifted copy: "
                     "AUROC 50 = the detector ignores the shift; <i>flagged</i> = % of shifted ID images flagged "
                     "OOD at the threshold that keeps 95 % of the clean ID test (5 = no reaction).</p>")
        columns = ["detector", "auroc", "flagged"] + (["shifted_accuracy"] if shift and "shifted_accuracy"
                                                      in shift[0] else [])
        parts.append(_table(sorted(shift, key=lambda r: r["flagged"]), columns,
                            ["detector", "AUROC clean vs shifted", "flagged [%]", "accuracy on shifted [%]"][
                                :len(columns)], "shift-sensitivity"))
    parts.append("<h2>ROC curves and score distributions</h2>")
    for detector, by_set in results.scores.items():
        extra = {shifted_name: shifted_scores[detector]} if shifted_scores and detector in shifted_scores else None
        png = base64.b64encode(detector_figure(detector, by_set, results.id_name, extra)).decode("ascii")
        parts.append(f"<figure><img alt='{html.escape(detector)}: ROC curves and score histograms' "
                     f"src='data:image/png;base64,{png}'><figcaption>{html.escape(detector)}</figcaption></figure>")
    parts.append("<h2>Run</h2>")
    parts.append(_meta_html(meta))
    parts.append(LOADED_SCRIPT + "</body></html>")
    return "\n".join(parts)


def _meta_html(meta: Mapping[str, Any]) -> str:
    rows = []
    for key, value in meta.items():
        if isinstance(value, Mapping):
            value = "<br>".join(f"{html.escape(str(k))}: <code>{_cell(v)}</code>" for k, v in value.items())
        else:
            value = _cell(value)
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td style='text-align:left'>{value}</td></tr>")
    return f"<table id='metadata'>{''.join(rows)}</table>"


def write_report(path: str | Path, results: Results, meta: Mapping[str, Any], **options: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(results, meta, **options), encoding="utf-8")
    return path

