"""Speed race: one extraction for every detector vs re-running the network per method.

Run (pytorch-ood 0.4.0 lives in the reference venv)::

    cd <repo> && PYTHONPATH=. python benchmarks/sweep_speed.py

On the CIFAR-10 bench (``../shared/data/cifar10-bench``) with ResNet-20, on a fixed subsample of every set (the
same for all four timings; ``--n-train``, ``--n-eval``), it times

(a) one extraction pass over all sets (train, val, test, OOD val, every OOD set), cache off;
(b) the full oodscope sweep: that extraction again (cache off) + fitting + scoring of every registered detector
    that needs no network re-run (no input gradients) and trains no network of its own
    (``oodscope.available()`` at run time, so detectors merged later are included);
(c) the same detectors run the way OpenOOD v1.5's ``Evaluator`` runs them: a fresh evaluator per method whose
    ``setup`` runs the network over the ID train set (methods that learn from it), then inference runs the
    network over the ID test set and every OOD set. Hyperparameter search (OpenOOD's APS mode, which re-runs
    the network over the validation sets once per configuration) is left out, so (c) is a lower bound;
(d) pytorch-ood 0.4.0's detectors that coincide with oodscope's (MaxSoftmax, EnergyBased, MaxLogit,
    Mahalanobis, KNN, ViM) through their public API: ``fit(train_loader)`` and ``detector(x)`` per batch.

It checks that AUROCs agree where methods coincide ((c) uses oodscope's detectors, so it must be identical;
(d) is an independent implementation in float32) and ends with exactly three lines::

    sweep/extraction: X.XX
    openood-style/sweep: X.XX
    pytorch-ood/sweep: X.XX
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import oodscope
from oodscope.data.spec import load_benchmark_dir
from oodscope.detectors import Detector, create, get
from oodscope.extraction import Need
from oodscope.extraction.extract import extract
from oodscope.metrics import auroc
from oodscope.models.zoo import load_model

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "data" / "cifar10-bench"
RERUN_NEEDS = {Need.MODEL}
PYTORCH_OOD = {"msp": "MaxSoftmax", "energy": "EnergyBased", "maxlogit": "MaxLogit", "mahalanobis": "Mahalanobis",
               "knn": "KNN", "vim": "ViM"}


def sweep_detectors() -> list[str]:
    """Registered OOD detectors that need no network re-run and train no network of their own."""
    return [n for n in oodscope.available() if not (get(n).needs & RERUN_NEEDS) and not get(n).trains_network
            and getattr(get(n), "family", "ood") == "ood"]  # anomaly detectors (tabular) have their own bench


def learns_from_train(detector: Detector) -> bool:
    return type(detector)._fit is not Detector._fit


def subsample(bench, n_train: int, n_eval: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A fixed random subsample (sorted indices) of every set."""
    rng = np.random.default_rng(seed)
    sets = {}
    for name, split in bench.datasets().items():
        size = min(len(split), n_train if name == "train" else n_eval)
        index = np.sort(rng.choice(len(split), size, replace=False))
        sets[name] = (split.inputs[index], split.labels[index])
    return sets


def extract_all(model, pre, sets, layers, batch_size) -> dict:
    outputs = {}
    for name, data in sets.items():
        outputs[name] = extract(model, data, name=name, preprocess=pre, layers=layers, use_cache=False,
                                progress=False, batch_size=batch_size, device="cpu")
        outputs[name].name = name
    return outputs


