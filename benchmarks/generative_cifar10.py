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
features (neither has a likelihood, so no bits/dim). ``--model ddpm``: one small DDPM (:mod:`oodscope.generative.ddpm`)
shared by ``lmd`` (``--attempts`` alternating checkerboard masks, ``--sampling-steps`` ancestral steps each) and
``diffguard`` (the shared ResNet-20 as the classifier, ``--ddim-steps`` / ``--inversion-steps``); instead of bits/dim
the DDPM's simple loss (Ho et al. Eq. 14, 10 fixed steps and noises per image) on each set. Scoring every image
runs the U-Net ``attempts x sampling-steps`` times for LMD, so keep ``--per-set`` small on a CPU.
``--models-dir DIR`` saves every fitted detector there after training (``detector.save``); a rerun with the same
folder loads them and only scores, so a run stopped while scoring does not train again:

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/generative_cifar10.py --model ddpm --hidden 32 --blocks 1 \
        --epochs 3 --per-set 200 --attempts 4 --sampling-steps 25 --out benchmarks/results/generative_cifar10_ddpm.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.common import cifar_bench, cifar_weights, percent_metrics, write_json

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


def _detectors(model: str, settings: dict, train, args=None) -> dict:
    import oodscope

    if model == "ddpm":
        lmd = oodscope.create("lmd", attempts=args.attempts, sampling_steps=args.sampling_steps, **settings)
        guard = oodscope.create("diffguard", classifier="cifar10_resnet20",
                                weights=str(cifar_weights("cifar10_resnet20")), ddim_steps=args.ddim_steps,
                                inversion_steps=args.inversion_steps, **settings)
        return {"lmd": lmd.fit(train), "diffguard": guard.fit(train)}
    if model == "msma":
        return {"msma": oodscope.create("msma", **settings).fit(train)}
    if model == "moodv2":
        mae = {key: value for key, value in settings.items() if key not in ("hidden", "blocks")}
        return {"moodv2": oodscope.create("moodv2", **mae).fit(train)}
    if model == "hvae":
        hvae = {key: value for key, value in settings.items() if key != "blocks"}
        return {"hvae": _HVAEScores(oodscope.create("hvae_llr", samples=4, **hvae).fit(train))}
    return {name: oodscope.create(name, model=model, **settings).fit(train) for name in DETECTORS}


def _model_paths(folder: str, model: str) -> dict[str, Path]:
    names = {"ddpm": ("lmd", "diffguard"), "msma": ("msma",), "moodv2": ("moodv2",), "hvae": ("hvae",)}
    return {name: Path(folder) / f"{model}-{name}.oodscope" for name in names.get(model, DETECTORS)}


def _saved_detectors(folder: str, model: str) -> dict | None:
    """The detectors saved by an earlier run with ``--models-dir`` (all of them, or None: then train)."""
    import oodscope

    paths = _model_paths(folder, model)
    if not all(path.exists() for path in paths.values()):
        return None
    print(f"loading the fitted detectors from {folder} (delete them to train again)", flush=True)
    loaded = {name: oodscope.load(path) for name, path in paths.items()}
    return {name: _HVAEScores(det) if model == "hvae" else det for name, det in loaded.items()}


def _save_detectors(folder: str, model: str, detectors: dict) -> None:
    import oodscope

    for name, path in _model_paths(folder, model).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        detector = detectors[name]
        (detector.detector if isinstance(detector, _HVAEScores) else detector).save(path)


