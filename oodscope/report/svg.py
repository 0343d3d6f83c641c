"""A detector's figure for ``report.html`` as a small SVG written directly from numpy: ROC curves of every OOD set
against the ID test (left) and score histograms on a log-density axis (right).

matplotlib spent about 0.1 s of CPU per detector on axes, ticks and rasterising, which made plotting 40 % of the
default ``oodscope bench`` run; these figures take about a millisecond each, are a few kB, stay sharp at any zoom
and need nothing but the page (they are embedded as ``data:image/svg+xml`` images).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence
from xml.sax.saxutils import escape

import numpy as np

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")  # matplotlib's tab10, as the earlier PNG figures had
ID_COLOR = "#404040"
WIDTH, HEIGHT = 960, 300
PANEL = {"roc": (60, 30, 330, 230), "hist": (470, 30, 470, 230)}  # left, top, width, height of each plot area


def nice_ticks(low: float, high: float, count: int = 5) -> np.ndarray:
    """Round tick positions (1, 2 or 5 times a power of ten apart) inside ``[low, high]``."""
    span = high - low
    if not span > 0:
        return np.array([low])
    raw = span / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return np.arange(math.ceil(low / step) * step, high + step * 1e-9, step)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if value != 0 else "0"


class _Panel:
    """Maps data coordinates onto one plot area of the SVG (y up)."""

    def __init__(self, box: tuple[int, int, int, int], xlim: tuple[float, float], ylim: tuple[float, float]):
        self.left, self.top, self.width, self.height = box
        self.xlim, self.ylim = xlim, ylim

    def x(self, values: np.ndarray) -> np.ndarray:
        return self.left + (np.asarray(values, float) - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * self.width

    def y(self, values: np.ndarray) -> np.ndarray:
        share = (np.asarray(values, float) - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        return self.top + (1.0 - share) * self.height

    def points(self, xs: np.ndarray, ys: np.ndarray) -> str:
        return " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(self.x(xs), self.y(ys)))

    def frame(self, title: str, xlabel: str, ylabel: str, xticks: Sequence[tuple[float, str]],
              yticks: Sequence[tuple[float, str]]) -> list[str]:
        bottom = self.top + self.height
        parts = [f'<rect x="{self.left}" y="{self.top}" width="{self.width}" height="{self.height}" fill="none" '
                 'stroke="#000" stroke-width="0.8"/>']
        for value, label in xticks:
            x = float(self.x(value))
            parts.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#000"/>'
                         f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{escape(label)}</text>')
        for value, label in yticks:
            y = float(self.y(value))
            parts.append(f'<line x1="{self.left - 4}" y1="{y:.1f}" x2="{self.left}" y2="{y:.1f}" stroke="#000"/>'
                         f'<text x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}</text>')
        parts.append(f'<text x="{self.left + self.width / 2}" y="{self.top - 10}" text-anchor="middle" '
                     f'font-size="13">{escape(title)}</text>'
                     f'<text x="{self.left + self.width / 2}" y="{bottom + 34}" text-anchor="middle">'
                     f'{escape(xlabel)}</text>'
                     f'<text transform="translate({self.left - 44},{self.top + self.height / 2}) rotate(-90)" '
                     f'text-anchor="middle">{escape(ylabel)}</text>')
        return parts


def _steps(edges: np.ndarray, heights: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The step outline ``(x, y)`` of every run of consecutive non-empty bins (an empty bin has no height on a
    log axis: a gap)."""
    runs, start = [], None
    for index, present in enumerate(np.r_[np.isfinite(heights), False]):
        if present and start is None:
            start = index
        elif not present and start is not None:
            xs = np.repeat(edges[start:index + 1], 2)[1:-1]
            runs.append((xs, np.repeat(heights[start:index], 2)))
            start = None
    return runs


