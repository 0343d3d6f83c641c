"""The image anomaly-detection report of ``oodscope ad``: ``report.html`` through the benchmark report's template
(:mod:`oodscope.report.html`) and the anomaly-map overlays (matplotlib imported lazily, Agg backend).

The page holds a sortable leaderboard (image AUROC, F1max, pixel AUROC, AUPRO and AUPIMO over all defect types,
fit seconds and milliseconds per image; a metric that was not computed shows as an en dash, never as 0), notes
on degenerate results (:meth:`oodscope.evaluation.Results.degenerate_notes` with the normal test images as ID,
plus the command's own notes such as missing masks), a heatmap of image AUROC per detector and defect type, one
section per detector (anchor ``#det-NAME``: parameters, per-defect metrics, ROC curves of each defect type against
the normal test images with log-scale score histograms, and the overlays of its best, worst and false-alarm
images), and the run metadata. Every figure is drawn once: the overlay PNG written next to the report is the one
embedded in it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..evaluation import Results
from ..safeio import write_atomic
from .html import (_notes_of, _table, detector_figure, figure_item, heatmap_table, png_bytes, render_page,
                   section, write_html)

AD_INTRO = ("Image anomaly detection on the folder's test split: image metrics over all defect types against the "
            "normal test images (anomalous = positive), pixel metrics on the anomaly maps where masks exist and the "
            "detector localises (otherwise \u2013); metrics in percent, higher is better.")
# (record key, leaderboard header) of the row over all defect types
LEADERBOARD = [("detector", "detector"), ("auroc", "image AUROC"), ("f1_max", "F1max"),
               ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"), ("aupimo", "AUPIMO"), ("fit_s", "fit [s]"),
               ("ms_per_image", "ms/image")]
PER_DEFECT = [("dataset", "defect type"), ("n_images", "images"), ("auroc", "AUROC"), ("fpr95", "FPR@95"),
              ("f1_max", "F1max"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"), ("aupimo", "AUPIMO")]
GOOD_NAME = "good"  # the normal test images: the "ID" set of the figures and of the degenerate-result checks


# -- overlays -----------------------------------------------------------------------------------------------------
def pick_examples(scores: np.ndarray, labels: np.ndarray, k: int = 3) -> dict[str, np.ndarray]:
    """Indices of the best and worst test images: anomalous images ranked highest ("best") and lowest
    ("worst", missed), and the normal images ranked highest (false alarms)."""
    order = np.argsort(-scores, kind="stable")
    anomalous = order[labels[order] == 1]
    normal = order[labels[order] == 0]
    best = anomalous[:k]
    worst = anomalous[k:][::-1][:k]  # never repeats a "best" image when there are few anomalous images
    return {"best": best, "worst": worst, "false alarm": normal[:k]}


def overlay_figure(run: Any, test: Any, k: int = 3, dpi: int = 80) -> bytes | None:
    """PNG bytes: each picked image (:func:`pick_examples`) with its mask outline (top) and the anomaly map over
    it (bottom, colour range the 1st-99.9th percentile of all maps); ``None`` if the detector gives no map."""
    if run.maps is None:
        return None
    from .html import _pyplot

    plt = _pyplot()
    picks = pick_examples(run.scores, test.labels, k)
    rows = [(kind, i) for kind, index in picks.items() for i in index]
    fig, axes = plt.subplots(2, len(rows), figsize=(2.2 * len(rows), 4.6), squeeze=False)
    low, high = np.percentile(run.maps, [1, 99.9])
    for col, (kind, i) in enumerate(rows):
        image = test.images[i].transpose(1, 2, 0)
        for ax in axes[:, col]:
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if test.masks is not None and test.masks[i].any():
                ax.contour(test.masks[i], levels=[0.5], colors="lime", linewidths=0.8)
        axes[1, col].imshow(run.maps[i], cmap="jet", alpha=0.45, vmin=low, vmax=high)
        axes[0, col].set_title(f"{kind}\n{test.defects[i]} s={run.scores[i]:.3g}", fontsize=7)
    fig.suptitle(f"{run.detector}: top row image + mask (green), bottom row anomaly map", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.86, wspace=0.04, hspace=0.04)
    png = png_bytes(fig, dpi)
    plt.close(fig)
    return png


def overlay_pngs(runs: Sequence[Any], test: Any, k: int = 3) -> dict[str, bytes]:
    """``{detector: PNG bytes}`` of :func:`overlay_figure` for every run with anomaly maps."""
    pngs = {run.detector: overlay_figure(run, test, k) for run in runs}
    return {name: png for name, png in pngs.items() if png is not None}


def plot_overlays(runs: Sequence[Any], test: Any, out_dir: str | Path, k: int = 3,
                  pngs: Mapping[str, bytes] | None = None) -> list[Path]:
    """Write ``overlays_<detector>.png`` for every detector with a map (``pngs``: already drawn ones)."""
    pngs = overlay_pngs(runs, test, k) if pngs is None else pngs
    return [write_atomic(Path(out_dir) / f"overlays_{name}.png", png) for name, png in pngs.items()]


# -- the report ---------------------------------------------------------------------------------------------------
def ad_results(runs: Sequence[Any], test: Any) -> Results:
    """The runs as :class:`~oodscope.evaluation.Results`: normal test images as the ID set (``"good"``), each
    defect type an OOD set of group ``"defect"`` and the record over all types in group ``"all"``, with the
    per-sample scores (for the figures and :meth:`Results.degenerate_notes`)."""
    defects = sorted(set(test.defects.tolist()) - {GOOD_NAME})
    normal = test.labels == 0
    scores = {run.detector: {GOOD_NAME: run.scores[normal], **{d: run.scores[test.defects == d] for d in defects}}
              for run in runs}
    records = [r for run in runs for r in run.records]
    return Results(records=records, id_accuracy=None, seconds={run.detector: run.fit_s for run in runs},
                   scores=scores, groups={"defect": defects, "all": ["all"]}, id_name=GOOD_NAME)


def degenerate_notes(runs: Sequence[Any], test: Any) -> list[str]:
    """:meth:`Results.degenerate_notes` of the runs (collapsed image scores on the normal test images, image
    AUROC under 50 per defect type or overall)."""
    return ad_results(runs, test).degenerate_notes()


def _overall(runs: Sequence[Any]) -> list[dict[str, Any]]:
    """Each run's record over all defect types, best image AUROC first."""
    rows = [next(r for r in run.records if r["dataset"] == "all") for run in runs]
    return sorted(rows, key=lambda r: -r["auroc"])