def main() -> None:
    from oodscope.training.compare import subsample

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("pixelcnn", "realnvp", "hvae", "msma", "moodv2", "ddpm"),
                        default="pixelcnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--train", type=int, default=0, help="ID training images (0: all 10,000)")
    parser.add_argument("--per-set", type=int, default=2000)
    parser.add_argument("--attempts", type=int, default=10, help="ddpm: LMD's masks per image")
    parser.add_argument("--sampling-steps", type=int, default=50, help="ddpm: LMD's ancestral steps per inpainting")
    parser.add_argument("--ddim-steps", type=int, default=50, help="ddpm: DiffGuard's DDIM chain")
    parser.add_argument("--inversion-steps", type=int, default=20, help="ddpm: DiffGuard's inversion depth")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models-dir", default="", help="save each fitted detector here (detector.save) and, on a "
                        "rerun, load it instead of training again")
    parser.add_argument("--out", default="benchmarks/results/generative_cifar10.json")
    args = parser.parse_args()

    bench = cifar_bench()
    train = subsample(bench.train, args.train)[0]
    test = subsample(bench.test, args.per_set)[0]
    ood = {f"{group}/{name}": subsample(split, args.per_set)[0] for group, sets in bench.ood.items()
           for name, split in sets.items()}
    settings = dict(hidden=args.hidden, blocks=args.blocks, epochs=args.epochs, device=args.device)
    rows, fits = [], {}
    start = time.perf_counter()
    detectors = _saved_detectors(args.models_dir, args.model) if args.models_dir else None
    if detectors is None:
        detectors = _detectors(args.model, settings, train, args)  # the shared models train once, on the first fit
        if args.models_dir:
            _save_detectors(args.models_dir, args.model, detectors)
    fits["all"] = time.perf_counter() - start
    score_seconds: dict[str, dict[str, float]] = {}

    def scores_of(set_name: str, images) -> dict[str, np.ndarray]:
        out = {}
        for name, detector in detectors.items():
            began = time.perf_counter()
            out.update(detector.rows(images) if hasattr(detector, "rows") else {name: detector.score(images)})
            score_seconds.setdefault(name, {})[set_name] = time.perf_counter() - began
        return out

    scores = {"id_test": scores_of("id_test", test), **{name: scores_of(name, images) for name, images in ood.items()}}
    row_names = list(scores["id_test"])
    for name in row_names:
        for set_name in ood:
            values = percent_metrics(scores["id_test"][name], scores[set_name][name])
            rows.append({"detector": name, "dataset": set_name, "auroc": values["auroc"], "fpr95": values["fpr95"]})
        print(name, {r["dataset"]: round(r["auroc"], 2) for r in rows if r["detector"] == name}, flush=True)
    first = next(iter(detectors.values()))
    bpd = {}
    if args.model in PUBLISHED_BPD:  # bits/dim: the NLL, or the HVAE's importance-weighted ELBO
        bpd = {name: float(np.mean(by_row[row_names[0]])) for name, by_row in scores.items()}
    if args.model == "ddpm":  # the DDPM's simple loss per set (not a likelihood; Ho et al. Table 2 for bits/dim)
        lmd = detectors["lmd"]
        bpd = {"simple_loss": {"id_test": float(np.mean(lmd.diffusion_loss(test))),
                               **{name: float(np.mean(lmd.diffusion_loss(images))) for name, images in ood.items()}}}
    result = {"args": vars(args), "rows": rows, "fit_seconds": fits, "score_seconds": score_seconds,
              "bits_per_dim": bpd,
              "training": first.training_, "published_bpd": PUBLISHED_BPD.get(args.model, {})}
    if "likelihood_ratio" in detectors:
        result["background_training"] = detectors["likelihood_ratio"].background_training_
    write_json(args.out, result)
    sets = list(ood)
    print("| score | " + " | ".join(f"{s} AUROC / FPR95" for s in sets) + " |")
    print("|---|" + "---|" * len(sets))
    for name in row_names:
        cells = {r["dataset"]: r for r in rows if r["detector"] == name}
        print(f"| {name} | " + " | ".join(f"{cells[s]['auroc']:.2f} / {cells[s]['fpr95']:.2f}" for s in sets) + " |")
    print("bits/dim (ddpm: simple loss):", bpd, "training per epoch:", first.training_, "fit seconds:", fits,
          "score seconds:", score_seconds)


if __name__ == "__main__":
    main()
