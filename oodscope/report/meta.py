"""Run metadata for reports: model, weights hash, data hashes, package versions, timings."""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def data_hashes(bench: Any) -> dict[str, str]:
    """sha256 of each split's input array (dtype, shape and bytes), by dataset name."""
    from ..extraction.cache import digest_array

    hashes = {}
    for name, split in bench.datasets().items():
        source = f"{bench.sources[name]}: " if name in getattr(bench, "sources", {}) else ""
        if isinstance(split.inputs, np.ndarray):
            shape = "x".join(map(str, split.inputs.shape[1:]))
            hashes[name] = f"{source}{digest_array(split.inputs)[:16]} ({len(split)} x {shape})"
        else:
            hashes[name] = f"{source}({len(split)} samples, not an array)"
    return hashes


def weights_description(model_name: str, weights: str | None, model: Any) -> dict[str, str]:
    info = {"model": model_name or type(model).__name__}
    if weights:
        info["weights"] = str(weights)
        info["weights sha256"] = file_sha256(weights)
    else:
        from ..models.cifar_resnet import RELEASE, RELEASE_SHA256_PREFIX

        if model_name in RELEASE_SHA256_PREFIX:
            info["weights"] = RELEASE.format(name=model_name, sha=RELEASE_SHA256_PREFIX[model_name])
            info["weights sha256"] = f"{RELEASE_SHA256_PREFIX[model_name]}... (release prefix, checked)"
    try:
        from ..extraction.extract import model_digest

        info["state-dict sha256"] = model_digest(model)[:16]
    except Exception:  # noqa: BLE001 - a model without a state dict still gets a report
        pass
    return info


def run_metadata(bench: Any, model_name: str, weights: str | None, model: Any, timings: Mapping[str, float],
                 command: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"benchmark": bench.name}
    meta.update(weights_description(model_name, weights, model))
    meta["command"] = command
    meta["date (UTC)"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    if bench.overlaps:
        meta["ID/OOD overlap (identical images)"] = dict(bench.overlaps)
    meta["data sha256"] = data_hashes(bench)
    meta["timings [s]"] = {k: round(float(v), 3) for k, v in timings.items()}
    meta["versions"] = _versions()
    if extra:
        meta.update(extra)
    return meta


def _versions() -> dict[str, str]:
    from .html import package_versions

    return package_versions()
