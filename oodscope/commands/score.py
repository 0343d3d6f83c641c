"""``oodscope score``: score new data with detectors saved by ``oodscope fit``, one row per input.

    oodscope score --detectors dets/ --data new_images/ --out scores.csv

writes ``id`` (the file path relative to the folder, or the row number / ``--id-column``), then for every detector
its score (higher = more OOD) and ``<label>_ood`` (1 where the score is above the detector's threshold). The model
is rebuilt from ``dets/model.json``; a model file changed since ``fit`` is refused. ``--format parquet|json`` writes
those formats (the file is written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ._user_model import MANIFEST, MODEL_FILE, add_data_arguments, extract_data, load_data

FORMATS = ("csv", "parquet", "json")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("score", help="score data with detectors saved by oodscope fit")
    parser.add_argument("--detectors", required=True, help="the folder written by oodscope fit")
    parser.add_argument("--data", required=True, help="data to score: image folder, list, .npz, .npy, .csv")
    parser.add_argument("--out", required=True, help="the scores file")
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: from --out's suffix, else csv")
    add_data_arguments(parser)
    parser.set_defaults(run=run)


def read_folder(folder: Path) -> tuple[dict, dict]:
    for name in (MODEL_FILE, MANIFEST):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name}; is this a folder written by oodscope fit?")
    try:
        return (json.loads((folder / MODEL_FILE).read_text(encoding="utf-8")),
                json.loads((folder / MANIFEST).read_text(encoding="utf-8")))
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder}: a corrupt {MODEL_FILE} or {MANIFEST} ({error})") from None


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..models.spec import ModelSpec, load
    from ..persistence import load as load_detector

    from ..extraction.extract import resolve_device

    resolve_device(args.device)  # a device this machine lacks fails before any loading
    folder = Path(args.detectors)
    model_info, manifest = read_folder(folder)
    kind = model_info.pop("data_kind", "images")
    label_column = model_info.pop("label_column", None)
    spec = ModelSpec.from_json(model_info)
    detectors = {entry["label"]: load_detector(folder / entry["file"]) for entry in manifest["detectors"]}
    # a table scored with the label column that fit used drops it from the features when it is there
    data = load_data(args.data, args, spec.size, ignore_columns=(label_column,) if label_column else ())
    if data.kind != kind:
        raise ValueError(f"{args.data}: {data.kind} data, but the detectors were fitted on {kind}")
    model, preprocess, _ = load(spec, images=kind == "images")
    layers = sorted({layer for d in detectors.values() for layer in d.layer_names()})
    outputs = extract_data(model, preprocess, data, layers, args, "score", spec.head)
    table = {"id": data.ids}
    for label, detector in detectors.items():
        scores = detector.score(outputs)
        table[label] = scores
        table[f"{label}_ood"] = (scores > detector.threshold_).astype(int)
    frame = pd.DataFrame(table)
    out = Path(args.out)
    write_table(frame, out, args.format or (out.suffix[1:] if out.suffix[1:] in FORMATS else "csv"))
    flagged = {label: int(frame[f"{label}_ood"].sum()) for label in detectors}
    print(f"scored {len(frame)} rows -> {out}; flagged OOD: " +
          ", ".join(f"{label} {count}" for label, count in flagged.items()))
    return 0


def write_table(frame, out: Path, fmt: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt == "csv":
            frame.to_csv(tmp, index=False, float_format="%.17g")
        elif fmt == "json":
            records = [{k: v.item() if hasattr(v, "item") else v for k, v in row.items()}
                       for row in frame.to_dict(orient="records")]  # floats as repr: exact round trip
            tmp.write_text(json.dumps(records) + "\n", encoding="utf-8")
        else:
            try:
                frame.to_parquet(tmp, index=False)
            except ImportError as error:
                raise ImportError(f"--format parquet needs pyarrow: pip install pyarrow ({error})") from None
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
