"""Run metadata of an ``oodscope bench`` run (shown in ``report.html`` and stored in ``results.json``).

The helpers (file and array hashes, weights description, package versions) live in :mod:`oodscope.results_io`,
which every command shares; this module adds what only a benchmark run has: the benchmark, its model and weights,
the ID/OOD overlaps and the hash of every split.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..results_io import (array_description, data_hashes, file_sha256, package_versions,  # noqa: F401 - re-exported
                          run_metadata, weights_description)


def bench_metadata(bench: Any, model_name: str, weights: str | None, model: Any, *,
                   argv: Sequence[str] | None = None, detectors: Any = None,
                   timings: Mapping[str, float] | None = None, **parts: Any) -> dict[str, Any]:
    """:func:`oodscope.results_io.run_metadata` of ``bench``: benchmark name, model/weights (sha256), the ID/OOD
    overlaps, ``data_sha256`` of every split, then ``detectors``, ``timings`` and the other ``parts``."""
    return run_metadata("bench", argv=argv, benchmark=bench.name, **weights_description(model_name, weights, model),
                        overlaps=dict(bench.overlaps) or None, data_sha256=data_hashes(bench), detectors=detectors,
                        timings=timings, **parts)
