"""Options and helpers shared by ``oodscope fit`` and ``oodscope score``: the model spec, the data, extraction."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

MODEL_FILE = "model.json"
MANIFEST = "detectors.json"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="zoo name, TorchScript file, package.module:callable, torchvision:NAME, timm:NAME or "
                             "hf:MODEL (see oodscope.models.spec)")
    parser.add_argument("--weights", default=None, help="state dict for a zoo name or package.module:callable")
    parser.add_argument("--size", type=int, default=None, help="resize and center-crop images to this side")
    parser.add_argument("--mean", default=None, help="per-channel mean, e.g. 0.485,0.456,0.406 (images)")
    parser.add_argument("--std", default=None, help="per-channel std, e.g. 0.229,0.224,0.225 (images)")
    parser.add_argument("--head", default="auto", help="the classifier layer (default: the last nn.Linear)")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label-column", default=None, help="CSV/Parquet: the integer class label column")
    parser.add_argument("--id-column", default=None, help="CSV/Parquet: the column of row ids")
    parser.add_argument("--image-root", default=None, help="root of an OpenOOD image list (default: its folder)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto (CUDA, MPS, else CPU), cpu, cuda, cuda:1, ...")
    parser.add_argument("--cache-dir", default=None, help="the outputs cache (default: ~/.cache/oodscope)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the outputs cache")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{what} must be comma-separated numbers, got {text!r}") from None


def load_data(path: str, args: argparse.Namespace, size: int | None, ignore_columns: tuple[str, ...] = ()):
    from ..data.user_data import load

    return load(path, image_size=size, label_column=args.label_column, id_column=args.id_column,
                image_root=args.image_root, ignore_columns=ignore_columns)


def resizable(path: str) -> bool:
    """Images read from files (a folder or an image list) are resized to the model's size when they are read."""
    return Path(path).is_dir() or path.endswith(".txt")


def extract_data(model, preprocess, data, layers, args, name: str, head: str):
    from ..extraction.extract import extract

    return extract(model, (data.inputs, data.labels) if data.labels is not None else data.inputs, name=name,
                   preprocess=preprocess, layers=layers, head=head, batch_size=args.batch_size,
                   device=args.device, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                   progress=not args.quiet)


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def safe_file_name(label: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_") or "detector"
