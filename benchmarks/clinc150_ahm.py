"""CLINC150: attention head masking (AHM, Constantinou et al. 2024/2026) as the paper defines the mask, on a
fine-tuned all-MiniLM-L6-v2 [CLS] classifier, vs the unmasked Mahalanobis / kNN scores of the same model.

    # the last-block fine-tuned model of benchmarks/clinc150_finetuned.py (cached in <cache>/clinc150-ftcls/)
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/clinc150_ahm.py --model ftcls --cache-dir CACHE
    # the whole-model fine-tuned model of `oodscope bench clinc150-ftfull` (must already be trained and cached)
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/clinc150_ahm.py --model ftfull --cache-dir CACHE

AHM re-runs the whole transformer with the mask on (a mask touches every layer), so on the shared CPUs the
training bank and the validation split are seeded class-balanced subsets (``--train-per-class``,
``--val-per-class``; 0 = all); ``oos_val`` (100), the in-scope test split (4,500) and ``oos_test`` (1,000) are
complete. Steps: (1) the unmasked model: Mahalanobis and kNN (``--knn-k``) on its [CLS] embedding; (2) AHM with the
default mask (``fraction=0.25`` of the heads of every layer, seed 0); (3) ``AttentionHeadMasking.select_mask``:
``--n-masks`` seeded random masks for each p in ``--fractions``, the one with the lowest FPR@95 on val vs
``oos_val`` kept; (4) test metrics of the masks of (2) and (3), Mahalanobis and kNN fitted on the same masked
training bank. Never trains anything. Prints and writes ``<out>/clinc150_ahm_<model>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import log, write_json


def weights_path(model: str, cache_dir: Path, data_path: Path, seed: int) -> Path:
    """Where the trained weights of each model live (the caches of their own recipes; nothing is trained here)."""
    if model == "ftcls":
        return cache_dir / "clinc150-ftcls" / f"last-cls-e3-seed{seed}.pt"
    from oodscope.data.clinc150 import FULL_FINETUNE

    # the key of oodscope.data.clinc150.prepare_full_finetune with its default options (full data)
    settings = dict(FULL_FINETUNE)
    key = hashlib.sha256(data_path.read_bytes() + repr((0, None, None, seed, sorted(settings.items()))).encode())
    return cache_dir / "models" / f"clinc150-minilm-full-cls-v1-seed{seed}-{key.hexdigest()[:16]}.pt"


def balanced(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    if per_class <= 0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("ftcls", "ftfull"), default="ftcls")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--fractions", default="0.1,0.25,0.5")
    parser.add_argument("--n-masks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unmasked-only", action="store_true", help="stop after the unmasked rows")
    parser.add_argument("--knn-k", type=int, default=0,
                        help="k of the kNN rows; 0: 50 scaled by the bank's share of the train split (our choice)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import oodscope
    from oodscope.data.clinc150 import build_benchmark, read_clinc150, resolve_path
    from oodscope.extraction.cache import default_cache_dir
    from oodscope.metrics import ood_metrics
    from oodscope.text.model import TextClassifier, load_encoder

    start = time.perf_counter()
    cache = Path(args.cache_dir or default_cache_dir())
    path = resolve_path(args.data_root, args.cache_dir)
    weights = weights_path(args.model, cache, path, args.seed)
    if not weights.exists():
        sys.exit(f"clinc150_ahm: no trained weights for --model {args.model} at {weights}; train them with their "
                 f"own recipe first (ftcls: benchmarks/clinc150_finetuned.py, ftfull: oodscope bench clinc150-ftfull)")
    tokenizer, encoder = load_encoder()
    bench, _ = build_benchmark(read_clinc150(path), tokenizer)
    model = TextClassifier(encoder, len(bench.class_names), pooling="cls")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    log(f"model {args.model}: {weights}")

    picks = {"train": (bench.train, balanced(bench.train.labels, args.train_per_class, args.seed)),
             "val": (bench.val, balanced(bench.val.labels, args.val_per_class, args.seed + 1)),
             "oos_val": (bench.ood_val["oos_val"], None), "test": (bench.test, None),
             "oos_test": (bench.ood["oos"]["oos_test"], None)}
    outputs = {}
    t = time.perf_counter()
    for name, (split, keep) in picks.items():
        inputs = split.inputs if keep is None else split.inputs[keep]
        labels = None if split.labels is None or name.startswith("oos") else (
            split.labels if keep is None else split.labels[keep])
        order = np.argsort(inputs[:, 1].sum(axis=1), kind="stable")  # length-sorted batches: much less padding
        outputs[name] = oodscope.extract(model, (inputs[order], None if labels is None else labels[order]),
                                         name=name, batch_size=128, use_cache=False, progress=False)
    sizes = {k: len(v) for k, v in outputs.items()}
    results: dict = {"model": args.model, "weights": str(weights), "sizes": sizes, "seed": args.seed,
                     "threads": args.threads, "ood": {}}
    acc = float(np.mean(outputs["test"].logits.argmax(1) == outputs["test"].labels))
    results["id_test_accuracy"] = acc
    log(f"unmasked pass over {sum(sizes.values())} texts: {time.perf_counter() - t:.1f} s; "
        f"ID test accuracy {100 * acc:.2f} %; sizes {sizes}")

    def report(label: str, id_scores: np.ndarray, oos_scores: np.ndarray, **extra) -> None:
        m = {k: 100 * float(v) for k, v in ood_metrics(id_scores, oos_scores).items()}
        results["ood"][label] = {**m, **extra}
        log(f"{label:<58} AUROC {m['auroc']:.2f}  FPR@95 {m['fpr95']:.2f}  AUPR-In {m['aupr_in']:.2f}  "
            f"AUPR-Out {m['aupr_out']:.2f}")

    k = args.knn_k or max(1, round(50 * sizes["train"] / len(bench.train.inputs)))
    results["knn_k"] = k

    def both_distances(label: str, train: np.ndarray, test: np.ndarray, oos: np.ndarray, **extra) -> None:
        for distance in ("mahalanobis", "knn"):
            bank = oodscope.Outputs(features=train, labels=outputs["train"].labels)
            det = oodscope.create(distance, **({"k": k} if distance == "knn" else {})).fit(bank)
            name = distance if distance == "mahalanobis" else f"knn k={k}"
            report(f"{label}, {name}", det.score(test), det.score(oos), **extra)

    both_distances("unmasked", outputs["train"].features, outputs["test"].features, outputs["oos_test"].features)
    plain = oodscope.create("mahalanobis").fit(outputs["train"])  # the selection's yardstick: val vs oos_val
    m = ood_metrics(plain.score(outputs["val"]), plain.score(outputs["oos_val"]))
    results["unmasked_val"] = {k: 100 * float(v) for k, v in m.items()}
    log(f"unmasked, mahalanobis, val vs oos_val: AUROC {100 * m['auroc']:.2f}  FPR@95 {100 * m['fpr95']:.2f}")
    if args.unmasked_only:
        return

    t = time.perf_counter()
    ahm = oodscope.create("ahm").select_mask(outputs["train"], outputs["val"], outputs["oos_val"],
                                             fractions=[float(p) for p in args.fractions.split(",")],
                                             n_masks=args.n_masks, metric="fpr95")
    results["selection"] = [{k: v for k, v in row.items() if k != "heads"} | {"n_masked": sum(map(len, row["heads"].values()))}
                            for row in ahm.selection_]
    results["selection_s"] = time.perf_counter() - t
    for row in results["selection"]:
        log(f"candidate p={row['fraction']:.3g} seed={row['seed']} ({row['n_masked']} heads off): val vs oos_val "
            f"AUROC {row['auroc']:.2f}  FPR@95 {row['fpr95']:.2f}")
    log(f"select_mask: {len(ahm.selection_)} candidates in {results['selection_s']:.1f} s; chosen p={ahm.fraction}, "
        f"seed={ahm.seed}, mask {ahm.head_mask_.tolist()}")
    results["chosen"] = {"fraction": ahm.fraction, "seed": ahm.seed, "head_mask": ahm.head_mask_.tolist()}

    masks = {"AHM default mask (p=0.25 of every layer, seed 0)": oodscope.create("ahm")}
    if (ahm.fraction, ahm.seed) != (0.25, 0):  # else the chosen mask is the default one
        masks[f"AHM mask chosen on val (p={ahm.fraction:.3g}, seed {ahm.seed})"] = ahm
    for label, det in masks.items():
        t = time.perf_counter()
        heads = det.masked_heads(model)
        masked = {name: det.masked_features(outputs[name], heads) for name in ("train", "test", "oos_test")}
        both_distances(label, masked["train"], masked["test"], masked["oos_test"],
                       head_mask=det.head_mask(model).tolist())
        log(f"{label}: masked passes {time.perf_counter() - t:.1f} s")
    results["total_s"] = time.perf_counter() - start
    write_json(Path(args.out) / f"clinc150_ahm_{args.model}.json", results)
    log(f"total {results['total_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
