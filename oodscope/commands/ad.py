"""``oodscope ad PATH``: image anomaly detection on an MVTec-layout folder (image + pixel metrics, overlays,
``report.html``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_DETECTORS = "patchcore,gaussian_ad"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ad", help="image anomaly detection on an MVTec-layout folder")
    parser.add_argument("path", help="folder with train/good, test/<defect>, ground_truth/<defect>")
    parser.add_argument("--detectors", default=DEFAULT_DETECTORS,
                        help=f"comma-separated image detectors (default: {DEFAULT_DETECTORS}); 'all' for every one")
    parser.add_argument("--out", default="oodscope-ad", help="output directory (default: ./oodscope-ad)")
    parser.add_argument("--size", type=int, default=224, help="images are resized to SIZE x SIZE (default 224)")
    parser.add_argument("--crop", type=int, default=None, help="then center-cropped to CROP x CROP (e.g. 224 "
                        "with --size 256, the MVTec AD protocol); default: no crop")
    parser.add_argument("--max-train", type=int, default=None, help="random subsample of train/good")
    parser.add_argument("--seed", type=int, default=0, help="seed of --max-train and of the detectors")
    parser.add_argument("--device", default="cpu",
                        help="where backbones and networks run: cpu (default), cuda, cuda:1, mps, auto")
    parser.add_argument("--param", action="append", default=[], metavar="DET.NAME=VALUE",
                        help="detector hyperparameter, e.g. patchcore.coreset_ratio=0.01 (repeatable)")
    parser.set_defaults(run=run)


def _parse_params(items: list[str]) -> dict[str, dict]:
    params: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        det, dot, name = key.partition(".")
        if not (sep and dot and name):
            raise ValueError(f"--param {item!r}: expected DETECTOR.NAME=VALUE, e.g. patchcore.coreset_ratio=0.01")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        params.setdefault(det, {})[name] = parsed
    return params


def run(args: argparse.Namespace) -> int:
    from ..data.mvtec import load_mvtec
    from ..imagead import available, get
    from ..imagead.evaluate import run_detector
    from ..report.ad import degenerate_notes, overlay_pngs, plot_overlays, write_ad_report
    from ..results_io import array_description, run_metadata, write_results

    params = _parse_params(args.param)
    if args.detectors == "all":  # CLIP detectors (winclip, ...) join "all" only when --param gives their model
        names = [n for n in available() if not getattr(get(n), "needs_clip", False) or "model" in params.get(n, {})]
    else:
        names = [n.strip() for n in args.detectors.split(",") if n.strip()]
    for name in names:
        get(name)  # unknown names fail before any loading
    unknown = set(params) - set(names)
    if unknown:
        raise ValueError(f"--param names detectors {sorted(unknown)} that are not in --detectors {names}")
    from ..extraction.extract import resolve_device

    resolve_device(args.device)  # a device this machine lacks fails before any loading
    start = time.perf_counter()
    data = load_mvtec(args.path, size=args.size, crop=args.crop, max_train=args.max_train, seed=args.seed)
    timings = {"load": time.perf_counter() - start}
    notes = list(data.notes)
    print(f"{data.root}: train {len(data.train)} normal, test {int((data.test.labels == 0).sum())} normal + "
          f"{int(data.test.labels.sum())} anomalous ({', '.join(data.defect_types)}), "
          f"{data.train.images.shape[-1]} px, loaded in {timings['load']:.1f} s")
    if not data.test.pixel_ready:
        notes.append("some test images have no ground-truth mask: pixel metrics are reported as missing (null)")
    records, runs, detectors = [], [], {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        kwargs = dict(params.get(name, {}))
        if "device" in get(name)._param_names() and "device" not in kwargs:
            kwargs["device"] = args.device
        elif args.device != "cpu" and "device" not in get(name)._param_names():
            print(f"note: {name} runs on the CPU (it takes no device)")
        detector = get(name)(**kwargs)
        if "seed" not in kwargs:
            detector.with_seed(args.seed)
        result = run_detector(detector, data.train, data.test, notes)
        detectors[detector.label] = detector
        timings[f"{detector.label} fit"] = result.fit_s
        timings[f"{detector.label} score"] = result.ms_per_image * len(data.test) / 1000.0
        runs.append(result)
        records += result.records
        print(f"  {name}: fit {result.fit_s:.1f} s, {result.ms_per_image:.1f} ms/image", flush=True)
    print(format_ad_table(records))
    notes += [note for note in degenerate_notes(runs, data.test) if note not in notes]
    for note in notes:
        print(f"note: {note}")
    timings["total"] = time.perf_counter() - start
    arrays = {"train images": data.train.images, "test images": data.test.images, "test labels": data.test.labels}
    if data.test.masks is not None:
        arrays["test masks"] = data.test.masks
    meta = run_metadata("ad", argv=getattr(args, "argv", None), data_root=str(data.root),
                        data_sha256={k: array_description(v) for k, v in arrays.items()},
                        options={k: getattr(args, k) for k in ("size", "crop", "max_train", "seed")},
                        detectors=detectors, timings=timings, notes=notes)
    paths = write_results(out, records, meta)
    overlays = overlay_pngs(runs, data.test)  # drawn once: written next to the report and embedded in it
    figures = plot_overlays(runs, data.test, out, pngs=overlays)
    paths["html"] = write_ad_report(out / "report.html", runs, data.test, meta, notes=notes, overlays=overlays,
                                    detectors={d.name: d for d in detectors.values()})
    print(f"total {time.perf_counter() - start:.1f} s; wrote " + ", ".join(str(p) for p in [*paths.values(), *figures]))
    return 0


AD_COLUMNS = [("detector", "detector", ""), ("dataset", "dataset", ""), ("AUROC", "auroc", ".2f"),
              ("F1max", "f1_max", ".2f"), ("pxAUROC", "pixel_auroc", ".2f"), ("AUPRO", "aupro", ".2f"),
              ("AUPIMO", "aupimo", ".2f")]


def format_ad_table(records: list[dict]) -> str:
    """Image and pixel metrics per detector x defect type (``-``: missing)."""
    from ..results_io import format_table

    return format_table(records, AD_COLUMNS)
