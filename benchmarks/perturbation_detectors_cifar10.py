"""ODIN and AdaSCALE on the full CIFAR-10 benchmark: paper defaults and tuned, resumable.

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/perturbation_detectors_cifar10.py \
        --model cifar10_resnet20 --method odin [--n 0] [--work oodscope-results/perturbation]

Both detectors re-run the network (ODIN: forward, backward, forward per batch; AdaSCALE: the same for its
feature shift), so unlike the other rows of the logit and shaping tables they cannot be computed from cached
outputs. This script runs one
(model, method) pair:

* ``default``: the detector with its paper defaults (``oodscope.create(method)``), fitted on the ID ``train``
  split, scored on the ID ``test`` split and every OOD test set.
* ``tuned``: the detector's own ``grid`` searched with :func:`oodscope.tune` on CIFAR-10 ``val`` (ID) vs
  ``ood_val/tin`` (TIN val), fitted on ``train``; the best mean AUROC wins (``tune``'s rule: first best in grid
  order). Then evaluated like ``default``.

``--n 0`` (default) uses every sample of every test set; ``--n N`` a fixed seeded subsample of ``N`` per test set
(``numpy.random.default_rng(i)`` permutation, ``i`` the set's position in ID test, cifar100, tin, mnist,
textures; sets smaller than ``N`` are used whole). Validation sets are always used whole.

**Resumable.** Everything finished is saved atomically (:func:`oodscope.safeio.write_atomic`) under
``--work/<model>/<method>/``: per test set the scores of each setting (``scores/<setting>/<set>.npy``) and, for
tuning, one JSON row per grid setting (``tune/<setting>.json``, from ``tune`` called on that one setting), so an
interrupted run redoes at most one set or one setting. For AdaSCALE the expensive part, the penultimate features
of each input and of its perturbation, does not depend on the grid's parameters (``min_percentile``,
``max_percentile``): it is computed once per input array and kept in ``feats/<sha1 of inputs>.npz``; every
grid setting then reuses it (identical numbers, the re-run is deterministic). Prints the table rows in the format
of ``benchmarks/logit_detectors_cifar10.md`` and ``benchmarks/shaping_detectors_cifar10.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import oodscope
import oodscope.detectors.adascale as adascale_module
from benchmarks.common import OOD_SETS, auroc_fpr, cifar_outputs, fmt_params, group_means, pair, subsample_outputs
from oodscope.extraction.outputs import ModelSource, Outputs
from oodscope.metrics import auroc, fpr95
from oodscope.safeio import write_atomic
from oodscope.tuning import tune


def log(message: str) -> None:
    load = os.getloadavg()
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC, load {load[0]:.2f} {load[1]:.2f}] {message}",
          flush=True)


def atomic_save(path: Path, write) -> None:
    """``write(handle)`` into memory, then the bytes to ``path`` atomically (the folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    write(buffer)
    write_atomic(path, buffer.getvalue())


def setting_key(params: dict) -> str:
    return "_".join(f"{k}={params[k]:g}" if isinstance(params[k], float) else f"{k}={params[k]}"
                    for k in sorted(params)) or "defaults"


def subsample(out: Outputs, n: int, seed: int) -> Outputs:
    return subsample_outputs(out, n, seed)


def cache_adascale_features(directory: Path) -> None:
    """Memoise AdaSCALE's re-run (features and perturbed features) on disk, keyed by the inputs' content."""
    compute = adascale_module.perturbed_features

    def cached(source: ModelSource, pixel_fraction: float, step: float, who: str):
        inputs = np.ascontiguousarray(source.inputs)
        digest = hashlib.sha1(inputs.tobytes()).hexdigest()[:20]
        path = directory / f"{digest}_{inputs.shape[0]}_pf={pixel_fraction:g}_step={step:g}.npz"
        if path.exists():
            with np.load(path) as saved:
                return saved["z"], saved["moved"]
        start = time.perf_counter()
        z, moved = compute(source, pixel_fraction, step, who)
        atomic_save(path, lambda handle: np.savez(handle, z=z, moved=moved))
        log(f"    re-ran the network on {inputs.shape[0]} inputs in {time.perf_counter() - start:.1f} s")
        return z, moved

    adascale_module.perturbed_features = cached


def odin_epsilon_scores(outputs: Outputs, temperature: float, epsilons: list[float]) -> np.ndarray:
    """ODIN scores ``(N, len(epsilons))`` at one temperature with one gradient per batch shared by every epsilon.

    The same computation as ``oodscope.create("odin", temperature=T, epsilon=eps).score`` (Eq. 2: the sign of the
    gradient of ``log S_y^(x; T)`` does not depend on ``eps``, only the step length ``eps / std`` does), so a
    temperature costs one forward + backward and one forward per epsilon instead of both per setting.
    """
    from oodscope.extraction.outputs import Need
    from oodscope.extraction.rerun import rerun

    source = outputs.get(Need.MODEL, who="odin")
    unit = oodscope.create("odin", temperature=temperature, epsilon=1.0)

    def score_batch(batch: torch.Tensor, probe) -> torch.Tensor:
        per_unit = unit.perturbation_step(source, batch)  # 1 / std per channel (epsilon = 1)
        x = batch.detach().requires_grad_(True)
        with torch.enable_grad():
            value = torch.log_softmax(probe(x)["logits"] / temperature, dim=1).max(dim=1).values.sum()
            (gradient,) = torch.autograd.grad(value, x)
        direction = gradient.sign()
        columns = []
        with torch.no_grad():
            for eps in epsilons:
                logits = probe((batch + (eps * per_unit) * direction).detach())["logits"]
                columns.append(-torch.softmax(logits.double() / temperature, dim=1).max(dim=1).values)
        return torch.stack(columns, dim=1)

    return rerun(source, score_batch)


def odin_rows_shared_gradient(grid: dict, val: Outputs, ood_val: Outputs, work: Path) -> None:
    """Tuning rows of every ODIN setting not yet saved, computed with :func:`odin_epsilon_scores`."""
    for temperature in grid["temperature"]:
        todo = [e for e in grid["epsilon"] if e > 0 and not (work / "tune" / (setting_key(
            {"temperature": temperature, "epsilon": e}) + ".json")).exists()]
        if not todo:
            continue
        start = time.perf_counter()
        id_scores, ood_scores = (odin_epsilon_scores(o, temperature, todo) for o in (val, ood_val))
        for j, eps in enumerate(todo):
            params = {"temperature": temperature, "epsilon": eps}
            row = {"params": params, "auroc": 100 * auroc(id_scores[:, j], ood_scores[:, j]),
                   "fpr95": 100 * fpr95(id_scores[:, j], ood_scores[:, j]), "error": None,
                   "seconds": (time.perf_counter() - start) / len(todo), "shared_gradient": True}
            path = work / "tune" / f"{setting_key(params)}.json"
            atomic_save(path, lambda handle: handle.write(json.dumps(row).encode()))
        log(f"  tune T={temperature:g}, {len(todo)} epsilons (shared gradient): "
            f"{time.perf_counter() - start:.1f} s")


def tuned_params(method: str, val: Outputs, ood_val: Outputs, train: Outputs, work: Path) -> tuple[dict, list]:
    """``oodscope.tune`` over the detector's grid, one setting per call so that each finished row is kept.

    ODIN: every ``epsilon = 0`` setting (cached logits) goes through ``oodscope.tune``; the others are computed with
    one shared gradient per temperature (:func:`odin_rows_shared_gradient`, the same scores: compared with
    ``ODIN.score`` on 64 val images first, printed). The winner is picked by ``tune``'s rule.
    """
    grid = oodscope.detectors.get(method).grid
    rows = []
    if method == "odin":
        check = subsample(val, 64, 0)  # the shared-gradient path reproduces ODIN.score exactly (checked here)
        fast = odin_epsilon_scores(check, 1000.0, [0.0014])[:, 0]
        exact = oodscope.create("odin", temperature=1000.0, epsilon=0.0014).fit(check).score(check)
        log(f"  check on 64 val images: max |shared-gradient - ODIN.score| = {np.abs(fast - exact).max():.3g}")
        odin_rows_shared_gradient(grid, val, ood_val, work)
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        path = work / "tune" / f"{setting_key(params)}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
            continue
        start = time.perf_counter()
        result = tune(method, {k: [v] for k, v in params.items()}, val, {"tin_val": ood_val}, train=train)
        row = {"params": params, "auroc": result.table[0]["auroc"], "fpr95": result.table[0]["fpr95"],
               "error": result.table[0]["error"], "seconds": time.perf_counter() - start}
        atomic_save(path, lambda handle: handle.write(json.dumps(row).encode()))
        log(f"  tune {setting_key(params)}: val AUROC {row['auroc']:.2f} ({row['seconds']:.1f} s)")
        rows.append(row)
    valid = [r for r in rows if r["error"] is None and np.isfinite(r["auroc"])]
    best = max(valid, key=lambda r: r["auroc"])  # max keeps the first of equal values, as tune does
    return best["params"], rows


def scores_for(detector, data: dict[str, Outputs], work: Path, label: str) -> dict[str, np.ndarray]:
    result = {}
    for name, outputs in data.items():
        path = work / "scores" / label / f"{name.replace('/', '-')}.npy"
        if path.exists():
            result[name] = np.load(path)
            continue
        start = time.perf_counter()
        result[name] = detector.score(outputs)
        atomic_save(path, lambda handle: np.save(handle, result[name]))
        log(f"  {label} {name}: {len(outputs)} samples scored in {time.perf_counter() - start:.1f} s")
    return result


def row(method: str, setting: str, params: dict, scores: dict[str, np.ndarray]) -> str:
    metrics = {s: auroc_fpr(scores["test"], scores[s]) for s in OOD_SETS}
    means = group_means(metrics)
    cells = [pair(metrics[s]) for s in OOD_SETS] + [pair(means["near"]), pair(means["far"])]
    return f"| {method} | {setting} | {fmt_params(params)} | " + " | ".join(cells) + " |"


def report(work: Path, method: str) -> None:
    """Rows from saved files only (for a run that is still going or was stopped)."""
    names = ["test", *OOD_SETS]
    rows = [json.loads(p.read_text()) for p in sorted((work / "tune").glob("*.json"))]
    valid = [r for r in rows if r["error"] is None]
    grid = oodscope.detectors.get(method).grid
    order = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    valid.sort(key=lambda r: order.index({k: type(grid[k][0])(v) for k, v in r["params"].items()}))
    best = max(valid, key=lambda r: r["auroc"]) if valid else None
    print(f"{work}: {len(rows)} of {len(order)} tuning rows saved; best so far "
          f"{best['params'] if best else None} (val AUROC {best['auroc'] if best else float('nan'):.2f})")
    for r in valid:
        print(f"    tune {setting_key(r['params'])}: AUROC {r['auroc']:.2f} FPR@95 {r['fpr95']:.2f}"
              + (f" (shared-gradient check {r['shared_gradient_auroc']:.2f})" if "shared_gradient_auroc" in r else ""))
    for directory in sorted((work / "scores").glob("*")):
        files = {n: directory / f"{n.replace('/', '-')}.npy" for n in names}
        if all(f.exists() for f in files.values()):
            scores = {n: np.load(f) for n, f in files.items()}
            print(row(method, directory.name, {}, scores) + f"  (sizes {[len(v) for v in scores.values()]})")
        else:
            print(f"| {method} | {directory.name} | incomplete: {[n for n, f in files.items() if f.exists()]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10_resnet20")
    parser.add_argument("--method", choices=["odin", "adascale"], required=True)
    parser.add_argument("--n", type=int, default=0, help="samples per test set (0 = all)")
    parser.add_argument("--work", default="oodscope-results/perturbation")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--report", action="store_true",
                        help="compute nothing: print the rows of every setting whose test-set scores are all saved, "
                             "and the tuning rows saved so far")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    work = Path(args.work) / args.model / args.method
    if args.n:
        work = work / f"n={args.n}"
    if args.report:
        report(work, args.method)
        return
    if args.method == "adascale":
        cache_adascale_features(work / "feats")

    log(f"{args.model} {args.method}, n={args.n or 'all'}")
    out, _, _ = cifar_outputs(args.model, args.cache_dir, device="cpu")
    test_sets = {name: subsample(out[name], args.n, seed) for seed, name in enumerate(["test", *OOD_SETS])}
    size = {name: len(o) for name, o in test_sets.items()}
    log(f"test set sizes {size}")

    start = time.perf_counter()
    default = oodscope.create(args.method).fit(out["train"])
    defaults = {k: v for k, v in default.get_params().items() if k in default.grid}
    rows = [row(args.method, "default", default.get_params(),
                scores_for(default, test_sets, work, setting_key(defaults)))]
    log(f"default done in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    best, table = tuned_params(args.method, out["val"], out["ood_val/tin"], out["train"], work)
    log(f"tuning ({len(table)} settings) done in {time.perf_counter() - start:.1f} s: best {best}")
    start = time.perf_counter()
    tuned = oodscope.create(args.method, **best).fit(out["train"])
    rows.append(row(args.method, "tuned", best, scores_for(tuned, test_sets, work, setting_key(best))))
    log(f"tuned done in {time.perf_counter() - start:.1f} s")

    n_label = "all" if not args.n else f"n={args.n} per set (textures {size['far/textures']})"
    print(f"\n{args.model}, {args.method}, test sets: {n_label}; AUROC / FPR@95 (%)")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
