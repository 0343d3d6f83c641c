"""CLINC150 out-of-scope detection with all-MiniLM-L6-v2: BLOOD and attention-head masking vs the post-hoc
detectors, on a class-balanced subset (the full-data leaderboard of the post-hoc detectors is
``oodscope bench clinc150``; BLOOD and AHM re-run the transformer, which 2 CPU cores make slow).

    PYTHONPATH=. python benchmarks/clinc150_text.py [--finetune-layers 1]

Prints: extraction time (first run) and cache-read time (second run), ID accuracy, nearest-centroid accuracy,
and AUROC / FPR@95 / AUPR-Out per detector on ID test vs out-of-scope test.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--per-class-train", type=int, default=20)
    parser.add_argument("--per-class-eval", type=int, default=4)
    parser.add_argument("--n-oos", type=int, default=200)
    parser.add_argument("--finetune-layers", type=int, default=0, help="0: frozen encoder + linear head")
    parser.add_argument("--detectors", default="msp,energy,knn,mahalanobis,vim,cos_centroid,ahm")
    parser.add_argument("--blood-estimators", type=int, default=50, help="0: skip BLOOD")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import oodscope
    from oodscope.data.builtin import BenchRequest
    from oodscope.data.clinc150 import prepare, prepare_finetuned

    start = time.perf_counter()
    request = BenchRequest(benchmark="clinc150", data_root=args.data_root, cache_dir=args.cache_dir, seed=args.seed,
                           options={"per_class": args.per_class_train, "per_class_eval": args.per_class_eval,
                                    "n_oos": args.n_oos, "finetune_layers": args.finetune_layers})
    prepared = prepare_finetuned(request) if args.finetune_layers else prepare(request)
    bench, model = prepared.bench, prepared.model
    print(f"model {prepared.model_name}: train {len(bench.train)}, test {len(bench.test)}, "
          f"oos_test {len(bench.ood['oos']['oos_test'])}; prepare {time.perf_counter() - start:.1f} s")
    splits = {"train": bench.train, "test": bench.test, "oos_test": bench.ood["oos"]["oos_test"]}

    def extract_all():
        return {name: oodscope.extract(model, (s.inputs, s.labels), name=f"{bench.name}-sub-{name}",
                                       cache_dir=args.cache_dir, progress=False) for name, s in splits.items()}

    t0 = time.perf_counter()
    outputs = extract_all()
    t1 = time.perf_counter()
    outputs = extract_all()
    t2 = time.perf_counter()
    print(f"extraction (first call) {t1 - t0:.1f} s, second call (cache) {t2 - t1:.2f} s")
    for name, out in outputs.items():
        out.name = name
    print(f"ID accuracy (linear head): {100 * np.mean(outputs['test'].logits.argmax(1) == outputs['test'].labels):.2f} %")
    centroid = oodscope.create("cos_centroid").fit(outputs["train"])
    print(f"ID accuracy (nearest cosine centroid): "
          f"{100 * np.mean(centroid.predict_class(outputs['test']) == outputs['test'].labels):.2f} %")
    detectors = {}
    for spec in args.detectors.split(","):  # "name" or "name:param=value"
        name, _, param = spec.partition(":")
        params = dict([param.split("=")]) if param else {}
        if name == "knn":
            params["k"] = min(50, len(bench.train))
        detectors[spec] = oodscope.create(name, **params)
    for name, det in detectors.items():
        t = time.perf_counter()
        det.fit(outputs["train"])
        print(f"fit {name}: {time.perf_counter() - t:.1f} s", flush=True)
    results = oodscope.evaluate(detectors, outputs["test"], {"oos": {"oos_test": outputs["oos_test"]}})
    print(results.leaderboard())
    if args.blood_estimators:  # BLOOD_M and BLOOD_L from one pass of per-layer estimates
        from oodscope.metrics import ood_metrics

        blood = oodscope.create("blood", n_estimators=args.blood_estimators).fit(outputs["train"])
        t = time.perf_counter()
        id_layers, ood_layers = blood.layer_scores(outputs["test"]), blood.layer_scores(outputs["oos_test"])
        print(f"blood ({args.blood_estimators} draws): {time.perf_counter() - t:.1f} s for "
              f"{len(id_layers) + len(ood_layers)} texts; mean ||J_l||_F^2 per transition ID "
              f"{np.round(id_layers.mean(0), 2).tolist()} OOS {np.round(ood_layers.mean(0), 2).tolist()}")
        for label, pick in (("blood (mean)", lambda a: a.mean(1)), ("blood (last)", lambda a: a[:, -1])):
            m = ood_metrics(pick(id_layers), pick(ood_layers))
            print(f"{label:<14}AUROC {100 * m['auroc']:.2f}  FPR@95 {100 * m['fpr95']:.2f}  "
                  f"AUPR-In {100 * m['aupr_in']:.2f}  AUPR-Out {100 * m['aupr_out']:.2f}")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
