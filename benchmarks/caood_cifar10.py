"""Continuously adaptive OOD detection (CAOOD, meta OOD learning) on the shared CIFAR-10 bench: the adaptation
curve of a meta-learned detector against a non-adaptive baseline and a non-meta-learned control.

The pretrained ``cifar10_resnet20`` is frozen up to its last residual block; that block and ``fc`` (the part) are
meta-learned (:mod:`oodscope.training.meta_ood`, first-order MAML on the energy-bounded loss) on tasks built from
the bench's 10k ID training images under synthetic covariate shifts (``--train-families`` x
``--train-severities`` of :mod:`oodscope.data.corruptions`, plus the clean images), each task's OOD = the first
half of ``tin_aux_train.npz`` through the same shift. The control is the same part trained on the same draws
without the inner loop (``meta=False``).

**Test sequence** (``--stages``): each stage is one shift; its ID set = ``--per-set`` ID test images through the
shift, its OOD sets = ``--per-set`` images of each OOD test set (CIFAR-100, TIN: near; MNIST, Textures: far)
through the same shift; the support set = ``--shots`` labelled ID *validation* images and ``--shots`` outliers
from the *second* half of ``tin_aux_train.npz``, both through the stage's shift (never a test image). Each stage
adapts with ``0 .. --steps`` inner steps from the initialisation (or, with ``--carry``, from the previous stage's
adapted weights), ``--draws`` support draws averaged. Rows: ``pretrained`` (no meta-training: step 0 is the
non-adaptive baseline, with MSP and energy), ``control`` and ``meta`` (MOL); AUROC / FPR95 of the energy score
and ID accuracy after each step, per stage and averaged over the stages.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/caood_cifar10.py

writes ``benchmarks/results/caood_cifar10.json`` (``--out``) with the command and settings in ``meta``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import OOD_GROUPS, RESULTS, auroc_fpr, cifar_model, data_path, write_json
from oodscope.training.meta_ood import (LAMBDA, M_IN, M_OUT, Shift, adaptation_curve, build_tasks, clean_margins,
                                        energy_score, meta_train, msp_score, shift_grid, split_cifar_resnet,
                                        support_set)

OOD_FILES = {"cifar100": "cifar100_test.npz", "tin": "tin_test.npz", "mnist": "mnist_test.npz",
             "textures": "textures.npz"}
DEFAULT_STAGES = "gaussian_noise@5,defocus_blur@5,contrast@4,pixelate@5,jpeg@5,gaussian_blur@5"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-families", default="gaussian_noise,gaussian_blur,contrast,jpeg")
    parser.add_argument("--train-severities", default="1,3,5")
    parser.add_argument("--stages", default=DEFAULT_STAGES, help="family@severity, comma-separated ('clean' too)")
    parser.add_argument("--pool", type=int, default=256, help="ID (and outlier) images per meta-training task")
    parser.add_argument("--per-set", type=int, default=500, help="images per evaluation set and stage")
    parser.add_argument("--shots", type=int, default=16, help="k: ID (and outlier) samples of a test support set")
    parser.add_argument("--support-pool", type=int, default=200, help="images per stage that supports are drawn from")
    parser.add_argument("--steps", type=int, default=5, help="adaptation steps at test time (curve 0..steps)")
    parser.add_argument("--draws", type=int, default=3, help="support draws per stage (averaged)")
    parser.add_argument("--carry", action="store_true", help="each stage adapts from the previous stage's weights")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--query", type=int, default=32)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.05)
    parser.add_argument("--clip", type=float, default=1.0, help="global gradient norm of an inner step (0: none)")
    parser.add_argument("--margins", default="clean", help="'clean': m_in / m_out = median energies of the "
                        "pretrained part on the clean task's ID / outliers; 'liu': -25 / -7; or 'M_IN,M_OUT'")
    parser.add_argument("--outer-lr", type=float, default=1e-3)
    parser.add_argument("--second-order", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint-dir", default=None, help="one sub-folder per trained row (resumable)")
    parser.add_argument("--out", default=str(RESULTS / "caood_cifar10.json"))
    return parser.parse_args()


def parse_stages(text: str) -> list[Shift]:
    stages = []
    for item in text.split(","):
        family, _, severity = item.strip().partition("@")
        stages.append(Shift(family, int(severity or 0)))
    return stages


def margins(spec: str, part, clean_task) -> tuple[float, float, float]:
    """``(m_in, m_out, lambda)`` of the loss from ``--margins``."""
    if spec == "clean":
        return (*clean_margins(part, clean_task), LAMBDA)
    if spec == "liu":
        return (M_IN, M_OUT, LAMBDA)
    m_in, m_out = (float(v) for v in spec.split(","))
    return (m_in, m_out, LAMBDA)


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(data_path("cifar10-bench", name), allow_pickle=False)
    return data["images"], data["labels"]


def subset(n_total: int, n: int, seed: int) -> np.ndarray:
    return np.arange(n_total) if n >= n_total else np.sort(np.random.default_rng(seed).choice(n_total, n, False))


def stage_data(encode, stage: Shift, index: int, args, sets: dict, aux_test: np.ndarray) -> tuple:
    """``(support task, evaluation features)`` of one stage: the support pool from the validation images and the
    held-out outliers, the ID test subset and every OOD set through the stage's shift."""
    from oodscope.training.meta_ood import apply_shift

    seed = args.seed + 100 * (index + 1)
    val_x, val_y = sets["val"]
    pool = build_tasks(encode, val_x, val_y, aux_test, [stage], args.support_pool, args.support_pool, seed)[0]
    evaluation = {}
    for offset, (name, (images, _)) in enumerate(sets["eval"].items()):
        rows = subset(len(images), args.per_set, args.seed + offset)
        evaluation[name] = encode(apply_shift(images[rows], stage, seed + offset))
    test_x, test_y = sets["test"]
    rows = subset(len(test_x), args.per_set, args.seed)
    evaluation["id"] = encode(apply_shift(test_x[rows], stage, seed + 99))
    return pool, evaluation, test_y[rows]