def _headline(row: Mapping[str, Any]) -> str:
    parts = [f"image AUROC {row['auroc']:.2f}"]
    if row.get("pixel_auroc") is not None:
        parts.append(f"pixel AUROC {row['pixel_auroc']:.2f}")
    return ", ".join(parts)


def _facts(test: Any, meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    n_anomalous = int(test.labels.sum())
    facts = [{"label": "data", "value": str(meta.get("data_root", test.name))},
             {"label": "test", "value": f"{len(test) - n_anomalous} normal + {n_anomalous} anomalous images"},
             {"label": "image size", "value": f"{test.images.shape[-1]} px"}]
    return facts


def render_ad_report(runs: Sequence[Any], test: Any, meta: Mapping[str, Any], *,
                     detectors: Mapping[str, Any] | None = None, notes: Sequence[str] = (),
                     overlays: Mapping[str, bytes] | None = None,
                     title: str = "oodscope image anomaly-detection report") -> str:
    """The report (see module docstring) of the :class:`~oodscope.imagead.evaluate.ADRun` list ``runs`` on
    ``test``; ``notes`` join the degenerate-result notes; ``overlays`` are :func:`overlay_pngs` (drawn here when
    not given); ``detectors`` map each run's detector name to the detector (its parameters)."""
    if not runs:
        raise ValueError("render_ad_report needs at least one detector run")
    results = ad_results(runs, test)
    notes = list(dict.fromkeys([*notes, *results.degenerate_notes()]))
    overlays = overlay_pngs(runs, test) if overlays is None else overlays
    overall = _overall(runs)
    order = [r["detector"] for r in overall]
    by_name = {run.detector: run for run in runs}
    sections = []
    for row in overall:
        name = row["detector"]
        figures = [figure_item(detector_figure(name, results.scores[name], GOOD_NAME),
                               f"{name}: ROC curves and score histograms",
                               f"{name}: ROC curve of each defect type against the normal test images, image "
                               "score histograms (log-scale density)")]
        if name in overlays:
            figures.append(figure_item(overlays[name], f"{name}: anomaly-map overlays",
                                       f"{name}: the best-detected and the worst-detected anomalous images and "
                                       "the highest-scored normal images (false alarms), mask outlined in green, "
                                       "anomaly map below"))
        records = by_name[name].records
        sections.append(section(name, headline=_headline(row), detector=(detectors or {}).get(name),
                                note=_notes_of(name, notes), figures=figures,
                                per_set=_table(records, [k for k, _ in PER_DEFECT], [h for _, h in PER_DEFECT])))
    pairs = [("defect", d) for d in results.groups["defect"]] + [("all", "all")]
    heatmap = heatmap_table(results.records, pairs, order, title="Image AUROC per detector and defect type",
                            note="Each defect type's images against the normal test images; 'all': every "
                                 "anomalous image.")
    leaderboard = _table(overall, [k for k, _ in LEADERBOARD], [h for _, h in LEADERBOARD],
                         best=[i == 0 for i in range(len(overall))])
    return render_page(title=title, facts=_facts(test, meta), intro=AD_INTRO, leaderboard=leaderboard, notes=notes,
                       heatmap=heatmap, detectors=sections, meta=meta, id_name=GOOD_NAME)


def write_ad_report(path: str | Path, runs: Sequence[Any], test: Any, meta: Mapping[str, Any],
                    **options: Any) -> Path:
    """:func:`render_ad_report` written to ``path`` (atomically)."""
    return write_html(path, render_ad_report(runs, test, meta, **options))