def _roc(id_scores: np.ndarray, ood_scores: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    from .html import _roc_points

    return _roc_points(id_scores, ood_scores, max_points)


def detector_svg(detector: str, by_set: Mapping[str, np.ndarray], id_name: str,
                 extra_id: Mapping[str, np.ndarray] | None = None, bins: int = 50, roc_points: int = 200) -> str:
    """The SVG document: ROC curves of every OOD set vs ``by_set[id_name]`` (``extra_id`` sets dashed: counted as
    ID, e.g. a covariate-shifted copy), and the density histogram of every set (bins over the 0.5-99.5th
    percentiles of all scores, outliers in the end bins) on a log axis, the ID test filled."""
    extra_id = dict(extra_id or {})
    id_scores = np.asarray(by_set[id_name], dtype=np.float64)
    sets = {id_name: id_scores, **extra_id, **{k: v for k, v in by_set.items() if k != id_name}}
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in sets.values()])
    low, high = np.percentile(values, [0.5, 99.5])
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    densities = {name: np.histogram(np.clip(s, edges[0], edges[-1]), bins=edges, density=True)[0]
                 for name, s in sets.items()}
    smallest = 1.0 / (max(len(s) for s in sets.values()) * (edges[1] - edges[0]))  # one sample in a bin
    peak = max(smallest, max(float(d.max()) for d in densities.values()))
    y_low, y_high = math.log10(0.5 * smallest), math.log10(2.0 * peak)
    roc = _Panel(PANEL["roc"], (0.0, 1.0), (0.0, 1.01))
    hist = _Panel(PANEL["hist"], (edges[0], edges[-1]), (y_low, y_high))
    unit = [(v, f"{v:g}") for v in (0, 0.25, 0.5, 0.75, 1.0)]
    powers = range(math.ceil(y_low), math.floor(y_high) + 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Arial, sans-serif" font-size="11">',
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>']
    parts += roc.frame(f"{detector}: ROC vs {id_name}", f"share of {id_name} flagged (FPR)",
                       "share of set flagged (TPR)", unit, unit)
    parts += hist.frame(f"{detector}: scores", "score (higher = more OOD)", "density (log scale)",
                        [(v, _fmt(v)) for v in nice_ticks(edges[0], edges[-1])], [(p, f"1e{p}") for p in powers])
    parts.append(f'<polyline points="{roc.points([0, 1], [0, 1])}" fill="none" stroke="#b3b3b3" '
                 'stroke-width="0.8"/>')
    legend = []
    for index, (name, density) in enumerate(densities.items()):
        is_id = name == id_name
        color = ID_COLOR if is_id else COLORS[index % len(COLORS)]
        dash = ' stroke-dasharray="5,3"' if name in extra_id else ""
        if not is_id:
            fpr, tpr = _roc(id_scores, sets[name], roc_points)
            parts.append(f'<polyline points="{roc.points(fpr, tpr)}" fill="none" stroke="{color}" '
                         f'stroke-width="1.4"{dash}/>')
        heights = np.where(density > 0, np.log10(np.where(density > 0, density, 1.0)), np.nan)
        for xs, ys in _steps(edges, heights):
            if is_id:
                parts.append(f'<polygon points="{hist.points(np.r_[xs[0], xs, xs[-1]], np.r_[y_low, ys, y_low])}" '
                             f'fill="{color}" fill-opacity="0.25" stroke="none"/>')
            parts.append(f'<polyline points="{hist.points(xs, ys)}" fill="none" stroke="{color}" '
                         f'stroke-width="1.3"{dash}/>')
        legend.append((f"{name} (ID)" if is_id else name, color, dash))
    right, top = PANEL["hist"][0] + PANEL["hist"][2] - 8, PANEL["hist"][1] + 8
    parts.append(f'<rect x="{right - 156}" y="{top - 4}" width="152" height="{14 * len(legend) + 6}" fill="#fff" '
                 'fill-opacity="0.8" stroke="#ccc"/>')
    for row, (label, color, dash) in enumerate(legend):
        y = top + 14 * row + 6
        parts.append(f'<line x1="{right - 150}" y1="{y}" x2="{right - 130}" y2="{y}" stroke="{color}" '
                     f'stroke-width="2"{dash}/><text x="{right - 125}" y="{y + 4}">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


XY_BOX = (60, 30, 600, 230)  # left, top, width, height of the plot area of :func:`xy_svg`; the legend is right of it


def _log_ticks(low: float, high: float) -> list[tuple[float, str]]:
    """Ticks at the powers of ten inside ``[low, high]`` (log10 units), labelled with the plain value."""
    return [(float(p), f"{10.0 ** p:g}") for p in range(math.ceil(low - 1e-9), math.floor(high + 1e-9) + 1)]


def _padded(values: np.ndarray, share: float = 0.05) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    pad = share * (high - low) if high > low else 0.5
    return low - pad, high + pad


def xy_svg(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str, xlabel: str, ylabel: str,
           log_x: bool = False, ylim: tuple[float, float] | None = None, lines: bool = True,
           reference_y: float | None = None) -> str:
    """The SVG document of one plot: per series (legend name -> ``(xs, ys)``) a marker at each finite point, joined
    by a line when ``lines`` (else a scatter plot; past ten series the colours repeat with dashed lines); x on a
    log10 axis when ``log_x``; a dashed grey horizontal line at ``reference_y`` (e.g. AUROC 50, blind). ``ylim``
    defaults to the data's range, padded."""
    points = {name: (np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64))
              for name, (xs, ys) in series.items()}
    points = {name: (np.log10(xs) if log_x else xs, ys) for name, (xs, ys) in points.items()}
    points = {name: (xs[keep], ys[keep]) for name, (xs, ys) in points.items()
              if (keep := np.isfinite(xs) & np.isfinite(ys)).any()}
    all_x = np.concatenate([xs for xs, _ in points.values()] or [np.zeros(1)])
    all_y = np.concatenate([ys for _, ys in points.values()] or [np.zeros(1)])
    xlim = _padded(all_x)
    ylim = ylim or _padded(np.r_[all_y, [] if reference_y is None else [reference_y]])
    panel = _Panel(XY_BOX, xlim, ylim)
    xticks = _log_ticks(*xlim) if log_x else [(v, _fmt(v)) for v in nice_ticks(*xlim)]
    height = max(HEIGHT, XY_BOX[1] + 14 * len(points) + 20)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Arial, sans-serif" font-size="11">',
             f'<rect width="{WIDTH}" height="{height}" fill="#fff"/>']
    parts += panel.frame(title, xlabel, ylabel, xticks, [(v, _fmt(v)) for v in nice_ticks(*ylim)])
    if reference_y is not None:
        parts.append(f'<polyline points="{panel.points(list(xlim), [reference_y] * 2)}" fill="none" '
                     'stroke="#b3b3b3" stroke-width="0.8" stroke-dasharray="4,3"/>')
    legend_x = XY_BOX[0] + XY_BOX[2] + 20
    for index, (name, (xs, ys)) in enumerate(points.items()):
        color = COLORS[index % len(COLORS)]
        dash = ' stroke-dasharray="5,3"' if index >= len(COLORS) else ""
        if lines and len(xs) > 1:
            parts.append(f'<polyline points="{panel.points(xs, ys)}" fill="none" stroke="{color}" '
                         f'stroke-width="1.4"{dash}/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>'
                  for x, y in zip(panel.x(xs), panel.y(ys))]
        y = XY_BOX[1] + 14 * index + 6
        parts.append(f'<line x1="{legend_x}" y1="{y}" x2="{legend_x + 20}" y2="{y}" stroke="{color}" '
                     f'stroke-width="2"{dash}/><text x="{legend_x + 25}" y="{y + 4}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
