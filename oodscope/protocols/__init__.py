"""Evaluation protocols from the literature, run on any benchmark with any registered detectors.

Each protocol is one module with a pure function on scores (tested by hand) and a ``run(context)`` that extracts
what it needs (through the cache) and returns records in the common ``results.json`` schema, each with
``setting`` = the protocol's name. ``oodscope bench BENCH --protocol failure,unit-tests,scaling`` runs them after
the ordinary benchmark, on the same fitted detectors.

* ``failure``: failure detection (reject misclassified and semantic-OOD samples, accept the rest): AUROC, AURC,
  E-AURC and the SCOD risk (:mod:`.failure`).
* ``unit-tests``: synthetic OOD sets every reasonable detector should flag (:mod:`.unit_tests`).
* ``scaling``: inputs scaled by ``alpha`` far from the data (:mod:`.scaling`).
* ``label-noise``: the detectors on classifiers fine-tuned with symmetric and class-dependent label noise
  (:mod:`.label_noise`).
* ``open-set``: open-set recognition, classifiers trained from scratch on the known classes of Neal et al.'s
  CIFAR-10 splits, closed-set accuracy, AUROC and OSCR (:mod:`.open_set`).
* ``correlation``: ID accuracy vs OOD AUROC across the benchmark model and the ``--ensemble`` models
  (:mod:`.correlation`).
* ``density``: per-example prototypicality metrics (confidence, boundary distance, ensemble agreement, holdout
  retraining, DP-training privacy) and how the detectors' scores track them (:mod:`.density`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

PROTOCOLS = {"failure": "failure", "unit-tests": "unit_tests", "scaling": "scaling", "density": "density",
             "label-noise": "label_noise", "open-set": "open_set",
             "correlation": "correlation"}


@dataclass
class Context:
    """What a protocol gets: the benchmark, the model and its preprocessing, the fitted detectors (by label), the
    ordinary run's results and the extraction options."""

    bench: Any
    model: Any
    preprocess: Callable | None
    detectors: dict[str, Any]
    results: Any
    extract_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    ensemble: list[tuple[str, Any, Any]] = field(default_factory=list)  # (name, model, preprocess): --ensemble
    options: dict[str, Any] = field(default_factory=dict)  # per-protocol command-line options (density_metrics)

    def scores(self, label: str, dataset: str):
        """The ordinary run's scores of detector ``label`` on ``dataset`` (``results.id_name`` for the ID test
        set): the protocols reuse them instead of scoring again."""
        return self.results.scores[label][dataset]

    def extract(self, data: Any, name: str, model: Any = None):
        """Outputs of ``model`` (default: the benchmark's) on ``data``, with every layer the detectors read and the
        run's extraction options (cache, device, batch size)."""
        from ..extraction.extract import extract

        layers = sorted({layer for d in self.detectors.values() for layer in d.layer_names()})
        return extract(self.model if model is None else model, data, name=f"{self.bench.name}-{name}",
                       preprocess=self.preprocess, layers=layers, **self.extract_options)

    @property
    def device(self) -> str:
        """The run's ``--device`` resolved (``auto``: CUDA, then MPS, then CPU), for protocols that train."""
        from ..extraction.extract import resolve_device

        return str(resolve_device(self.extract_options.get("device") or "auto"))

    def work_dir(self, protocol: str) -> Path:
        """Where a training protocol keeps its resumable checkpoints: ``<cache>/<protocol>``."""
        from ..extraction.cache import default_cache_dir

        return Path(self.extract_options.get("cache_dir") or default_cache_dir()) / protocol


def parse(names: str | None) -> list[str]:
    """Protocol names from ``--protocol a,b``; an unknown one is an error listing the known ones."""
    chosen = [n.strip() for n in (names or "").split(",") if n.strip()]
    unknown = [n for n in chosen if n not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; known: {', '.join(PROTOCOLS)}")
    return chosen


def run(name: str, context: Context) -> tuple[list[dict[str, Any]], str]:
    """``(records, printed table)`` of protocol ``name``."""
    module = importlib.import_module(f"{__name__}.{PROTOCOLS[name]}")
    records = module.run(context)
    return records, module.format_records(records)
