"""A self-contained ``report.html`` for one benchmark run (its ``results.json``: :mod:`oodscope.results_io`).

Rendered from the Jinja2 template ``templates/report.html.j2``: a sortable, filterable leaderboard (detector x
OOD group), notes on degenerate results, a heatmap of AUROC per detector and OOD set, optional full-spectrum and
covariate-shift tables, one section per evaluation protocol that was run (anchor ``#protocol-NAME``: its construction,
its records as a sortable table, the scaling protocol's AUROC-vs-alpha plot; :mod:`oodscope.report.protocols`), one
section per detector (anchor ``#det-NAME``: its parameters, its per-set metrics, ROC
curves of every OOD set against the ID test and log-scale score histograms as an inline SVG), and the run's
metadata (model, weights hash, data hashes, package versions, timings). It needs no network and no files beside
it; the only script is the table sorting and filtering.

``oodscope bench`` renders it with :func:`render_report`; ``oodscope adbench`` too (no per-sample figures);
``oodscope ad`` builds its own tables in :mod:`oodscope.report.ad` and renders the same template through
:func:`render_page`. Each detector's figure is an SVG written from numpy (:mod:`oodscope.report.svg`, about a
millisecond each; matplotlib took 0.1 s of CPU per detector), embedded as a base64 ``data:`` image; matplotlib
(imported lazily) draws only the anomaly-map overlays of ``oodscope ad``.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..evaluation import METRICS, Results
from ..results_io import command_line, package_versions  # noqa: F401 - re-exported

METRIC_LABELS = {"auroc": "AUROC", "fpr95": "FPR@95", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out"}
MISSING = "\u2013"  # an en dash: a value that was not computed (sorted last by the page's script)
ROC_POINTS = 200  # points per drawn ROC curve (the curve is thinned evenly; the AUROC is computed on all)
DPI = 80  # of the PNG figures (anomaly-map overlays)


# -- figures -----------------------------------------------------------------------------------------------------
def _roc_points(id_scores: np.ndarray, ood_scores: np.ndarray,
                max_points: int = ROC_POINTS) -> tuple[np.ndarray, ...]:
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (raster, ``dpi`` dots per inch)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def detector_figure(detector: str, by_set: Mapping[str, np.ndarray], id_name: str,
                    extra_id: Mapping[str, np.ndarray] | None = None, bins: int = 50) -> str:
    """SVG text: ROC curves of every OOD set vs the ID test (left) and log-scale score histograms (right); see
    :func:`oodscope.report.svg.detector_svg`."""
    from .svg import detector_svg

    return detector_svg(detector, by_set, id_name, extra_id, bins, ROC_POINTS)


def figure_item(image: bytes | str, alt: str, caption: str) -> dict[str, str]:
    """A figure for the template, inline as a base64 ``data:`` URI: PNG bytes or SVG text; its alt text and
    caption."""
    mime, data = ("image/svg+xml", image.encode("utf-8")) if isinstance(image, str) else ("image/png", image)
    return {"src": f"data:{mime};base64," + base64.b64encode(data).decode("ascii"), "alt": alt, "caption": caption}


# -- tables -------------------------------------------------------------------------------------------------------
TEMPLATE = "report.html.j2"
OOD_INTRO = ("Mean over each group's OOD sets; metrics in percent; FPR@95 = share of OOD accepted when 95 % of ID is "
             "kept; higher AUROC is better.")


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None,
           best: Sequence[bool] | None = None) -> dict[str, Any]:
    """A table for the template: header labels, rows of formatted cells (missing values as an en dash), which
    rows are bold."""
    return {"headers": list(headers or columns), "rows": [[_cell(row.get(c)) for c in columns] for row in rows],
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


def heatmap_table(records: Sequence[Mapping[str, Any]], pairs: Sequence[tuple[str, str]], order: Sequence[str], *,
                  metric: str = "auroc", title: str = "AUROC per detector and data set",
                  note: str = "") -> dict[str, Any]:
    """``metric`` per detector (rows in ``order``) and ``(group, dataset)`` pair (columns); a dataset name that
    appears in several groups (one data set under two protocols) is labelled with its group."""
    repeated = {name for _, name in pairs if sum(n == name for _, n in pairs) > 1}
    columns = [f"{name} ({group})" if name in repeated else name for group, name in pairs]
    by_key = {(r["detector"], r["group"], r["dataset"]): r.get(metric) for r in records}
    rows = []
    for detector in order:
        values = [by_key.get((detector, g, n)) for g, n in pairs]
        cells = [{"value": f"{v:.4f}", "text": f"{v:.1f}", "color": heat_color(v)} if v is not None else
                 {"value": "", "text": MISSING, "color": "#fff"} for v in values]
        rows.append({"detector": detector, "anchor": anchor(detector), "cells": cells})
    return {"columns": columns, "rows": rows, "title": title, "note": note}


def _heatmap(results: Results) -> dict[str, Any]:
    """AUROC per detector (leaderboard order) and (group, dataset) of a benchmark run."""
    pairs = [(group, name) for group, names in results.groups.items() for name in names]
    order = [r["detector"] for r in leaderboard_rows(results.group_means(), list(results.groups))]
    return heatmap_table(results.records, pairs, order)


def _params(detector: Any) -> dict[str, str]:
    if detector is None or not hasattr(detector, "get_params"):
        return {}
    return {k: repr(v) for k, v in detector.get_params(deep=False).items()}


def section(name: str, *, headline: str = "", detector: Any = None, note: str = "",
            per_set: Mapping[str, Any] | None = None, figures: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """One detector's section (anchor ``det-NAME``): a headline number, its parameters, its note, its per-set
    table and its figures (:func:`figure_item`)."""
    return {"name": name, "anchor": anchor(name), "headline": headline, "params": _params(detector), "note": note,
            "per_set": per_set, "figures": list(figures)}


def _notes_of(detector: str, notes: Sequence[str]) -> str:
    return " ".join(n for n in notes if n.startswith(f"{detector}:"))


# -- the page -----------------------------------------------------------------------------------------------------
def render_page(*, title: str, facts: Sequence[Mapping[str, Any]], intro: str, leaderboard: Mapping[str, Any],
                notes: Sequence[str], heatmap: Mapping[str, Any], detectors: Sequence[Mapping[str, Any]],
                meta: Mapping[str, Any], id_name: str = "", full_spectrum: Mapping[str, Any] | None = None,
                shift: Mapping[str, Any] | None = None, shifted_name: str = "",
                anchors: Mapping[str, Any] | None = None, protocols: Sequence[Mapping[str, Any]] = ()) -> str:
    """The template filled in (autoescaped, every variable required): ``facts`` are the header's
    ``{"label", "value", "id"}`` items; ``detectors`` are :func:`section` dicts; ``protocols`` are
    :func:`oodscope.report.protocols.protocol_section` dicts."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.PackageLoader("oodscope.report", "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.get_template(TEMPLATE).render(
        title=title, facts=[{"id": None, **f} for f in facts], intro=intro, leaderboard=leaderboard, notes=list(notes),
        heatmap=heatmap, detectors=list(detectors), meta=_meta_rows(meta), id_name=id_name,
        full_spectrum=full_spectrum, shift=shift, shifted_name=shifted_name, anchors=anchors,
        protocols=list(protocols))