def metrics(logits: dict, labels: np.ndarray, score=energy_score) -> dict:
    """Accuracy, AUROC / FPR95 per OOD set and near / far means (percent) of one evaluation."""
    id_scores = score(logits["id"])
    row = {"acc": 100.0 * float((logits["id"].argmax(axis=1) == labels).mean())}
    for name in OOD_FILES:
        row[f"{name}_auroc"], row[f"{name}_fpr95"] = auroc_fpr(id_scores, score(logits[name]))
    for group, names in OOD_GROUPS.items():
        for metric in ("auroc", "fpr95"):
            row[f"{group}_{metric}"] = float(np.mean([row[f"{n}_{metric}"] for n in names]))
    return row


def mean_rows(rows: list[dict]) -> dict:
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}


def curves(part, stages: list, data: list, args, label: str) -> list[dict]:
    """Records for one initialisation: per stage and step, metrics averaged over the support draws."""
    records, carried = [], None
    for stage, (pool, evaluation, labels) in zip(stages, data):
        per_draw = []
        for draw in range(args.draws):
            support = support_set(pool, args.shots, seed=args.seed + draw)
            start = None if carried is None else {k: v.clone().requires_grad_() for k, v in carried.items()}
            curve = adaptation_curve(part, support, evaluation, args.steps, args.inner_lr, params=start,
                                     margins=args.loss_margins, clip=args.clip or None)
            per_draw.append([metrics(entry, labels) for entry in curve])
            if args.carry and draw == 0:
                next_start = curve[-1]["params"]
            if draw == 0 and label == "pretrained":
                msp0 = metrics(curve[0], labels, msp_score)
        if args.carry:
            carried = next_start
        for step in range(args.steps + 1):
            records.append({"init": label, "stage": stage.name, "step": step,
                            **mean_rows([rows[step] for rows in per_draw])})
        if label == "pretrained":
            records.append({"init": "pretrained_msp", "stage": stage.name, "step": 0, **msp0})
    return records