class Clock:
    """Wall-clock and process CPU seconds of a block (CPU time is steadier on a shared machine)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def eval_names(sets) -> list[str]:
    return [n for n in sets if n not in ("train", "val") and not n.startswith("ood_val/")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", default=str(BENCH))
    parser.add_argument("--weights", default=None, help="default: <bench>/models/cifar10_resnet20.pth")
    parser.add_argument("--n-train", type=int, default=1000, help="ID train images (fixed subsample)")
    parser.add_argument("--n-eval", type=int, default=300, help="images of every other set (fixed subsample)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--parts", default="abcd", help="which timings to run (ratios need a, b and c/d)")
    args = parser.parse_args()
    torch.manual_seed(0)
    bench = load_benchmark_dir(args.bench, check_overlap=False)
    model, pre = load_model("cifar10_resnet20", args.weights or Path(args.bench) / "models" / "cifar10_resnet20.pth")
    sets = subsample(bench, args.n_train, args.n_eval)
    names = sweep_detectors()
    layers = sorted({layer for n in names for layer in create(n).layer_names()})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; sets: "
          + ", ".join(f"{k} {len(v[0])}" for k, v in sets.items()))
    print(f"detectors ({len(names)}): {', '.join(names)}")
    extract_all(model, pre, {"warmup": (sets["val"][0][:args.batch_size], sets["val"][1][:args.batch_size])}, [],
                args.batch_size)

    # (a) one extraction pass over all sets
    with Clock() as clock_a:
        extract_all(model, pre, sets, layers, args.batch_size)
    print(f"(a) one extraction pass: {clock_a.wall:.2f} s (CPU {clock_a.cpu:.2f} s)")

    # (b) the oodscope sweep: one extraction + fit + score every detector
    with Clock() as clock_b:
        outputs = extract_all(model, pre, sets, layers, args.batch_size)
        auroc_b = {}
        failed = []
        for name in names:
            try:
                detector = create(name).fit(outputs["train"])
                id_scores = detector.score(outputs["test"])
                for ood in eval_names(sets)[1:]:
                    auroc_b[name, ood] = auroc(id_scores, detector.score(outputs[ood]))
            except (ValueError, RuntimeError, FloatingPointError) as error:  # e.g. a bank too small for it
                failed.append(name)
                print(f"    {name} left out of every timing: {error}", file=sys.stderr)
    names = [n for n in names if n not in failed]
    print(f"(b) oodscope sweep, {len(names)} detectors: {clock_b.wall:.2f} s (CPU {clock_b.cpu:.2f} s)")

    # (c) OpenOOD-style: the network re-run for every method
    clock_c = openood_style_race(model, pre, sets, names, outputs, auroc_b, args.batch_size) \
        if "c" in args.parts else None

    # (d) pytorch-ood 0.4.0 through its public per-batch API
    clock_d = None
    if "d" in args.parts:
        clock_d, auroc_d = pytorch_ood_race(model, pre, sets, names, args.batch_size)
    if clock_d is not None:
        print(f"(d) pytorch-ood, {len(auroc_d) // max(1, len(eval_names(sets)) - 1)} detectors: "
              f"{clock_d.wall:.2f} s (CPU {clock_d.cpu:.2f} s)")
        print(f"    {'detector':<12}{'set':<16}{'oodscope':>10}{'pytorch-ood':>13}")
        for key in sorted(auroc_d):
            print(f"    {key[0]:<12}{key[1]:<16}{100 * auroc_b[key]:>10.2f}{100 * auroc_d[key]:>13.2f}")
        worst = max(abs(auroc_b[k] - auroc_d[k]) for k in auroc_d)
        print(f"    max |AUROC(b) - AUROC(d)| = {100 * worst:.3f} percentage points")
    ratio = lambda x, y, kind: f"{getattr(x, kind) / getattr(y, kind):.2f}" if x and y else "nan"  # noqa: E731
    print(f"    CPU-time ratios: sweep/extraction {ratio(clock_b, clock_a, 'cpu')}, openood-style/sweep "
          f"{ratio(clock_c, clock_b, 'cpu')}, pytorch-ood/sweep {ratio(clock_d, clock_b, 'cpu')}")
    print(f"sweep/extraction: {ratio(clock_b, clock_a, 'wall')}")
    print(f"openood-style/sweep: {ratio(clock_c, clock_b, 'wall')}")
    print(f"pytorch-ood/sweep: {ratio(clock_d, clock_b, 'wall')}")
    return 0


def openood_style_race(model, pre, sets, names, outputs, auroc_b, batch_size) -> Clock:
    """A fresh run per method: its own pass over the train set (if it learns from it), test and OOD sets."""
    clock = Clock().__enter__()
    auroc_c = {}
    for name in names:
        detector = create(name)
        if learns_from_train(detector):
            detector.fit(extract_all(model, pre, {"train": sets["train"]}, detector.layer_names(),
                                     batch_size)["train"])
        else:  # stateless methods are fitted on a stub (no network run), as OpenOOD's setup does nothing
            detector.fit(outputs["train"])
        scores = {ood: detector.score(out) for ood, out in extract_all(
            model, pre, {n: sets[n] for n in eval_names(sets)}, detector.layer_names(), batch_size).items()}
        for ood in eval_names(sets)[1:]:
            auroc_c[name, ood] = auroc(scores["test"], scores[ood])
    clock.__exit__()
    print(f"(c) OpenOOD-style re-run per method: {clock.wall:.2f} s (CPU {clock.cpu:.2f} s)")
    print(f"    max |AUROC(b) - AUROC(c)| = {max(abs(auroc_b[k] - auroc_c[k]) for k in auroc_b):.2e}")
    return clock


class _Input(nn.Module):
    """uint8 NHWC batches -> the network (logits) or its penultimate features, as pytorch-ood expects."""

    def __init__(self, model, pre, features: bool):
        super().__init__()
        self.model, self.pre, self.features = model, pre, features

    def forward(self, x):
        x = self.pre(x)
        return self.model.forward_features(x) if self.features else self.model(x)


def pytorch_ood_race(model, pre, sets, names, batch_size):
    try:
        import pytorch_ood.detector as pod
    except ImportError:
        print("(d) pytorch-ood is not importable here; run this script with python",
              file=sys.stderr)
        return None, {}
    from torch.utils.data import DataLoader, TensorDataset

    loaders = {n: DataLoader(TensorDataset(torch.as_tensor(x), torch.as_tensor(y)), batch_size=batch_size)
               for n, (x, y) in sets.items()}
    logits_net, encoder = _Input(model, pre, False).eval(), _Input(model, pre, True).eval()
    head = model.fc
    makers = {
        "msp": lambda: pod.MaxSoftmax(logits_net), "energy": lambda: pod.EnergyBased(logits_net),
        "maxlogit": lambda: pod.MaxLogit(logits_net), "mahalanobis": lambda: pod.Mahalanobis(encoder),
        "knn": lambda: pod.KNN(encoder, k=create("knn").k),
        "vim": lambda: pod.ViM(encoder, d=_vim_dim(), w=head.weight.detach(), b=head.bias.detach()),
    }
    clock = Clock().__enter__()
    aurocs = {}
    with torch.no_grad():
        for name in [n for n in PYTORCH_OOD if n in names]:
            detector = makers[name]()
            if getattr(detector, "requires_fit", False) or name in ("mahalanobis", "knn", "vim"):
                detector.to("cpu") if hasattr(detector, "to") else None
                detector.fit(loaders["train"])
            scores = {n: torch.cat([detector(x) for x, _ in loaders[n]]).double().numpy()
                      for n in eval_names(sets)}
            for ood in eval_names(sets)[1:]:
                aurocs[name, ood] = auroc(scores["test"], scores[ood])
    clock.__exit__()
    return clock, aurocs


def _vim_dim() -> int:
    from oodscope.detectors.vim import default_principal_dim

    dim = create("vim").dim
    return dim if dim is not None else default_principal_dim(64)


if __name__ == "__main__":
    sys.exit(main())
