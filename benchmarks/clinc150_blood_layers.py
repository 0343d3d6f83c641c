"""BLOOD per transition on the whole-model fine-tuned MiniLM of ``oodscope bench clinc150-ftfull`` (CLINC150 full).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/clinc150_blood_layers.py --cache-dir CACHE

Runs ``blood.layer_scores`` (the paper's unbiased estimate of ``||J_l||_F^2`` for each pair of consecutive blocks,
``n_estimators`` = 50 as in the paper) once on the in-scope test split and on ``oos_test``, all texts, and prints the
AUROC / FPR@95 of every transition, of BLOOD_M (their mean) and of BLOOD_L (the last one). The fine-tuned weights
come from the cache of ``oodscope bench clinc150-ftfull`` (trained there, resumably, if missing: ~1.3 h on one
core). Writes ``<out>/clinc150_blood_ftfull.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--n-estimators", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import oodscope
    from oodscope.data.builtin import BenchRequest, prepare
    from oodscope.metrics import ood_metrics
    from oodscope.runner import extract_benchmark

    prepared = prepare(BenchRequest(benchmark="clinc150-ftfull", data_root=args.data_root, cache_dir=args.cache_dir))
    outputs = extract_benchmark(prepared.bench, prepared.model, prepared.preprocess, cache_dir=args.cache_dir,
                                progress=False)
    blood = oodscope.create("blood", n_estimators=args.n_estimators).fit(outputs["train"])
    start = time.perf_counter()
    per_layer = {name: blood.layer_scores(outputs[name]) for name in ("test", "oos/oos_test")}
    seconds = time.perf_counter() - start
    id_scores, oos_scores = per_layer["test"], per_layer["oos/oos_test"]
    columns = {f"transition {k + 1}->{k + 2}": k for k in range(id_scores.shape[1])}
    rows = {name: (id_scores[:, k], oos_scores[:, k]) for name, k in columns.items()}
    rows["BLOOD_M (mean)"] = (id_scores.mean(axis=1), oos_scores.mean(axis=1))
    rows["BLOOD_L (last)"] = (id_scores[:, -1], oos_scores[:, -1])
    table = {}
    print(f"{len(id_scores)} in-scope test + {len(oos_scores)} oos_test texts, M = {args.n_estimators}, "
          f"{seconds:.0f} s")
    for name, (ins, oos) in rows.items():
        m = ood_metrics(ins, oos)
        table[name] = {k: float(m[k]) for k in ("auroc", "fpr95", "aupr_in", "aupr_out")}
        table[name]["mean_in_scope"] = float(np.mean(ins))
        table[name]["mean_oos"] = float(np.mean(oos))
        print(f"{name:<20} AUROC {100 * m['auroc']:6.2f}  FPR@95 {100 * m['fpr95']:6.2f}  "
              f"mean ||J||^2 in-scope {np.mean(ins):9.2f}  out-of-scope {np.mean(oos):9.2f}")
    write_json(Path(args.out) / "clinc150_blood_ftfull.json", {"seconds": seconds, "table": table})


if __name__ == "__main__":
    main()
