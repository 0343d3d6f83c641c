"""SAL's filtering step on the shared CIFAR-10 bench: how well the gradient projection finds the planted outliers.

Wild data = the 10,000 unlabelled ID training images mixed with Tiny ImageNet auxiliary outliers
(``tin_aux_train.npz``) at ``pi``; the pretrained ``cifar10_resnet20`` gives the last-layer gradients (predicted
labels), the reference gradient and the 95 % ID threshold come from the labelled ID training images. Prints, per
``pi`` and seed, the number of candidates, their precision and recall against the planted outliers, and the AUROC of
the filtering score for the planted outliers (no training; one forward pass over the wild and ID images).

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/sal_filter_cifar10.py --pis 0.1 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import cifar_bench, cifar_bench_dir, cifar_weights, write_json


def main() -> None:
    from oodscope.extraction.extract import extract
    from oodscope.metrics import auroc
    from oodscope.models.cifar_resnet import cifar_preprocess, load_cifar_resnet
    from oodscope.safeio import load_npz
    from oodscope.training.objectives.sal import filter_candidates, last_layer_gradients, wild_mixture

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pis", default="0.1")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    bench = cifar_bench()
    aux = load_npz(cifar_bench_dir() / "tin_aux_train.npz", ["images"])["images"]
    model = load_cifar_resnet("cifar10_resnet20", cifar_weights("cifar10_resnet20"))
    options = dict(preprocess=cifar_preprocess("cifar10_resnet20"), use_cache=False, progress=False, batch_size=500)
    started = time.perf_counter()
    train = extract(model, (bench.train.inputs, bench.train.labels), **options)
    id_gradients = last_layer_gradients(train.logits, train.features, bench.train.labels)
    rows = []
    for pi in (float(p) for p in args.pis.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            wild, planted = wild_mixture(bench.train.inputs, aux, pi, seed=seed)
            out = extract(model, wild, **options)
            candidates, threshold, scores = filter_candidates(last_layer_gradients(out.logits, out.features),
                                                              id_gradients)
            caught = int((candidates & planted).sum())
            row = {"pi": pi, "seed": seed, "wild": len(wild), "planted": int(planted.sum()),
                   "candidates": int(candidates.sum()), "precision": caught / max(int(candidates.sum()), 1),
                   "recall": caught / int(planted.sum()), "score_auroc": auroc(scores[~planted], scores[planted]),
                   "seconds": time.perf_counter() - started}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        write_json(args.out, rows)


if __name__ == "__main__":
    main()
