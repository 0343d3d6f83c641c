"""Generative OOD on the shared CIFAR-10 bench: likelihoods, their famous failure and the corrections.

``--model pixelcnn`` or ``--model realnvp``: one density model (:mod:`oodscope.generative.pixelcnn`,
:mod:`oodscope.generative.realnvp`) is trained on the 10,000 ID train images with a CPU schedule (``--epochs``,
default 3; Adam, lr 1e-3, batch 64, seed 0), and, for the likelihood ratio, a background model on the same images
with 20 % of the values replaced by uniform noise; the four likelihood scores share those two models.
``--model hvae``: one hierarchical VAE (:mod:`oodscope.generative.hvae`), scored by its importance-weighted ELBO
(bits/dim) and by ``LLR^{>1}`` and ``LLR^{>2}``. Scores on a fixed random subsample of ``--per-set`` images of the ID
test set and of each OOD set (CIFAR-100 and Tiny ImageNet near, MNIST and Textures far): AUROC and FPR@95
(percent), and the bits/dim of the ID test images next to the published CIFAR-10 figures of the architecture.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/generative_cifar10.py --model pixelcnn --epochs 3 \
        --out benchmarks/results/generative_cifar10.json
    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/generative_cifar10.py --model realnvp --hidden 32 --blocks 1 \
        --epochs 3 --out benchmarks/results/generative_cifar10_realnvp.json
    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/generative_cifar10.py --model hvae --hidden 64 --epochs 5 \
        --out benchmarks/results/generative_cifar10_hvae.json
    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/generative_cifar10.py --model msma --hidden 64 --blocks 2 \
        --epochs 3 --out benchmarks/results/generative_cifar10_msma.json
    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/generative_cifar10.py --model moodv2 --epochs 5 \
        --out benchmarks/results/generative_cifar10_moodv2.json

``--model msma``: MSMA's score network and GMM; ``--model moodv2``: the small MAE with ``knn`` (k = 50) on its
features (neither has a likelihood, so no bits/dim).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-bench"
DETECTORS = ("pixelcnn_nll", "likelihood_ratio", "input_complexity", "typicality")
PUBLISHED_BPD = {
    "pixelcnn": {"PixelCNN (van den Oord et al. 2016)": 3.00, "PixelCNN++ (Salimans et al. 2017)": 2.92},
    "realnvp": {"RealNVP (Dinh et al. 2017)": 3.49, "Glow (Kingma & Dhariwal 2018)": 3.35},
    "hvae": {"BIVA (Maaloe et al. 2019)": 3.08, "NVAE (Vahdat & Kautz 2020)": 2.91},
}


class _HVAEScores:
    """The HVAE's three rows from one pass per set: its importance-weighted ELBO (bits/dim), LLR^{>1}, LLR^{>2}."""

    def __init__(self, detector):
        self.detector = detector
        self.training_ = detector.training_

    def rows(self, images) -> dict[str, np.ndarray]:
        bounds = self.detector.bounds(images, ks=(0, 1, 2))
        return {"hvae_elbo": bounds[0], "hvae_llr>1": bounds[1] - bounds[0], "hvae_llr>2": bounds[2] - bounds[0]}


def _detectors(model: str, settings: dict, train) -> dict:
    import oodscope

    if model == "msma":
        return {"msma": oodscope.create("msma", **settings).fit(train)}
    if model == "moodv2":
        mae = {key: value for key, value in settings.items() if key not in ("hidden", "blocks")}
        return {"moodv2": oodscope.create("moodv2", **mae).fit(train)}
    if model == "hvae":
        hvae = {key: value for key, value in settings.items() if key != "blocks"}
        return {"hvae": _HVAEScores(oodscope.create("hvae_llr", samples=4, **hvae).fit(train))}
    return {name: oodscope.create(name, model=model, **settings).fit(train) for name in DETECTORS}


def main() -> None:
    import oodscope
    from oodscope.data.spec import load_benchmark_dir
    from oodscope.metrics import ood_metrics
    from oodscope.training.compare import subsample

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("pixelcnn", "realnvp", "hvae", "msma", "moodv2"), default="pixelcnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--train", type=int, default=0, help="ID training images (0: all 10,000)")
    parser.add_argument("--per-set", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/generative_cifar10.json")
    args = parser.parse_args()

    bench = load_benchmark_dir(BENCH)
    train = subsample(bench.train, args.train)[0]
    test = subsample(bench.test, args.per_set)[0]
    ood = {f"{group}/{name}": subsample(split, args.per_set)[0] for group, sets in bench.ood.items()
           for name, split in sets.items()}
    settings = dict(hidden=args.hidden, blocks=args.blocks, epochs=args.epochs, device=args.device)
    rows, fits = [], {}
    start = time.perf_counter()
    detectors = _detectors(args.model, settings, train)  # the shared models train once, on the first fit
    fits["all"] = time.perf_counter() - start
    def scores_of(images) -> dict[str, np.ndarray]:
        out = {}
        for name, detector in detectors.items():
            out.update(detector.rows(images) if hasattr(detector, "rows") else {name: detector.score(images)})
        return out

    scores = {"id_test": scores_of(test), **{name: scores_of(images) for name, images in ood.items()}}
    row_names = list(scores["id_test"])
    for name in row_names:
        for set_name in ood:
            values = ood_metrics(scores["id_test"][name], scores[set_name][name])
            rows.append({"detector": name, "dataset": set_name, "auroc": 100 * values["auroc"],
                         "fpr95": 100 * values["fpr95"]})
        print(name, {r["dataset"]: round(r["auroc"], 2) for r in rows if r["detector"] == name}, flush=True)
    first = next(iter(detectors.values()))
    bpd = {}
    if args.model in PUBLISHED_BPD:  # bits/dim: the NLL, or the HVAE's importance-weighted ELBO
        bpd = {name: float(np.mean(by_row[row_names[0]])) for name, by_row in scores.items()}
    result = {"args": vars(args), "rows": rows, "fit_seconds": fits, "bits_per_dim": bpd,
              "training": first.training_, "published_bpd": PUBLISHED_BPD.get(args.model, {})}
    if "likelihood_ratio" in detectors:
        result["background_training"] = detectors["likelihood_ratio"].background_training_
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    sets = list(ood)
    print("| score | " + " | ".join(f"{s} AUROC / FPR95" for s in sets) + " |")
    print("|---|" + "---|" * len(sets))
    for name in row_names:
        cells = {r["dataset"]: r for r in rows if r["detector"] == name}
        print(f"| {name} | " + " | ".join(f"{cells[s]['auroc']:.2f} / {cells[s]['fpr95']:.2f}" for s in sets) + " |")
    print("bits/dim:", {k: round(v, 3) for k, v in bpd.items()}, "training per epoch:", first.training_,
          "fit seconds:", fits)


if __name__ == "__main__":
    main()
