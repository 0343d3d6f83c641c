"""``oodscope train BENCH --method oe --outliers FILE``: fine-tune the benchmark's model, then benchmark it.

The model is fine-tuned on the benchmark's ``[id].train`` split with a training objective
(``oodscope detectors --family training``) and, for outlier-exposure methods, the auxiliary outliers of
``--outliers`` (an ``.npz`` with an ``images`` array of the training images' size). The fine-tuned weights are
written to ``OUT/finetuned.pth`` (a state dict; the per-epoch checkpoint in ``OUT/checkpoint`` resumes an
interrupted run), then the usual benchmark runs on the fine-tuned model and writes ``results.json``,
``results.csv`` and ``report.html`` to ``OUT``, the training settings and history in the run metadata.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from .bench import add_bench_arguments

    parser = subparsers.add_parser("train", help="fine-tune the benchmark's model with a training objective, "
                                                 "then run the benchmark on it")
    add_bench_arguments(parser)
    parser.add_argument("--method", required=True, help="training objective, e.g. oe, energy_oe, logitnorm, "
                                                        "cross_entropy (the control)")
    parser.add_argument("--outliers", default=None, help=".npz with an 'images' array of auxiliary outliers")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default 10, as OE)")
    parser.add_argument("--max-steps", type=int, default=None, help="steps per epoch (default: all ID images)")
    parser.add_argument("--lr", type=float, default=0.001, help="SGD learning rate (default 0.001, as OE)")
    parser.add_argument("--train-batch-size", type=int, default=128, help="ID images per step (default 128)")
    parser.add_argument("--train-seed", type=int, default=0, help="seed of data order, augmentation, outliers")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..detectors import get
    from ..extraction.outputs import Need
    from ..training import finetune
    from .bench import prepare_from, run_prepared

    start = time.perf_counter()
    objective = get(args.method)()
    if objective.family != "training":
        raise ValueError(f"--method {args.method!r} is a {objective.family} detector, not a training objective; "
                         "see oodscope detectors --family training")
    outliers = None
    if Need.OUTLIERS in objective.needs:
        if args.outliers is None:
            raise ValueError(f"--method {args.method} needs --outliers FILE.npz (auxiliary outlier images)")
        outliers = _read_outliers(Path(args.outliers))
    prepared = prepare_from(args)
    split = prepared.bench.train
    out = Path(args.out)
    device = "cpu" if args.device == "auto" and not torch.cuda.is_available() else (
        "cuda" if args.device == "auto" else args.device)
    model, history = finetune(prepared.model, (split.inputs, split.labels), objective, outliers,
                              epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                              batch_size=args.train_batch_size, seed=args.train_seed, device=device,
                              preprocess=prepared.preprocess, checkpoint_dir=out / "checkpoint",
                              progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".finetuned.pth.{os.getpid()}.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out / "finetuned.pth")
    print(f"fine-tuned with {objective.label}: {len(history.epochs)} epochs, {sum(history.seconds):.1f} s, "
          f"{history.images_per_second:.1f} img/s; last epoch {history.epochs[-1]}; wrote {out / 'finetuned.pth'}")
    prepared.model = model.eval()
    prepared.model_name = f"{prepared.model_name}+{objective.label}"
    named = [n.strip() for n in args.detectors.split(",")] if args.detectors != "all" else None
    if named is not None and objective.score not in named:  # the paper's own score is always on the leaderboard
        args.detectors = ",".join(named + [objective.score])
    training = {"objective": objective.label, "own_score": objective.score, "epochs": args.epochs,
                "max_steps": args.max_steps, "lr": args.lr, "batch_size": args.train_batch_size,
                "seed": args.train_seed, "outliers": args.outliers, "history": history.epochs,
                "seconds": sum(history.seconds), "images_per_second": history.images_per_second}
    return run_prepared(args, prepared, start, training=training)


def _read_outliers(path: Path):
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data:
                raise ValueError(f"--outliers {path}: no 'images' array (has {sorted(data.files)})")
            return data["images"]
    except FileNotFoundError:
        raise ValueError(f"--outliers {path}: no such file") from None
    except (OSError, ValueError) as error:
        if "--outliers" in str(error):
            raise
        raise ValueError(f"--outliers {path}: not a readable .npz file ({error})") from None