def anchor_table(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The "published numbers" table (:func:`oodscope.report.published.anchor_rows`), or ``None`` when empty."""
    if not rows:
        return None
    return _table(rows, ["detector", "dataset", "setting", "ours", "ours_std", "published", "published_std",
                         "difference", "source"],
                  ["detector", "data set", "setting", "ours AUROC", "± (seeds)", "published AUROC", "± (seeds)",
                   "ours - published", "source"])


def _facts(meta: Mapping[str, Any], results: Results) -> list[dict[str, Any]]:
    facts = [{"label": "benchmark", "value": str(meta.get("benchmark", ""))}]
    if meta.get("model"):
        facts.append({"label": "model", "value": str(meta["model"])})
    if results.id_accuracy is not None:
        facts.append({"label": f"ID accuracy ({results.id_name})", "value": f"{results.id_accuracy:.2f} %",
                      "id": "id-accuracy"})
    return facts


def render_report(results: Results, meta: Mapping[str, Any], *, title: str = "oodscope benchmark report",
                  full_spectrum: Sequence[Mapping[str, Any]] = (), shifted_scores: Mapping[str, np.ndarray] | None = None,
                  shifted_name: str = "test_shifted", detectors: Mapping[str, Any] | None = None,
                  intro: str = OOD_INTRO, notes: Sequence[str] | None = None,
                  anchors: Sequence[Mapping[str, Any]] = (),
                  protocols: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> str:
    """The report as one HTML string (a Jinja2 template; figures inline, no network). ``notes`` default to
    :meth:`Results.degenerate_notes`; ``anchors`` are published numbers next to ours
    (:func:`oodscope.report.published.anchor_rows`), shown in their own table with their sources; ``protocols``
    are the records of each evaluation protocol that was run (``{name: records}``, as in ``results.json``), one
    section each (:func:`oodscope.report.protocols.protocol_sections`)."""
    groups = list(results.groups)
    means = {r["detector"]: r for r in leaderboard_rows(results.group_means(), groups)}
    notes = results.degenerate_notes() if notes is None else list(notes)
    names = list(results.scores) or list(dict.fromkeys(r["detector"] for r in results.records))
    ranked = sorted(names, key=lambda d: -means.get(d, {}).get("mean auroc", -1.0))  # leaderboard order
    sections = []
    for detector in ranked:
        figures = []
        if detector in results.scores:  # per-sample scores (a benchmark run): ROC curves and histograms
            extra = ({shifted_name: shifted_scores[detector]} if shifted_scores and detector in shifted_scores
                     else None)
            svg = detector_figure(detector, results.scores[detector], results.id_name, extra)
            figures.append(figure_item(svg, f"{detector}: ROC curves and score histograms",
                                       f"{detector}: ROC curves against {results.id_name}, score histograms "
                                       "(log-scale density)"))
        mean = means.get(detector, {}).get("mean auroc")
        per_set = [r for r in results.records if r["detector"] == detector]
        sections.append(section(
            detector, headline="" if mean is None else f"mean AUROC {mean:.2f}",
            detector=(detectors or {}).get(detector), note=_notes_of(detector, notes), figures=figures,
            per_set=_table(per_set, ["group", "dataset", *METRICS],
                           ["group", "dataset", *[METRIC_LABELS[m] for m in METRICS]])))
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
    return render_page(title=title, facts=_facts(meta, results), intro=intro,
                       leaderboard=_leaderboard(results.group_means(), groups, results.seconds), notes=notes,
                       heatmap=_heatmap(results), detectors=sections, meta=meta, id_name=results.id_name,
                       full_spectrum=fs_table, shift=shift_table, shifted_name=shifted_name,
                       anchors=anchor_table(anchors), protocols=_protocol_sections(protocols))


def _protocol_sections(protocols: Mapping[str, Sequence[Mapping[str, Any]]] | None) -> list[dict[str, Any]]:
    if not protocols:
        return []
    from .protocols import protocol_sections

    return protocol_sections(protocols)


def _meta_rows(meta: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(key, value)`` pairs; a mapping value becomes ``k: v`` lines, a list of strings (notes) one line each
    (escaped, joined with line breaks that the template marks safe)."""
    from markupsafe import Markup, escape

    rows = []
    for key, value in meta.items():
        if isinstance(value, Mapping):
            value = Markup("<br>").join(Markup("{}: <code>{}</code>").format(k, _cell(v)) for k, v in value.items())
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            value = Markup("<br>").join(escape(v) for v in value)
        else:
            value = escape(_cell(value))
        rows.append((str(key), value))
    return rows


def write_html(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`oodscope.safeio.write_atomic`), creating its folder."""
    from ..safeio import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, text)


def write_report(path: str | Path, results: Results, meta: Mapping[str, Any], **options: Any) -> Path:
    """:func:`render_report` written to ``path`` (atomically)."""
    return write_html(path, render_report(results, meta, **options))
