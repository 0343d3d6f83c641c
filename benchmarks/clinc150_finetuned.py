"""CLINC150 on a fine-tuned all-MiniLM-L6-v2 [CLS] classifier: BLOOD and attention-head masking vs
MSP/Energy/MaxLogit/KNN/Mahalanobis, and the out-of-scope figures of Larson et al. (EMNLP 2019), full data.

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/clinc150_finetuned.py --cache-dir CACHE

Model (cheap enough for 2 shared CPU cores): the pre-trained encoder with its last block and a linear head on the
last layer's [CLS] state fine-tuned on the 15,000 in-scope training sentences (BLOOD's setting is a fine-tuned
[CLS] classifier; the paper fine-tunes the whole model, we train the top block: see benchmarks/clinc150_results.md).
Every stage is cached under ``<cache>/clinc150-ftcls/``: the frozen lower-layer token states (per chunk), the
fine-tuning (checkpoint every 50 steps), the features, the BLOOD per-layer estimates; a killed run resumes.
Prints and writes ``<out>/clinc150_finetuned.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import log, write_json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blood-estimators", type=int, default=50)
    parser.add_argument("--stages", default="posthoc,larson,ahm,blood", help="any of these, run in this order")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blood-subset", type=int, default=0,
                        help="score BLOOD on this many texts of each of test / oos_test (seeded), 0: all")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import oodscope
    from oodscope.data.clinc150 import build_benchmark, oos_threshold_metrics, read_clinc150, resolve_path
    from oodscope.extraction.cache import default_cache_dir
    from oodscope.extraction.outputs import ModelSource
    from oodscope.metrics import ood_metrics
    from oodscope.text.finetune import cls_top, finetune_last_cls, lower_states
    from oodscope.text.model import TextClassifier, load_encoder

    start = time.perf_counter()
    path = resolve_path(args.data_root, args.cache_dir)
    tokenizer, encoder = load_encoder()
    bench, _ = build_benchmark(read_clinc150(path), tokenizer)
    model = TextClassifier(encoder, len(bench.class_names), pooling="cls")
    first = len(model.blocks) - 1
    root = Path(args.cache_dir or default_cache_dir()) / "clinc150-ftcls"
    splits = {"train": bench.train, "test": bench.test, "oos_test": bench.ood["oos"]["oos_test"],
              "val": bench.val, "oos_val": bench.ood_val["oos_val"]}
    results: dict = {"setting": {"epochs": args.epochs, "seed": args.seed, "trained": "last block + head",
                                 "pooling": "cls", "threads": args.threads}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "clinc150_finetuned.json").exists():  # a later run with other --stages adds to the earlier results
        results = {**json.loads((out / "clinc150_finetuned.json").read_text()), **results}

    def save() -> None:
        write_json(out / "clinc150_finetuned.json", results)

    chunks = {}
    for name in ("train",):
        t = time.perf_counter()
        chunks[name] = lower_states(model, splits[name].inputs, first, store=root / f"lower-{name}", log=log)
        log(f"lower states {name}: {time.perf_counter() - t:.1f} s")
    weights = root / f"last-cls-e{args.epochs}-seed{args.seed}.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        t = time.perf_counter()
        finetune_last_cls(model, chunks["train"], splits["train"].labels, epochs=args.epochs, seed=args.seed,
                          checkpoint=weights.with_suffix(".ckpt"), log=log)
        torch.save(model.state_dict(), weights.with_suffix(".tmp"))
        weights.with_suffix(".tmp").replace(weights)
        results["finetune_s"] = time.perf_counter() - t
        log(f"fine-tuning: {results['finetune_s']:.1f} s")
    for name in ("test", "oos_test", "val", "oos_val"):
        t = time.perf_counter()
        chunks[name] = lower_states(model, splits[name].inputs, first, store=root / f"lower-{name}", log=log)
        log(f"lower states {name}: {time.perf_counter() - t:.1f} s")

    def top_features(name: str) -> np.ndarray:
        rows = np.zeros((len(splits[name].inputs), model.head.in_features), np.float32)
        with torch.no_grad():
            for index, states, mask in chunks[name]:
                rows[index] = cls_top(model, states, mask).numpy()
        return rows

    outputs = {}
    W = model.head.weight.detach().double().numpy()
    b = model.head.bias.detach().double().numpy()
    for name in splits:
        features = top_features(name)
        outputs[name] = oodscope.Outputs(features=features, logits=features.astype(np.float64) @ W.T + b,
                                         labels=splits[name].labels if name in ("train", "test", "val") else None,
                                         head=oodscope.Head(W, b), name=name)
        outputs[name].source = ModelSource(model=model, inputs=splits[name].inputs, batch_size=64, head="head")
    acc = float(np.mean(outputs["test"].logits.argmax(1) == outputs["test"].labels))
    results["id_test_accuracy"] = acc
    log(f"ID test accuracy {100 * acc:.2f} %")
    save()

    table: dict[str, dict[str, float]] = results.get("ood", {})

    def report(name: str, id_scores: np.ndarray, oos_scores: np.ndarray) -> None:
        m = ood_metrics(id_scores, oos_scores)
        table[name] = {k: float(m[k]) for k in ("auroc", "fpr95", "aupr_in", "aupr_out")}
        log(f"{name:<16} AUROC {100 * m['auroc']:.2f}  FPR@95 {100 * m['fpr95']:.2f}  "
            f"AUPR-In {100 * m['aupr_in']:.2f}  AUPR-Out {100 * m['aupr_out']:.2f}")
        results["ood"] = table
        save()

    scores: dict[str, dict[str, np.ndarray]] = {}
    stages = args.stages.split(",")
    if "posthoc" in stages:
        for name in ("msp", "energy", "maxlogit", "knn", "mahalanobis", "cos_centroid"):
            det = oodscope.create(name).fit(outputs["train"])
            scores[name] = {s: det.score(outputs[s]) for s in ("test", "oos_test", "val", "oos_val")}
            report(name, scores[name]["test"], scores[name]["oos_test"])
    np.savez(out / "clinc150_finetuned_scores.npz", **{f"{k}.{s}": v for k, d in scores.items() for s, v in d.items()})
    if "larson" in stages:
        results["larson"] = {}
        for name, s in scores.items():
            results["larson"][name] = oos_threshold_metrics(
                s["val"], s["oos_val"], outputs["val"].logits.argmax(1) == outputs["val"].labels,
                s["test"], s["oos_test"], outputs["test"].logits.argmax(1) == outputs["test"].labels)
            log(f"larson oos-threshold {name:<12} " + json.dumps(results["larson"][name]))
        save()
    if "ahm" in stages:  # masked heads in the LAST block only (the cached lower states are unmasked); the paper's
        # mask (p of the heads of every layer) re-runs every block: benchmarks/clinc150_ahm.py
        from oodscope.text.model import HeadMask

        chosen, best = None, -1.0
        for fraction in (1 / 12, 0.25, 0.5):
            det = oodscope.create("ahm", fraction=fraction, block=-1)
            heads = det.masked_heads(model)
            with HeadMask(model, heads):
                masked = {name: top_features(name) for name in splits}
            for distance in ("mahalanobis", "knn"):
                d = oodscope.create(distance).fit(oodscope.Outputs(features=masked["train"],
                                                                   labels=outputs["train"].labels))
                val_auroc = float(ood_metrics(d.score(masked["val"]), d.score(masked["oos_val"]))["auroc"])
                label = f"ahm {distance} heads {heads}"
                report(label, d.score(masked["test"]), d.score(masked["oos_test"]))
                table[label]["val_auroc"] = val_auroc
                if val_auroc > best:
                    chosen, best = label, val_auroc
        results["ahm_chosen_on_val"] = chosen
        log(f"AHM configuration chosen on val: {chosen} (val AUROC {100 * best:.2f})")
        save()
    if "blood" in stages:  # through the detector (Need.MODEL: re-runs the network on the scored texts)
        det = oodscope.create("blood", n_estimators=args.blood_estimators)
        layers, tag = {}, f"M={args.blood_estimators}" + (f", {args.blood_subset} per split" if args.blood_subset else "")
        for name in ("test", "oos_test"):
            store = root / f"blood-{name}-e{args.epochs}-M{args.blood_estimators}-n{args.blood_subset}.npy"
            if store.exists():
                layers[name] = np.load(store)
                continue
            t = time.perf_counter()
            det.fit(outputs["train"])
            scored = outputs[name]
            if args.blood_subset and args.blood_subset < len(scored.features):
                keep = np.sort(np.random.default_rng(args.seed).permutation(len(scored.features))[:args.blood_subset])
                scored = oodscope.Outputs(features=scored.features[keep], name=name,
                                          source=ModelSource(model=model, inputs=splits[name].inputs[keep],
                                                             batch_size=64, head="head"))
            layers[name] = det.layer_scores(scored)
            np.save(store, layers[name])
            results[f"blood_s_{name}"] = time.perf_counter() - t
            log(f"blood {name}: {results[f'blood_s_{name}']:.1f} s")
        results[f"blood_mean_per_transition ({tag})"] = {k: v.mean(0).tolist() for k, v in layers.items()}
        report(f"blood_M (mean; {tag})", layers["test"].mean(1), layers["oos_test"].mean(1))
        report(f"blood_L (last; {tag})", layers["test"][:, -1], layers["oos_test"][:, -1])
        for layer in range(layers["test"].shape[1]):
            report(f"blood transition {layer + 1}->{layer + 2} ({tag})", layers["test"][:, layer],
                   layers["oos_test"][:, layer])
    results["total_s"] = time.perf_counter() - start
    save()
    log(f"total {results['total_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
