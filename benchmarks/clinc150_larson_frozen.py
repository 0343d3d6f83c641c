"""Larson et al.'s oos-threshold figures (in-scope accuracy, out-of-scope recall; EMNLP 2019, Table 2) for the
frozen all-MiniLM-L6-v2 + linear head of ``oodscope bench clinc150`` (or, with ``--benchmark clinc150-ftfull``, the
whole-model fine-tuned [CLS] classifier of ``oodscope bench clinc150-ftfull``), from that command's extraction cache.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/clinc150_larson_frozen.py --cache-dir CACHE
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/clinc150_larson_frozen.py --cache-dir CACHE \
        --benchmark clinc150-ftfull

(run ``oodscope bench clinc150 --cache-dir ...`` first, or this extracts every split: ~7 min on 2 free cores).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--benchmark", default="clinc150", choices=["clinc150", "clinc150-ftfull"])
    args = parser.parse_args()

    import oodscope
    from oodscope.data.builtin import BenchRequest, prepare
    from oodscope.data.clinc150 import oos_threshold_metrics
    from oodscope.runner import extract_benchmark

    prepared = prepare(BenchRequest(benchmark=args.benchmark, data_root=args.data_root, cache_dir=args.cache_dir))
    outputs = extract_benchmark(prepared.bench, prepared.model, prepared.preprocess, cache_dir=args.cache_dir,
                                progress=False)
    test, val = outputs["test"], outputs["val"]
    oos_test, oos_val = outputs["oos/oos_test"], outputs["ood_val/oos_val"]
    print(f"ID test accuracy {100 * np.mean(test.logits.argmax(1) == test.labels):.2f} %")
    table = {}
    for name in ("msp", "energy", "maxlogit", "knn", "mahalanobis", "cos_centroid"):
        det = oodscope.create(name).fit(outputs["train"])
        table[name] = oos_threshold_metrics(det.score(val), det.score(oos_val), val.logits.argmax(1) == val.labels,
                                            det.score(test), det.score(oos_test),
                                            test.logits.argmax(1) == test.labels)
        print(f"{name:<13} in-scope accuracy {100 * table[name]['in_scope_accuracy']:.1f}  "
              f"out-of-scope recall {100 * table[name]['oos_recall']:.1f}")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
