"""Issue 24's performance checks in one run, written into ``docs/performance.md``.

    PYTHONPATH=. python benchmarks/performance.py                       # every check, full settings (hours)
    PYTHONPATH=. python benchmarks/performance.py --parts coreset,anomalib
    PYTHONPATH=. python benchmarks/performance.py --quick --docs /tmp/performance.md   # reduced settings (~10 min)

Each part is one benchmark script, run in its own process with the arguments in ``PARTS`` (``--quick``: the
reduced ones), its output saved to ``benchmarks/results/performance_<part>.log``:

* ``sweep``: ``sweep_speed.py --parts abg``, the sweep with every detector, gram included, against one extraction
  pass (goal <= 1.15);
* ``gaussian``: ``scale_distance.py synthetic``, the Gaussian fits on a 1M x 2048 bank against a bare ``X^T X``
  in the same run (goal <= 2);
* ``extraction``: ``extraction_overhead.py``, ``extract`` against a bare ``inference_mode`` loop (goal <= 1.05)
  and a cache hit (goal >= 20 times faster);
* ``coreset``: ``patchcore_coreset.py``, PatchCore's coreset selection against the loop it replaced, on a
  synthetic and the real magnetic-tile bank;
* ``anomalib``: ``patchcore_vs_anomalib.py``, in the reference environment ``--ref-python`` (anomalib needs
  torchvision): fit time oodscope / anomalib (goal <= 0.5), image AUROC within 0.5 points, peak memory.

Before each part it records the load average (the issue's "quiet machine" is a load average under 1 at the
start); the versions, CPU and commit are recorded once. The parsed numbers of each part replace that part's
generated section of the docs page (between ``<!-- performance.py:PART begin -->`` and ``... end -->``; a part
run for the first time is appended under "Measured by benchmarks/performance.py"), so the hand-written text
stays as it is; the page is written atomically. A part whose script fails keeps its old section and is reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks.common import REPO, RESULTS, markdown_table
from oodscope.safeio import write_atomic

DOCS = REPO / "docs" / "performance.md"
#: the interpreter of the environment with anomalib: $OODSCOPE_REF_PYTHON, else a venv next to the repository
REF_PYTHON = os.environ.get("OODSCOPE_REF_PYTHON", str(REPO.parent / "venv-ref" / "bin" / "python"))
GENERATED_HEADING = "## Measured by `benchmarks/performance.py`"
NUMBER = r"([-+]?\d+(?:\.\d+)?)"


@dataclass
class Part:
    script: str
    full: list[str]
    quick: list[str]
    parse: Callable[[str], list[list]]  # output -> rows: check, goal, measured, met
    ref_python: bool = False
    minutes: str = ""  # expected duration of the full setting
    env: dict[str, str] = field(default_factory=dict)


def _find(pattern: str, text: str, group: int = 1) -> float | None:
    found = re.findall(pattern, text, flags=re.MULTILINE)
    if not found:
        return None
    last = found[-1]
    return float(last[group - 1] if isinstance(last, tuple) else last)


def _row(check: str, goal: str, value: float | None, ok: Callable[[float], bool] | None, fmt: str = ".2f") -> list:
    if value is None:
        return [check, goal, "not found in the output", "-"]
    return [check, goal, format(value, fmt), "-" if ok is None else ("yes" if ok(value) else "no")]


def parse_sweep(out: str) -> list[list]:
    return [
        _row("sweep with gram / one extraction pass (wall)", "<= 1.15",
             _find(rf"sweep/extraction with gram: {NUMBER}", out), lambda v: v <= 1.15),
        _row("the same, CPU time", "-", _find(rf"sweep/extraction with gram: {NUMBER} \(CPU {NUMBER}\)", out, 2),
             None),
        _row("gram fit + score [s]", "-", _find(rf"gram fit \+ score {NUMBER} s", out), None),
        _row("sweep without gram / one extraction pass (wall)", "-", _find(rf"^sweep/extraction: {NUMBER}", out),
             None),
    ]


def parse_gaussian(out: str) -> list[list]:
    fits = {}
    for name in ("xtx64", "xtx32", "mahalanobis", "rmds", "vim", "gmm0"):
        line = re.findall(rf"^{name}\s+([^(]*)\(", out, flags=re.MULTILINE)
        if line:
            tokens = line[-1].split()  # fit, anon, rss (bare) or fit, score, scored, anon, rss, auroc[, ratio]
            printed = float(tokens[6]) if len(tokens) > 6 else None
            fits[name] = (float(tokens[0]), float(tokens[1] if len(tokens) == 3 else tokens[3]), printed)
    bare = fits.get("xtx64", (None,))[0]
    rows = [_row("bare float64 X^T X (xtx64) [s]", "-", bare, None, ".1f")]
    for name in ("mahalanobis", "rmds", "vim", "gmm0"):
        ratio = (fits[name][2] or fits[name][0] / bare) if name in fits and bare else None  # the script's own
        rows.append(_row(f"{name} fit / xtx64", "<= 2", ratio, lambda v: v <= 2.0))
        if name in fits:
            rows[-1][2] += f" ({fits[name][0]:.1f} s, {fits[name][1]:.2f} GiB)"
    return rows


def parse_extraction(out: str) -> list[list]:
    return [
        _row("extract (writes the cache) / bare loop", "<= 1.05", _find(rf"extract / bare loop: {NUMBER}", out),
             lambda v: v <= 1.05, ".3f"),
        _row("bare loop / cache hit", ">= 20", _find(rf"bare loop / cache hit: {NUMBER}", out), lambda v: v >= 20,
             ".1f"),
    ]


def parse_coreset(out: str) -> list[list]:
    rows = []
    for bank in ("synthetic", "magnetic-tile"):
        match = re.findall(rf"^{bank}: new\s+{NUMBER} s\s+legacy\s+{NUMBER} s \((\w+)[^)]*\)\s+legacy / new\s+"
                           rf"{NUMBER}x\s+plain==new \(first (\d+)\) (\w+)\s+legacy agree ([\d,]+) of ([\d,]+)",
                           out, flags=re.MULTILINE)
        if not match:
            rows.append([f"coreset, {bank} bank", "-", "not found in the output", "-"])
            continue
        new_s, legacy_s, how, ratio, check, plain, agree, total = match[-1]
        rows.append([f"coreset, {bank} bank: legacy / new", "-",
                     f"{float(ratio):.1f}x ({float(legacy_s):.0f} s {how} / {float(new_s):.1f} s)", "-"])
        rows.append([f"coreset, {bank} bank: same picks as the plain loop (first {check})", "True", plain,
                     "yes" if plain == "True" else "no"])
        rows.append([f"coreset, {bank} bank: leading picks shared with the legacy loop", "-", f"{agree} of {total}",
                     "-"])
    return rows


def parse_anomalib(out: str) -> list[list]:
    rows = [
        _row("PatchCore fit time oodscope / anomalib", "<= 0.5", _find(rf"fit time oodscope / anomalib: {NUMBER}", out),
             lambda v: v <= 0.5, ".3f"),
        _row("image AUROC oodscope - anomalib [points]", "within 0.5",
             _find(rf"image AUROC oodscope - anomalib: {NUMBER}", out), lambda v: abs(v) <= 0.5, "+.2f"),
    ]
    for side in ("oodscope", "anomalib"):
        line = re.findall(rf"^{side}\s+fit\s+{NUMBER} s.*image AUROC\s+{NUMBER}\s+peak RSS\s+{NUMBER} GiB", out,
                          flags=re.MULTILINE)
        if line:
            fit, auc, rss = (float(v) for v in line[-1])
            rows.append([f"{side}: fit [s], image AUROC, peak RSS [GiB]", "-", f"{fit:.1f}, {auc:.2f}, {rss:.2f}",
                         "-"])
    return rows


PARTS: dict[str, Part] = {
    "sweep": Part("benchmarks/sweep_speed.py", ["--parts", "abg"], ["--parts", "abg", "--n-train", "200",
                                                                    "--n-eval", "60"], parse_sweep, minutes="~3 min"),
    "gaussian": Part("benchmarks/scale_distance.py",
                     ["synthetic", "--n", "1000000", "--queries", "200", "--bank", "/tmp/oodscope_perf_bank1m.f32",
                      "--detectors", "xtx64,xtx32,mahalanobis,rmds,vim,gmm0", "--delete"],
                     ["synthetic", "--n", "20000", "--dim", "512", "--queries", "200", "--bank",
                      "/tmp/oodscope_perf_bank_quick.f32", "--detectors", "xtx64,xtx32,mahalanobis,rmds,vim,gmm0",
                      "--delete"], parse_gaussian, minutes="~12 min"),
    "extraction": Part("benchmarks/extraction_overhead.py", ["--images", "10000", "--repeats", "12"],
                       ["--images", "1000", "--repeats", "1"], parse_extraction, minutes="~4 min"),
    "coreset": Part("benchmarks/patchcore_coreset.py", [],
                    ["--n", "40000", "--max-train", "40", "--legacy-steps", "300", "--check-steps", "100"],
                    parse_coreset, minutes="~90 min (two full runs of the old loop, ~43 min each)"),
    "anomalib": Part("benchmarks/patchcore_vs_anomalib.py", ["--max-train", "60"],
                     ["--max-train", "20", "--test-every", "10"], parse_anomalib, ref_python=True,
                     minutes="~6 min (anomalib's coreset: 154 s for 47,040 patches)"),
}


def versions() -> str:
    import numpy
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    return (f"commit {commit.stdout.strip() or '?'}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {numpy.__version__}; {os.cpu_count()} CPUs ({cpu}); OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")


def settle(below: float, patience_s: float, poll_s: float = 5.0) -> float:
    """Wait (at most ``patience_s``) until the 1-minute load average is under ``below``: the previous part's own
    load takes about a minute to decay. Returns the load average it stopped at."""
    waited = 0.0
    while os.getloadavg()[0] >= below and waited < patience_s:
        time.sleep(poll_s)
        waited += poll_s
    return os.getloadavg()[0]


def run_part(name: str, part: Part, quick: bool, ref_python: str,
             quiet_below: float = 0.0, patience_s: float = 600.0) -> tuple[str, float, float, int]:
    """Run one part's script; its output goes to the console and to its log. Returns output, load, seconds, rc.
    With ``quiet_below > 0`` it first waits for the load average to fall under it (:func:`settle`)."""
    python = ref_python if part.ref_python else sys.executable
    command = [python, part.script, *(part.quick if quick else part.full)]
    load = settle(quiet_below, patience_s) if quiet_below > 0 else os.getloadavg()[0]
    expected = "" if quick else f", expected {part.minutes}"
    print(f"\n== {name}: {' '.join(command)}  (load average {load:.2f}{expected})", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), **part.env}
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    rc = process.wait()
    out = "".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS / f"performance_{name}{'_quick' if quick else ''}.log", out)
    return out, load, time.perf_counter() - start, rc


def section(name: str, part: Part, out: str, load: float, seconds: float, quick: bool, ref_python: str,
            stamp: str) -> str:
    python = "$REF_PYTHON" if part.ref_python else "python"
    args = " ".join(part.quick if quick else part.full)
    setting = "QUICK (reduced) setting: not the issue's measurement" if quick else "full setting"
    rows = part.parse(out)
    body = [f"### {name} ({setting})", "",
            f"{stamp}; load average at the start of this part {load:.2f}"
            f"{' (not a quiet machine: the goal needs under 1)' if load >= 1 else ''}; {seconds / 60:.1f} min"
            + (f"; reference environment {os.path.relpath(ref_python, REPO)}" if part.ref_python else "") + ".", "",
            "```bash", f"PYTHONPATH=. {python} {part.script} {args}".rstrip(), "```", "",
            markdown_table(["check", "goal", "measured", "met"], rows), ""]
    return f"<!-- performance.py:{name} begin -->\n" + "\n".join(body) + f"<!-- performance.py:{name} end -->"


def replace_section(page: str, name: str, text: str) -> str:
    pattern = re.compile(rf"<!-- performance\.py:{name} begin -->.*?<!-- performance\.py:{name} end -->", re.S)
    if pattern.search(page):
        return pattern.sub(lambda _: text, page)
    if GENERATED_HEADING not in page:
        page = page.rstrip("\n") + f"\n\n{GENERATED_HEADING}\n\nWritten by the script; edit the script, not these " \
                                   "sections.\n"
    return page.rstrip("\n") + "\n\n" + text + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="reduced settings (a smoke test of every part)")
    parser.add_argument("--docs", default=str(DOCS), help="the markdown page to write the sections into")
    parser.add_argument("--ref-python", default=REF_PYTHON, help="interpreter of the environment with anomalib "
                        "(default: $OODSCOPE_REF_PYTHON, else ../venv-ref/bin/python next to the repository)")
    parser.add_argument("--quiet-below", type=float, default=0.0, help="before each part, wait until the 1-minute "
                        "load average is under this (the issue's quiet machine: 1.0); 0: do not wait")
    parser.add_argument("--patience", type=float, default=600.0, help="longest wait per part for --quiet-below [s]")
    args = parser.parse_args()
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    docs = Path(args.docs)
    if not docs.is_file():
        parser.error(f"--docs {docs}: no such file (the sections are written into an existing page)")
    stamp = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {versions()}"
    print(f"{stamp}; load average at start {', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    failed = []
    for name in names:
        part = PARTS[name]
        if part.ref_python and not Path(args.ref_python).exists():
            print(f"\n== {name}: skipped, no reference interpreter {args.ref_python} (see the script's docstring)")
            failed.append(name)
            continue
        out, load, seconds, rc = run_part(name, part, args.quick, args.ref_python, args.quiet_below, args.patience)
        if rc:
            print(f"== {name}: exit code {rc}; its section is left as it was")
            failed.append(name)
            continue
        text = section(name, part, out, load, seconds, args.quick, args.ref_python, stamp)
        write_atomic(docs, replace_section(docs.read_text(), name, text))  # after each part: a crash keeps the rest
        print(f"== {name}: {seconds / 60:.1f} min, section written to {docs}", flush=True)
    print(f"\ndone; failed: {', '.join(failed) or 'none'}; load average now "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
