"""Zero-shot CLIP OOD detection (MCM, GL-MCM, NegLabel) on the CIFAR-10 benchmark files: ID = CIFAR-10 test.

Needs CLIP weights, which no package here ships: download a Hugging Face CLIP once (network) and point --model at
the folder, e.g.

    python -c "from oodscope.vlm import download_clip; download_clip('openai/clip-vit-base-patch16', 'clip-b16')"
    PYTHONPATH=. python benchmarks/vlm_zero_shot.py --model clip-b16 --device auto   # --data FOLDER: another bench

The data folder holds OpenOOD-style ``.npz`` files (``images`` uint8 N x 32 x 32 x 3): ``cifar10_test.npz`` (ID) and
the OOD sets ``cifar100_test``, ``tin_test`` (near), ``mnist_test``, ``textures`` (far). Images are upsampled by
CLIP's preprocessing (bicubic, to the model's input size). ``--limit N`` takes the first N images of every set (a
smoke run); ``--model tiny`` writes and uses a random tiny CLIP (the one the tests build, from
``tests/vlm_models.py``: run from the repository root; it only checks that the script runs). Prints AUROC and
FPR@95 (percent, ID positive) per detector and OOD set; embeddings are cached (oodscope's extraction cache).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import cifar_bench_dir
from oodscope.safeio import load_npz

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
OOD_SETS = {"near": ["cifar100_test", "tin_test"], "far": ["mnist_test", "textures"]}


def load(folder: Path, name: str, limit: int | None) -> np.ndarray:
    images = load_npz(folder / f"{name}.npz", ["images"])["images"][:limit]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # uint8 NCHW


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face CLIP folder, open_clip:ARCH/PRETRAINED, "
                        "or 'tiny' (random weights: a smoke test only)")
    parser.add_argument("--data", default=None, help="a folder of OpenOOD-style .npz files (default: the CIFAR-10 "
                        "bench of benchmarks/common.py)")
    parser.add_argument("--detectors", default="mcm,gl_mcm,neglabel")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    import oodscope
    from oodscope.metrics import auroc, fpr_at_tpr
    from oodscope.vlm import load_clip

    model = args.model
    if model == "tiny":
        from tests.vlm_models import save_tiny_clip

        model = save_tiny_clip(Path(tempfile.mkdtemp()) / "tiny")
    clip = load_clip(model, device="cpu", batch_size=args.batch_size, progress=True)
    folder = Path(args.data) if args.data else cifar_bench_dir()
    id_images = load(folder, "cifar10_test", args.limit)
    ood = {name: load(folder, name, args.limit) for group in OOD_SETS.values() for name in group}
    print(f"ID cifar10_test: {len(id_images)} images; OOD: " + ", ".join(f"{k} {len(v)}" for k, v in ood.items()))
    rows = []
    for name in args.detectors.split(","):
        start = time.perf_counter()
        detector = oodscope.create(name, model=clip, device=args.device).fit(CIFAR10)
        id_scores = detector.score(id_images)
        for set_name, images in ood.items():
            scores = detector.score(images)
            rows.append((name, set_name, 100 * auroc(id_scores, scores), 100 * fpr_at_tpr(id_scores, scores)))
        extra = f"  corpus: {detector.corpus_}" if hasattr(detector, "corpus_") else ""
        print(f"{name}: {time.perf_counter() - start:.1f} s{extra}")
    print(f"\n{'detector':<10}{'OOD set':<16}{'AUROC':>8}{'FPR@95':>9}")
    for name, set_name, a, f in rows:
        print(f"{name:<10}{set_name:<16}{a:8.2f}{f:9.2f}")


if __name__ == "__main__":
    main()