def summary(records: list[dict], steps: int) -> list[dict]:
    out = []
    for init in ("pretrained_msp", "pretrained", "control", "meta"):
        for step in range(steps + 1):
            rows = [r for r in records if r["init"] == init and r["step"] == step]
            if rows:
                keys = ("acc", "near_auroc", "near_fpr95", "far_auroc", "far_fpr95")
                out.append({"init": init, "step": step, **{k: float(np.mean([r[k] for r in rows])) for k in keys}})
    return out


def main() -> None:
    args = arguments()
    import torch

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, preprocess = cifar_model("cifar10_resnet20")
    encode, part = split_cifar_resnet(model.eval(), preprocess, blocks=1, device=args.device)
    train_x, train_y = load("cifar10_train.npz")
    aux, _ = load("tin_aux_train.npz")
    aux_train, aux_test = aux[: len(aux) // 2], aux[len(aux) // 2:]
    sets = {"val": load("cifar10_val.npz"), "test": load("cifar10_test.npz"),
            "eval": {name: load(file) for name, file in OOD_FILES.items()}}
    shifts = shift_grid(args.train_families.split(","), [int(s) for s in args.train_severities.split(",")],
                        clean=True)
    tasks = build_tasks(encode, train_x, train_y, aux_train, shifts, args.pool, args.pool, args.seed)
    stages = parse_stages(args.stages)
    data = [stage_data(encode, stage, i, args, sets, aux_test) for i, stage in enumerate(stages)]
    cached = time.perf_counter() - started
    print(f"features cached: {len(tasks)} tasks, {len(stages)} stages, {cached:.0f} s", flush=True)

    args.loss_margins = margins(args.margins, part, tasks[0])
    print(f"margins m_in / m_out / lambda: {args.loss_margins}", flush=True)
    options = dict(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, meta_batch=args.meta_batch,
                   shots=args.shots, query=args.query, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
                   outer_lr=args.outer_lr, first_order=not args.second_order, seed=args.seed, device=args.device,
                   clip=args.clip or None, m_in=args.loss_margins[0], m_out=args.loss_margins[1])
    trained, seconds, histories = {"pretrained": part}, {}, {}
    for label, meta in (("control", False), ("meta", True)):
        t0 = time.perf_counter()
        folder = None if args.checkpoint_dir is None else Path(args.checkpoint_dir) / label
        trained[label], history = meta_train(part, tasks, meta=meta, checkpoint_dir=folder, **options)
        seconds[label], histories[label] = time.perf_counter() - t0, history.epochs
        print(f"{label}: {seconds[label]:.0f} s, loss {history.epochs[0]['loss']:.3f} -> "
              f"{history.epochs[-1]['loss']:.3f}", flush=True)
    records = []
    for label, trained_part in trained.items():
        records += curves(trained_part, stages, data, args, label)
    table = summary(records, args.steps)
    header = f"{'init':16s} {'step':>4s} {'acc':>6s} {'near AUROC':>10s} {'near FPR':>8s} {'far AUROC':>9s} " \
             f"{'far FPR':>8s}"
    print(header)
    for row in table:
        print(f"{row['init']:16s} {row['step']:4d} {row['acc']:6.2f} {row['near_auroc']:10.2f} "
              f"{row['near_fpr95']:8.2f} {row['far_auroc']:9.2f} {row['far_fpr95']:8.2f}")
    meta_info = {"command": "PYTHONPATH=. OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
                 "model": "cifar10_resnet20 (shared bench weights), frozen up to layer3.2; meta-learned: layer3.2 + fc",
                 "train_shifts": [s.name for s in shifts], "stages": [s.name for s in stages],
                 "held_out_families": sorted({s.family for s in stages} - {s.family for s in shifts}),
                 "score": "energy (-logsumexp); pretrained_msp rows: MSP", "settings": vars(args),
                 "seconds": {"features": cached, **seconds, "total": time.perf_counter() - started},
                 "history": histories, "summary": table}
    write_json(args.out, {"meta": meta_info, "records": records})
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
