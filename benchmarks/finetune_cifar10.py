"""Training-time OOD on the shared CIFAR-10 bench: fine-tune ResNet-20 with each objective and a CE control.

Every method starts from the shared pretrained ``cifar10_resnet20`` and runs the same CPU schedule (same ID data
order, augmentation draws and outlier draws for a seed): SGD with Nesterov momentum, lr 0.001, cosine to 0,
weight decay 5e-4, ID batch 128 + outlier batch 256 (OE's released recipe, shortened to ``--epochs`` x
``--max-steps``). Outliers: ``tin_aux_train.npz`` (10k Tiny ImageNet train images of the 20 ``val_tin`` classes,
class-disjoint from every test set). The control is the same schedule with plain cross-entropy, so a method's
gain over it is the method's, not the extra fine-tuning's. The fine-tuned model goes through ``oodscope.extract``
and is scored with MSP, energy and KNN (each method's own score is marked) on a fixed random subsample of each
test set (``--per-set``; the whole set with ``--per-set 0``).

``--shifted gaussian_noise:5`` (the default) also measures every model's accuracy on a covariate-shifted copy of the
ID test subsample (``oodscope.data.corruptions``; SCONE's OOD generalisation, the same corruption as its wild
data); ``--shifted none`` skips it. ``--split spurious`` fine-tunes and tests on the spurious-correlation split of
``oodscope.data.spurious`` (a class-coloured frame in 90 % of the training images, random in the test set; OOD
groups ``spurious`` / ``non-spurious``) instead of the conventional bench.

Throughput: the engine's images/s against a bare PyTorch loop doing the same steps (forward on the 384-image
batch, the OE loss, SGD step) on the same batches, measured in one run.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/finetune_cifar10.py --epochs 1 --max-steps 40 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import cifar_bench, cifar_bench_dir, cifar_weights, write_json
from oodscope.commands.train_bench import summary_columns
from oodscope.models.cifar_resnet import cifar_preprocess, load_cifar_resnet
from oodscope.data.benchmark import Split
from oodscope.data.corruptions import corrupt
from oodscope.data.spurious import spurious_benchmark
from oodscope.results_io import format_table
from oodscope.safeio import load_npz
from oodscope.training import augment
from oodscope.training.compare import DETECTORS, compare, evaluate_model, summarise
METHODS = ("cross_entropy", "oe", "energy_oe", "logitnorm", "mixoe", "dos", "mos", "abet", "ish")


def bare_loop_images_per_second(model, preprocess, images, outliers, steps: int, seed: int = 0) -> float:
    """The same steps without the engine: augment 128 ID + 256 outlier images, forward, OE loss, SGD step."""
    import copy

    import torch
    from torch.nn import functional as F

    model = copy.deepcopy(model).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, nesterov=True, weight_decay=5e-4)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    started, seen = time.perf_counter(), 0
    for _ in range(steps):
        i, o = rng.integers(0, len(images[0]), 128), rng.integers(0, len(outliers), 256)
        x = augment(torch.from_numpy(np.concatenate([images[0][i], outliers[o]])), generator)
        logits = model(preprocess(x))
        loss = F.cross_entropy(logits[:128], torch.from_numpy(images[1][i])) - 0.5 * (
            logits[128:].log_softmax(1).mean(1).mean())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        seen += 128
    return seen / (time.perf_counter() - started)


def throughput(model, preprocess, train, outliers, steps: int) -> dict[str, float]:
    """The engine's and the bare loop's training images/s on ``steps`` OE steps each, measured back to back."""
    from oodscope.training import finetune

    _, history = finetune(model, train, "oe", outliers, epochs=1, max_steps=steps, preprocess=preprocess,
                          progress=False)
    bare = bare_loop_images_per_second(model, preprocess, train, outliers, steps)
    return {"steps": steps, "engine_img_per_s": history.images_per_second, "bare_loop_img_per_s": bare,
            "ratio": history.images_per_second / bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=40, help="steps per epoch (79 = every ID image once)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--per-set", type=int, default=2000, help="test images per set (0: all)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "oodscope-finetune"))
    parser.add_argument("--out", default="benchmarks/results/finetune_cifar10.json")
    parser.add_argument("--throughput-only", action="store_true", help="only the engine vs bare-loop timing")
    parser.add_argument("--shifted", default="gaussian_noise:5",
                        help="CORRUPTION:SEVERITY of the covariate-shifted ID test copy, or 'none'")
    parser.add_argument("--split", default="conventional", choices=["conventional", "spurious"],
                        help="the conventional CIFAR-10 bench or its spurious-correlation split")
    parser.add_argument("--skip-throughput", action="store_true", help="skip the engine vs bare-loop timing")
    args = parser.parse_args()

    bench = cifar_bench()
    if args.split == "spurious":
        bench = spurious_benchmark(bench, correlation=0.9)
    shifted = None
    if args.shifted != "none":
        name, severity = args.shifted.split(":")
        shifted = Split(corrupt(bench.test.inputs, name, int(severity), seed=0), bench.test.labels)
    outliers = load_npz(cifar_bench_dir() / "tin_aux_train.npz", ["images"])["images"]
    preprocess = cifar_preprocess("cifar10_resnet20")
    base = load_cifar_resnet("cifar10_resnet20", cifar_weights("cifar10_resnet20"))
    cache = Path(args.cache_dir)
    ratio = None if args.skip_throughput else throughput(base, preprocess, (bench.train.inputs, bench.train.labels),
                                                         outliers, args.max_steps)
    print(f"throughput (OE steps, back to back): {ratio}", flush=True)
    if args.throughput_only:
        return
    pretrained = {"method": "pretrained (no fine-tuning)", "seeds": 1,
                  **evaluate_model(base, preprocess, bench, per_set=args.per_set, cache_dir=cache, shifted=shifted)}
    rows = compare(base, preprocess, bench, args.methods.split(","), outliers,
                   seeds=[int(s) for s in args.seeds.split(",")], per_set=args.per_set, cache_dir=cache,
                   checkpoint_dir=cache / (f"{args.epochs}x{args.max_steps}" + ("-spurious" if args.split == "spurious"
                                                                                else "")),
                   log=lambda r: print(r, flush=True), shifted=shifted,
                   epochs=args.epochs, max_steps=args.max_steps, progress=False)
    summary = summarise(rows)
    write_json(args.out, {"args": vars(args), "pretrained": pretrained, "rows": rows, "summary": summary,
                          "throughput": ratio})
    no_std = {k: v for k, v in pretrained.items()} | {f"{k}_std": 0.0 for k, v in pretrained.items()
                                                      if isinstance(v, float)}
    columns = summary_columns(list(DETECTORS), list(bench.ood))
    if shifted is not None:  # OOD generalisation next to the ID accuracy
        columns.insert(3, ("shifted acc", lambda r: f"{r['shifted_accuracy']:.2f} ± {r['shifted_accuracy_std']:.2f}",
                           ""))
    print(format_table([no_std] + summary, columns))


if __name__ == "__main__":
    main()
