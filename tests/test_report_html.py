"""``oodscope.report.html``: the report's content (tables, heatmap, detector sections) without a browser; the
headless-Chromium check of the rendered page lives in ``test_bench.py``."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import pytest

import oodscope
from oodscope.report.html import heat_color, render_report


class Structure(HTMLParser):
    """Counts tags and checks that every opened element (but the void ones) is closed in order."""

    VOID = {"meta", "img", "input", "br"}

    def __init__(self):
        super().__init__()
        self.stack, self.ids, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


@pytest.fixture(scope="module")
def report():
    rng = np.random.default_rng(0)
    train = oodscope.Outputs(features=rng.normal(size=(200, 4)), logits=rng.normal(size=(200, 3)) * 3,
                             labels=rng.integers(0, 3, 200), name="train")
    test = oodscope.Outputs(features=rng.normal(size=(100, 4)), logits=rng.normal(size=(100, 3)) * 3, name="test")
    far = oodscope.Outputs(features=rng.normal(size=(80, 4)) + 3, logits=rng.normal(size=(80, 3)), name="far set")
    detectors = {"msp": oodscope.create("msp"), "knn": oodscope.create("knn", k=5)}
    results = oodscope.evaluate(detectors, test, {"far": {"far set": far}}, train=train)
    return results, render_report(results, {"benchmark": "toy <b>", "model": "m"}, detectors=detectors)


def test_the_report_is_well_formed_with_anchors_and_sortable_tables(report):
    results, html = report
    parser = Structure()
    parser.feed(html)
    assert parser.errors == [] and parser.stack == []
    assert {"leaderboard", "heatmap", "metadata", "det-msp", "det-knn", "per-set-knn"} <= set(parser.ids)
    assert html.count('<th class="sortable">') >= 6 and 'id="filter"' in html
    assert "toy &lt;b&gt;" in html  # escaped
    assert "<code>k=5</code>" in html  # the detector's parameters


def test_the_heatmap_holds_every_auroc_in_leaderboard_order(report):
    results, html = report
    heatmap = html[html.index('<table id="heatmap"'):]
    heatmap = heatmap[:heatmap.index("</table>")]
    values = {r["detector"]: r["auroc"] for r in results.records}
    cells = re.findall(r'href="#det-([^"]+)">[^<]+</a></td>\s*<td style="background:[^"]+" data-value="([^"]+)"',
                       heatmap)
    assert [name for name, _ in cells] == sorted(values, key=lambda d: -values[d])
    for name, value in cells:
        assert float(value) == pytest.approx(values[name], abs=1e-4)
    assert heat_color(50) == "hsl(0, 65%, 80%)" and heat_color(20) == heat_color(50)  # blind or inverted: red
    assert heat_color(100) == "hsl(120, 65%, 80%)" and heat_color(75) == "hsl(60, 65%, 80%)"
