"""CLIP OOD detection (zero-shot MCM, GL-MCM, NegLabel; few-shot LoCoOp, CLIPN) on the CIFAR bench files.

Needs CLIP weights, which no package here ships: download a Hugging Face CLIP once (network) and point --model at
the folder, or at its model id when it is in the Hugging Face cache, e.g.

    python -c "from oodscope.vlm import download_clip; download_clip('openai/clip-vit-base-patch16', 'clip-b16')"
    PYTHONPATH=. python benchmarks/vlm_zero_shot.py --model clip-b16 --device auto                 # CIFAR-10 ID
    PYTHONPATH=. python benchmarks/vlm_zero_shot.py --model clip-b16 --device auto --id cifar100   # CIFAR-100 ID
    PYTHONPATH=. python benchmarks/vlm_zero_shot.py --model openai/clip-vit-base-patch16 --device auto \\
        --detectors locoop,clipn --shots 16                                                   # few-shot, 16 per class

The data folder holds OpenOOD-style ``.npz`` files (``images`` uint8 N x 32 x 32 x 3, ``labels``):

* ``--id cifar10`` (default): ID = ``cifar10_test``; OOD = ``cifar100_test``, ``tin_test`` (near), ``mnist_test``,
  ``textures`` (far); the few-shot training images are the first ``--shots`` images per class of
  ``cifar10_train``.
* ``--id cifar100``: ID = ``cifar100_test`` (its fine labels, the 100 class names in sorted order, underscores as
  spaces); OOD = ``cifar10_test``, ``tin_test`` (near), ``mnist_test``, ``textures`` (far). There is no CIFAR-100
  training set in the bench: the few-shot images are the first ``--shots`` test images per class, removed from the
  ID test set (every detector, zero-shot ones too, is scored on the same remaining images). ``tin_test`` is
  OpenOOD's list for CIFAR-10 ID; it was not filtered of classes that overlap CIFAR-100.

Few-shot detectors (``locoop``, ``clipn``) train on the shots (``fit(classes, images, labels)``); LoCoOp's
``top_k`` defaults to ``max(1, round(K / 5))`` here (the paper's 200 of ImageNet-1k's 1,000 classes: 2 for CIFAR-10,
20 for CIFAR-100) and ``--param DET.NAME=VALUE`` sets any hyperparameter (``--param locoop.epochs=5``);
``--param clipn.no_encoder='"FILE"'`` runs CLIPN zero-shot from a "no" encoder pre-trained on image-caption pairs
(``oodscope.vlm.clipn.pretrain_no_encoder``), the paper's mode. Images are
upsampled by CLIP's preprocessing (bicubic, to the model's input size). ``--limit N`` takes the first N images of
every test set (a smoke run); ``--model tiny`` writes and uses a random tiny CLIP (the one the tests build, from
``tests/vlm_models.py``: run from the repository root; it only checks that the script runs). Prints AUROC and
FPR@95 (percent, ID positive) per detector and OOD set, and the near / far means; embeddings are cached
(oodscope's extraction cache).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import cifar_bench_dir, parse_params
from oodscope.safeio import load_npz

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100 = [  # CIFAR-100's fine classes in label order (sorted names; underscores as spaces)
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain", "mouse", "mushroom", "oak tree", "orange",
    "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow tree", "wolf", "woman", "worm",
]
BENCHES = {  # ID set -> (ID test file, few-shot training file, OOD files by group)
    "cifar10": ("cifar10_test", "cifar10_train", {"near": ["cifar100_test", "tin_test"],
                                                  "far": ["mnist_test", "textures"]}),
    "cifar100": ("cifar100_test", "cifar100_test", {"near": ["cifar10_test", "tin_test"],
                                                    "far": ["mnist_test", "textures"]}),
}
FEW_SHOT = ("locoop", "clipn")  # detectors trained on labelled ID images


def load(folder: Path, name: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 NCHW images and the labels (None when the file has none) of the first ``limit`` rows."""
    data = load_npz(folder / f"{name}.npz")
    images = np.ascontiguousarray(data["images"][:limit].transpose(0, 3, 1, 2))
    labels = data["labels"][:limit] if "labels" in data else None
    return images, labels


def class_names(folder: Path, id_set: str) -> list[str]:
    """The ID class names; a bench ``manifest.json`` that lists other CIFAR-100 classes is an error."""
    if id_set == "cifar10":
        return CIFAR10
    manifest = folder / "manifest.json"
    if manifest.exists():
        listed = json.loads(manifest.read_text()).get("cifar100_test", {}).get("classes")
        if listed is not None and [n.replace("_", " ") for n in listed] != CIFAR100:
            raise ValueError(f"{manifest}: cifar100_test's classes are not CIFAR-100's fine classes in sorted order")
    return CIFAR100


def first_per_class(labels: np.ndarray, shots: int) -> np.ndarray:
    """Indices of the first ``shots`` rows of every class, in file order."""
    return np.concatenate([np.flatnonzero(labels == c)[:shots] for c in np.unique(labels)])


