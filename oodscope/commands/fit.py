"""``oodscope fit``: fit detectors on a user's model and data, calibrate their thresholds, save them.

    oodscope fit --model model.pt --train train_images/ --val val_images/ --detectors msp,energy,knn --out dets/

writes ``dets/model.json`` (the model spec, preprocessing and sha256 of the model file), one saved detector per
name (``dets/<label>.oodscope``, the :mod:`oodscope.persistence` format, threshold included) and
``dets/detectors.json`` (labels, files, thresholds, the keep fraction and what they were calibrated on).
``oodscope score --detectors dets/ --data new/`` then scores new data with the same model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ._user_model import (MANIFEST, MODEL_FILE, add_data_arguments, add_model_arguments, extract_data, floats,
                          load_data, resizable, safe_file_name, write_json_atomic)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("fit", help="fit detectors on your model's outputs and save them")
    add_model_arguments(parser)
    parser.add_argument("--train", required=True, help="ID training data: image folder, list, .npz, .npy, .csv")
    parser.add_argument("--val", default=None, help="held-out ID data for the thresholds (default: --train)")
    parser.add_argument("--detectors", default="msp,energy,knn", help="comma-separated (default: msp,energy,knn)")
    parser.add_argument("--keep", type=float, default=0.95,
                        help="threshold: accept this share of the calibration data as ID (default 0.95)")
    parser.add_argument("--out", required=True, help="folder for the saved detectors")
    add_data_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..detectors import create
    from ..evaluation import labelled_detectors
    from ..extraction.extract import resolve_device
    from ..models.spec import ModelSpec, kind_of, load
    from ..runner import parse_detectors

    start = time.perf_counter()
    if not 0.0 < args.keep < 1.0:
        raise ValueError(f"--keep must lie in (0, 1), got {args.keep}")
    resolve_device(args.device)  # a device this machine lacks fails before any loading
    kind_of(args.model)  # a bad --model is named before any data is read
    detectors = labelled_detectors([create(name) for name in parse_detectors(args.detectors)])
    spec = ModelSpec(args.model, weights=args.weights, size=args.size, mean=floats(args.mean, "mean"),
                     std=floats(args.std, "std"), head=args.head)
    if resizable(args.train):  # image files: the model first, so they are read once at its input size
        model, preprocess, resolved = load(spec, images=True)
        train = load_data(args.train, args, resolved.size)
    else:
        train = load_data(args.train, args, spec.size)
        model, preprocess, resolved = load(spec, images=train.kind == "images")
    val = load_data(args.val, args, resolved.size) if args.val else None
    layers = sorted({layer for d in detectors.values() for layer in d.layer_names()})
    train_out = extract_data(model, preprocess, train, layers, args, "fit-train", args.head)
    val_out = None if val is None else extract_data(model, preprocess, val, layers, args, "fit-val", args.head)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"keep": args.keep, "calibrated_on": "val" if val is not None else "train", "detectors": []}
    for label, detector in detectors.items():
        detector.fit(train_out, val=val_out)
        detector.calibrate(val_out if val_out is not None else train_out, keep=args.keep)
        path = out / f"{safe_file_name(label)}.oodscope"
        detector.save(path)
        manifest["detectors"].append({"label": label, "file": path.name, "threshold": float(detector.threshold_)})
        print(f"{label:<24} threshold {detector.threshold_:.6g}  -> {path}")
    write_json_atomic(out / MODEL_FILE, {**resolved.to_json(), "data_kind": train.kind,
                                         "label_column": args.label_column})
    write_json_atomic(out / MANIFEST, manifest)
    print(f"fitted {len(detectors)} detectors on {len(train)} rows in {time.perf_counter() - start:.1f} s; "
          f"thresholds keep {args.keep:.0%} of {manifest['calibrated_on']}")
    return 0