def split(folder: Path, id_set: str, shots: int, limit: int | None):
    """``(id_test, (shot_images, shot_labels), ood)``: the shots are disjoint from the ID test images."""
    test_name, train_name, groups = BENCHES[id_set]
    train_images, train_labels = load(folder, train_name)
    chosen = first_per_class(train_labels, shots)
    if train_name == test_name:  # CIFAR-100: shots from the test file, removed from it
        rest = np.setdiff1d(np.arange(len(train_labels)), chosen)[:limit]
        id_test = train_images[rest]
    else:
        id_test = load(folder, test_name, limit)[0]
    ood = {name: load(folder, name, limit)[0] for group in groups.values() for name in group}
    return id_test, (train_images[chosen], train_labels[chosen].astype(np.int64)), ood


def make_detector(name: str, clip, names: list[str], device: str, params: dict[str, dict]):
    import oodscope
    from oodscope.training.objectives.locoop_reg import default_top_k

    settings = {"model": clip, "device": device}
    if name == "locoop":
        settings["top_k"] = default_top_k(len(names))
    return oodscope.create(name, **{**settings, **params.get(name, {})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face CLIP folder, a model id in the Hugging "
                        "Face cache, open_clip:ARCH/PRETRAINED, or 'tiny' (random weights: a smoke test only)")
    parser.add_argument("--data", default=None, help="a folder of OpenOOD-style .npz files (default: the CIFAR "
                        "bench of benchmarks/common.py)")
    parser.add_argument("--id", default="cifar10", choices=sorted(BENCHES), help="the ID set (default cifar10)")
    parser.add_argument("--detectors", default="mcm,gl_mcm,neglabel", help="comma-separated; few-shot: "
                        + ", ".join(FEW_SHOT))
    parser.add_argument("--shots", type=int, default=16, help="labelled ID images per class for the few-shot "
                        "detectors (default 16, the papers' setting)")
    parser.add_argument("--param", action="append", default=[], metavar="DET.NAME=VALUE",
                        help="detector hyperparameter, e.g. locoop.epochs=5 (repeatable)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    if args.shots < 1:
        parser.error("--shots must be >= 1")

    from oodscope.metrics import auroc, fpr_at_tpr
    from oodscope.vlm import load_clip

    model = args.model
    if model == "tiny":
        from tests.vlm_models import save_tiny_clip

        model = save_tiny_clip(Path(tempfile.mkdtemp()) / "tiny")
    clip = load_clip(model, device="cpu", batch_size=args.batch_size, progress=True)
    params = parse_params(args.param, nested=True)  # DET.NAME=VALUE -> {DET: {NAME: value}}
    folder = Path(args.data) if args.data else cifar_bench_dir()
    names = class_names(folder, args.id)
    id_images, (shot_images, shot_labels), ood = split(folder, args.id, args.shots, args.limit)
    detectors = [n.strip() for n in args.detectors.split(",") if n.strip()]
    shots_used = any(n in FEW_SHOT and "no_encoder" not in params.get(n, {}) for n in detectors)
    print(f"ID {args.id} ({len(names)} classes): {len(id_images)} test images"
          + (f", {len(shot_images)} shots ({args.shots} per class)" if shots_used else "")
          + "; OOD: " + ", ".join(f"{k} {len(v)}" for k, v in ood.items()))
    rows = []
    for name in detectors:
        start = time.perf_counter()
        detector = make_detector(name, clip, names, args.device, params)
        if name in FEW_SHOT and getattr(detector, "no_encoder", None) is None:  # a pre-trained CLIPN is zero-shot
            detector.fit(names, shot_images, shot_labels)
        else:
            detector.fit(names)
        id_scores = detector.score(id_images)
        for set_name, images in ood.items():
            scores = detector.score(images)
            rows.append((name, set_name, 100 * auroc(id_scores, scores), 100 * fpr_at_tpr(id_scores, scores)))
        extra = f"  corpus: {detector.corpus_}" if hasattr(detector, "corpus_") else ""
        print(f"{name}: {time.perf_counter() - start:.1f} s{extra}")
    print_table(rows, BENCHES[args.id][2])


def print_table(rows: list[tuple[str, str, float, float]], groups: dict[str, list[str]]) -> None:
    print(f"\n{'detector':<10}{'OOD set':<16}{'AUROC':>8}{'FPR@95':>9}")
    for name, set_name, a, f in rows:
        print(f"{name:<10}{set_name:<16}{a:8.2f}{f:9.2f}")
    for name in dict.fromkeys(r[0] for r in rows):
        for group, members in groups.items():
            chosen = [r for r in rows if r[0] == name and r[1] in members]
            print(f"{name:<10}{'mean ' + group:<16}{np.mean([r[2] for r in chosen]):8.2f}"
                  f"{np.mean([r[3] for r in chosen]):9.2f}")


if __name__ == "__main__":
    main()
