"""Speed race: one extraction for every detector vs re-running the network per method.

Run (part (d) needs pytorch-ood 0.4.0 in the environment; without it (d) is skipped with a message)::

    cd <repo> && PYTHONPATH=. python benchmarks/sweep_speed.py > benchmarks/results/sweep_speed.log

On the CIFAR-10 bench (``benchmarks/common.py``'s data root) with ResNet-20, on a fixed subsample of every set (the
same for all four timings; ``--n-train`` 1,000 ID train images, ``--n-eval`` 300 of every other set), it times

(a) one extraction pass over all sets (train, val, test, OOD val, every OOD set), cache off;
(b) the full oodscope sweep: that extraction again (cache off) + fitting + scoring of every registered OOD
    detector that needs no network re-run (``Need.MODEL``: input/activation gradients or a modified forward)
    and trains no network of its own (``oodscope.available()`` at run time, so detectors merged later are
    included). The excluded ones are printed with the reason;
(a'), (b') the same pair with ``gram`` added: it has no default layers (they depend on the network), and it
    needs the full feature maps of its layers, so the extraction keeps them (``layer_reduce="none"``);
(c) the same detectors as (b) run the way OpenOOD v1.5's ``Evaluator`` runs them: a fresh evaluator per method
    whose ``setup`` runs the network over the ID train set (methods that learn from it), then inference runs
    the network over the ID test set and every OOD set. Hyperparameter search (OpenOOD's APS mode, which re-runs
    the network over the validation sets once per configuration) is left out, so (c) is a lower bound;
(d) every pytorch-ood 0.4.0 detector that coincides with one in (b) and needs no input gradients (23: see
    ``PYTORCH_OOD``), each used as a pytorch-ood user would: built on the model with oodscope's default
    hyperparameters, ``fit(train_loader)`` where it needs fitting, ``detector(x)`` per batch.

Each pair (a)/(b) and (a')/(b') is timed ``--repeats`` times, alternating (a, b, a, b, ...), and the ratios use
the fastest run of each (as ``timeit`` does: noise on a shared machine only adds time; the first pass of a
process also pays first-touch page faults for its arrays); every run's time is printed. (c) and (d) run once and their
ratios are taken to the fastest (b): they are 10x or more, where a few percent do not change the comparison.

Before the timings, one untimed warm-up pass (extraction + sweep on small slices) does the lazy imports and
first calls, as a process pays them once (pytorch-ood's import is likewise outside (d)). Every stage prints
wall-clock and process CPU seconds and the load average (the machine may be shared: CPU time is steadier).
AUROCs must agree where methods coincide: (c) runs oodscope's own detectors, so it must be identical; (d) is an
independent implementation (float32), compared per method and OOD set within 0.1 AUROC points, except for the
differences explained in ``EXPLAINED`` (printed beside the numbers). The script ends with exactly three lines
of wall-clock ratios::

    sweep/extraction: X.XX
    openood-style/sweep: X.XX
    pytorch-ood/sweep: X.XX
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import oodscope
from benchmarks.common import cifar_bench_dir
from oodscope.data.spec import load_benchmark_dir
from oodscope.detectors import Detector, create, get
from oodscope.extraction import Need
from oodscope.extraction.extract import extract
from oodscope.metrics import auroc
from oodscope.models.zoo import load_model

RERUN_NEEDS = {Need.MODEL}
# gram has no default layers (they depend on the network); its own error message names these for the CIFAR
# ResNets. It needs their full feature maps, so it is timed in a separate pair (a'), (b') - see main().
GRAM = {"layers": ["relu", "layer1", "layer2", "layer3"]}


def sweep_detectors() -> list[str]:
    """Registered OOD detectors that need no network re-run and train no network of their own."""
    return [n for n in oodscope.available() if not (get(n).needs & RERUN_NEEDS) and not get(n).trains_network
            and get(n).family == "ood"]  # anomaly detectors (tabular) have their own bench


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


def extract_all(model, pre, sets, layers, batch_size, device, layer_reduce="mean") -> dict:
    outputs = {}
    for name, data in sets.items():
        outputs[name] = extract(model, data, name=name, preprocess=pre, layers=layers, use_cache=False,
                                progress=False, batch_size=batch_size, device=device, layer_reduce=layer_reduce)
        outputs[name].name = name
    return outputs


class Clock:
    """Wall-clock and process CPU seconds of a block (CPU time is steadier on a shared machine), and the
    1-minute load average when it ended."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def __str__(self):
        return f"{self.wall:.2f} s wall, {self.cpu:.2f} s CPU (load average {self.load:.2f})"


def fastest(clocks: list[Clock]) -> Clock:
    """The run with the least wall time."""
    return min(clocks, key=lambda clock: clock.wall)


def describe(clocks: list[Clock]) -> str:
    """The fastest run, followed by every run's wall seconds when there were several."""
    best = str(fastest(clocks))
    return best if len(clocks) == 1 else f"{best} (fastest of {len(clocks)}: " + \
        ", ".join(f"{c.wall:.2f}" for c in clocks) + " s wall)"


def eval_names(sets) -> list[str]:
    return [n for n in sets if n not in ("train", "val") and not n.startswith("ood_val/")]


def excluded_detectors() -> dict[str, str]:
    """Registered OOD detectors left out of every timing, with the reason."""
    reasons = {}
    for n in oodscope.available():
        cls = get(n)
        if cls.family != "ood":
            continue
        if cls.trains_network:
            reasons[n] = "trains a network of its own (not post-hoc: the issue's default excludes extra training)"
        elif cls.needs & RERUN_NEEDS:
            reasons[n] = "re-runs the network (Need.MODEL: input or activation gradients, or a modified forward)"
    return reasons


def sweep(outputs, names, sets, configs, quiet: bool = False) -> tuple[dict, list[str], dict]:
    """Fit every detector on train, score test and every OOD set; AUROC per (detector, OOD set)."""
    aurocs, failed, seconds = {}, [], {}
    for name in names:
        start = time.perf_counter()
        try:
            detector = create(name, **configs.get(name, {})).fit(outputs["train"])
            id_scores = detector.score(outputs["test"])
            for ood in eval_names(sets)[1:]:
                aurocs[name, ood] = auroc(id_scores, detector.score(outputs[ood]))
        except (ValueError, RuntimeError, FloatingPointError) as error:  # e.g. a bank too small for it
            failed.append(name)
            if not quiet:
                print(f"    {name} left out of every timing: {error}", file=sys.stderr)
        seconds[name] = time.perf_counter() - start
    return aurocs, failed, seconds


def warm_up(model, pre, sets, names, layers, batch_size, device) -> float:
    """One untimed pass of extraction and sweep on small slices of every set: the lazy imports detectors make
    (faiss, scipy submodules, ...) and first-call set-up happen once per process, like torch's own import
    (pytorch-ood's import is likewise outside (d)'s clock). Returns the seconds it took."""
    start = time.perf_counter()
    small = {n: (x[:100 if n == "train" else 50], y[:100 if n == "train" else 50]) for n, (x, y) in sets.items()}
    sweep(extract_all(model, pre, small, layers, batch_size, device), names, small, {}, quiet=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", default=None, help="the CIFAR-10 bench folder (default: benchmarks/common.py's)")
    parser.add_argument("--weights", default=None, help="default: <bench>/models/cifar10_resnet20.pth")
    parser.add_argument("--n-train", type=int, default=1000, help="ID train images (fixed subsample)")
    parser.add_argument("--n-eval", type=int, default=300, help="images of every other set (fixed subsample)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="cpu", help="torch device for every timing (cpu, cuda, ...)")
    parser.add_argument("--parts", default="abgcd", help="which timings to run (ratios need a, b and c/d; g: "
                        "the (a'), (b') pair with gram)")
    parser.add_argument("--profile", action="store_true", help="print per-detector seconds of (b)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (a)/(b) and (a')/(b') pair, "
                        "alternating; the ratios use the fastest of each")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    root = Path(args.bench) if args.bench else cifar_bench_dir()
    bench = load_benchmark_dir(root, check_overlap=False)
    model, pre = load_model("cifar10_resnet20", args.weights or root / "models" / "cifar10_resnet20.pth")
    model.to(device)
    sets = subsample(bench, args.n_train, args.n_eval)
    names = sweep_detectors()
    modules = dict(model.named_modules())
    needs_trained_head = {n: create(n).layer_names() for n in names
                          if any(layer not in modules for layer in create(n).layer_names())}
    names = [n for n in names if n not in needs_trained_head]
    with_gram = "gram" in names
    names = [n for n in names if n != "gram"]
    configs: dict[str, dict] = {}
    layers = sorted({layer for n in names for layer in create(n).layer_names()})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; {os.cpu_count()} CPUs; "
          f"sets: " + ", ".join(f"{k} {len(v[0])}" for k, v in sets.items()))
    print(f"detectors ({len(names)}): {', '.join(names)}")
    if with_gram:
        print(f"    gram (no default layers) is timed in (a'), (b') with layers={GRAM['layers']}: it needs their full "
              "feature maps (layer_reduce='none'), which every other detector does without")
    for name, reason in excluded_detectors().items():
        print(f"    excluded: {name}: {reason}")
    for name, wanted in needs_trained_head.items():
        print(f"    excluded: {name}: reads layers {wanted} that only a network trained for it has (DOS/MOS heads)")
    print(f"    untimed warm-up (imports, first calls) on slices of 100 train / 50 other images: "
          f"{warm_up(model, pre, sets, names, layers, args.batch_size, device):.2f} s")

    # (a) one extraction pass over all sets; (b) the oodscope sweep: one extraction + fit + score every detector
    runs_a, runs_b = [], []
    for _ in range(max(1, args.repeats)):
        with Clock() as clock_a:
            extract_all(model, pre, sets, layers, args.batch_size, device)
        runs_a.append(clock_a)
        with Clock() as clock_b:
            outputs = extract_all(model, pre, sets, layers, args.batch_size, device)
            auroc_b, failed, seconds = sweep(outputs, names, sets, configs)
        runs_b.append(clock_b)
    clock_a, clock_b = fastest(runs_a), fastest(runs_b)
    names = [n for n in names if n not in failed]
    print(f"(a) one extraction pass: {describe(runs_a)}")
    print(f"(b) oodscope sweep, {len(names)} detectors: {describe(runs_b)}")
    if args.profile:
        print("    per detector (fit + score, s): " + ", ".join(
            f"{n} {t:.3f}" for n, t in sorted(seconds.items(), key=lambda item: -item[1])))

    # (a'), (b'): the same with gram, whose full feature maps the extraction must keep
    if with_gram and "g" in args.parts:
        gram_layers = sorted(set(layers) | set(GRAM["layers"]))
        runs_ag, runs_bg, gram_seconds = [], [], []
        for _ in range(max(1, args.repeats)):
            with Clock() as clock_ag:
                extract_all(model, pre, sets, gram_layers, args.batch_size, device, layer_reduce="none")
            runs_ag.append(clock_ag)
            with Clock() as clock_bg:
                outputs_g = extract_all(model, pre, sets, gram_layers, args.batch_size, device, layer_reduce="none")
                _, failed_g, seconds_g = sweep(outputs_g, names + ["gram"], sets, {"gram": GRAM})
            runs_bg.append(clock_bg)
            gram_seconds.append(seconds_g["gram"])
            del outputs_g
        clock_ag, clock_bg = fastest(runs_ag), fastest(runs_bg)
        print(f"(a') one extraction pass keeping gram's feature maps: {describe(runs_ag)}")
        print(f"(b') oodscope sweep with gram, {len(names) + 1 - len(failed_g)} detectors: {describe(runs_bg)}; "
              f"gram fit + score {min(gram_seconds):.2f} s; sweep/extraction with gram: "
              f"{clock_bg.wall / clock_ag.wall:.2f} (CPU {clock_bg.cpu / clock_ag.cpu:.2f})")

    # (c) OpenOOD-style: the network re-run for every method
    clock_c = openood_style_race(model, pre, sets, names, configs, outputs, auroc_b, args.batch_size, device) \
        if "c" in args.parts else None

    # (d) pytorch-ood 0.4.0 through its public per-batch API
    clock_d, agree = None, True
    if "d" in args.parts:
        clock_d, auroc_d, seconds_d = pytorch_ood_race(model, pre, sets, names, args.batch_size, device)
    if clock_d is not None:
        n_sets = max(1, len(eval_names(sets)) - 1)
        print(f"(d) pytorch-ood, {len(auroc_d) // n_sets} detectors: {clock_d}")
        if args.profile:
            print("    per detector (fit + score, s): " + ", ".join(
                f"{n} {t:.3f}" for n, t in sorted(seconds_d.items(), key=lambda item: -item[1])))
        agree = compare_aurocs(auroc_b, auroc_d, outputs, eval_names(sets)[1:])
    ratio = lambda x, y, kind: f"{getattr(x, kind) / getattr(y, kind):.2f}" if x and y else "nan"  # noqa: E731
    print(f"    CPU-time ratios: sweep/extraction {ratio(clock_b, clock_a, 'cpu')}, openood-style/sweep "
          f"{ratio(clock_c, clock_b, 'cpu')}, pytorch-ood/sweep {ratio(clock_d, clock_b, 'cpu')}; "
          f"load average (1, 5, 15 min) now {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"sweep/extraction: {ratio(clock_b, clock_a, 'wall')}")
    print(f"openood-style/sweep: {ratio(clock_c, clock_b, 'wall')}")
    print(f"pytorch-ood/sweep: {ratio(clock_d, clock_b, 'wall')}")
    return 0 if agree else 1


def compare_aurocs(auroc_b, auroc_d, outputs, oods, tolerance: float = 0.1) -> bool:
    """Per coinciding method: mean and worst AUROC difference over the OOD sets; assert agreement within
    ``tolerance`` percentage points unless the difference is one of the explained ones (False if not; the
    script then exits with status 1 after its three ratio lines)."""
    extra = {}
    if any(k[0] == "gmm" for k in auroc_d):  # the class-conditional mixture pytorch-ood fits (not timed)
        detector = create("gmm", max_iter=0).fit(outputs["train"])
        id_scores = detector.score(outputs["test"])
        extra = {ood: auroc(id_scores, detector.score(outputs[ood])) for ood in oods}
    print(f"    {'oodscope':<14}{'pytorch-ood':<19}" + "".join(f"{o:>14}" for o in oods) + f"{'max |diff|':>12}")
    unexplained = []
    for name in dict.fromkeys(k[0] for k in auroc_d):
        diffs = [100 * abs(auroc_b[name, o] - auroc_d[name, o]) for o in oods]
        row = lambda label, values: f"    {label:<33}" + "".join(f"{100 * v:>14.2f}" for v in values)  # noqa
        print(row(f"{name:<14}{PYTORCH_OOD[name]:<19}", [auroc_b[name, o] for o in oods])
              + f"{max(diffs):>12.3f}")
        print(row("  pytorch-ood", [auroc_d[name, o] for o in oods]))
        if name == "gmm" and extra:
            print(row("  oodscope gmm(max_iter=0)", [extra[o] for o in oods])
                  + f"{max(100 * abs(extra[o] - auroc_d[name, o]) for o in oods):>12.3f}")
        if max(diffs) > tolerance:
            if name in EXPLAINED:
                print(f"      explained: {EXPLAINED[name]}")
            elif name in SINGULAR and len(outputs["train"]) <= outputs["train"].features.shape[1]:
                print(f"      explained: {len(outputs['train'])} training samples <= {outputs['train'].features.shape[1]}"
                      " feature dimensions: the covariance is singular and each library regularises it its own way "
                      "(use --n-train well above the feature dimension)")
            else:
                unexplained.append(name)
    if unexplained:
        print(f"    FAILED: AUROC of (b) and (d) differ by more than {tolerance} points for {unexplained}")
        return False
    print(f"    every coinciding method agrees within {tolerance} AUROC points or is explained above")
    return True


def openood_style_race(model, pre, sets, names, configs, outputs, auroc_b, batch_size, device) -> Clock:
    """A fresh run per method: its own pass over the train set (if it learns from it), test and OOD sets."""
    clock = Clock().__enter__()
    auroc_c = {}
    for name in names:
        detector = create(name, **configs.get(name, {}))
        if learns_from_train(detector):
            detector.fit(extract_all(model, pre, {"train": sets["train"]}, detector.layer_names(),
                                     batch_size, device)["train"])
        else:  # stateless methods are fitted on a stub (no network run), as OpenOOD's setup does nothing
            detector.fit(outputs["train"])
        scores = {ood: detector.score(out) for ood, out in extract_all(
            model, pre, {n: sets[n] for n in eval_names(sets)}, detector.layer_names(), batch_size, device).items()}
        for ood in eval_names(sets)[1:]:
            auroc_c[name, ood] = auroc(scores["test"], scores[ood])
    clock.__exit__()
    print(f"(c) OpenOOD-style re-run per method: {clock}")
    print(f"    max |AUROC(b) - AUROC(c)| = {max(abs(auroc_b[k] - auroc_c[k]) for k in auroc_b):.2e}")
    return clock


class _Input(nn.Module):
    """uint8 NHWC batches -> logits, penultimate features, or those features as ``B x C x 1 x 1`` maps."""

    def __init__(self, model, pre, output: str):
        super().__init__()
        self.model, self.pre, self.output = model, pre, output

    def forward(self, x):
        x = self.pre(x)
        if self.output == "logits":
            return self.model(x)
        z = self.model.forward_features(x)
        return z[:, :, None, None] if self.output == "maps" else z


class _MapsHead(nn.Module):
    """``B x C x 1 x 1`` maps -> logits with the model's linear head (the "head" half of pytorch-ood's shaping
    detectors). oodscope shapes the pooled penultimate activations, so pytorch-ood gets them as 1x1 maps."""

    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc

    def forward(self, z):
        return self.fc(z.flatten(1))


# oodscope name -> (pytorch-ood class, how it is built: see pytorch_ood_makers), for every pytorch-ood 0.4.0
# detector that coincides with a sweep detector and needs no input gradients.
PYTORCH_OOD = {"msp": "MaxSoftmax", "maxlogit": "MaxLogit", "energy": "EnergyBased", "entropy": "Entropy",
               "kl_matching": "KLMatching", "gen": "GEN", "temperature": "TemperatureScaling",
               "gradnorm": "GradNorm", "react": "ReAct", "ash_b": "ASH(ash-b)", "ash_p": "ASH(ash-p)",
               "ash_s": "ASH(ash-s)", "scale": "SCALE", "vra": "VRA", "dice": "DICE", "vim": "ViM",
               "fdbd": "fDBD", "she": "SHE", "mahalanobis": "Mahalanobis", "rmds": "RMD", "knn": "KNN",
               "gmm": "GMM", "nnguide": "NNGuide"}
# where (b) and (d) compute different things on purpose; the reason is printed beside the AUROCs
EXPLAINED = {
    "temperature": "T fitted by different optimisers: oodscope's bounded float64 minimiser vs pytorch-ood's "
                   "L-BFGS (lr 0.01, 50 iterations, float32), so T and the MSP on T-scaled logits differ",
    "gen": "pytorch-ood clamps probabilities to [1e-7, 1 - 1e-7] (ties among confident samples)",
    "vra": "pytorch-ood's VRA clips to [alpha, beta] (low activations raised to alpha); oodscope's VRA-P "
           "zeroes activations below alpha (paper Sec. 3.3)",
    "gmm": "oodscope refines the class-conditional mixture by EM (max_iter=100); pytorch-ood's GMM is the "
           "class-conditional fit, i.e. oodscope gmm(max_iter=0) (its AUROC is printed as 'gmm(max_iter=0)')",
}


# covariance-based methods: ill-posed when the training subsample is not larger than the feature dimension
SINGULAR = {"mahalanobis", "rmds", "vim", "gmm"}


def pytorch_ood_makers(pod, model, pre, device):
    """One builder per oodscope name, with oodscope's default hyperparameters in pytorch-ood's units."""
    logits_net = _Input(model, pre, "logits").eval()
    encoder = _Input(model, pre, "features").eval()
    maps, maps_head = _Input(model, pre, "maps").eval(), _MapsHead(model.fc).eval()
    head = model.fc
    w, b = head.weight.detach(), head.bias.detach()
    frac = lambda name, key: getattr(create(name), key) / 100.0  # noqa: E731 - oodscope uses percent
    return {
        "msp": lambda: pod.MaxSoftmax(logits_net),
        "maxlogit": lambda: pod.MaxLogit(logits_net),
        "energy": lambda: pod.EnergyBased(logits_net, t=create("energy").temperature),
        "entropy": lambda: pod.Entropy(logits_net),
        "kl_matching": lambda: pod.KLMatching(logits_net),
        "gen": lambda: pod.GEN(logits_net, gamma=create("gen").gamma, M=create("gen").M),
        "temperature": lambda: pod.TemperatureScaling(logits_net),
        "gradnorm": lambda: pod.GradNorm(logits_net, param_filter=lambda n: n.endswith("fc.weight"),
                                         temperature=create("gradnorm").temperature),
        "react": lambda: pod.ReAct(maps, maps_head, percentile=frac("react", "percentile")),
        "ash_b": lambda: pod.ASH(maps, maps_head, variant="ash-b", percentile=frac("ash_b", "percentile")),
        "ash_p": lambda: pod.ASH(maps, maps_head, variant="ash-p", percentile=frac("ash_p", "percentile")),
        "ash_s": lambda: pod.ASH(maps, maps_head, variant="ash-s", percentile=frac("ash_s", "percentile")),
        "scale": lambda: pod.SCALE(maps, maps_head, percentile=frac("scale", "percentile")),
        "vra": lambda: pod.VRA(maps, maps_head, lower_percentile=frac("vra", "lower_percentile"),
                               upper_percentile=frac("vra", "upper_percentile")),
        "dice": lambda: pod.DICE(encoder, w=w, b=b, p=frac("dice", "sparsity")),
        "vim": lambda: pod.ViM(encoder, d=_vim_dim(), w=w, b=b),
        "fdbd": lambda: pod.fDBD(encoder, head),
        "she": lambda: pod.SHE(encoder, head),
        "mahalanobis": lambda: pod.Mahalanobis(encoder),
        "rmds": lambda: pod.RMD(encoder),
        "knn": lambda: pod.KNN(encoder, k=create("knn").k),
        "gmm": lambda: pod.GMM(encoder, reg=create("gmm").reg_covar),
        "nnguide": lambda: pod.NNGuide(encoder, head, k=create("nnguide").k),
    }


def pytorch_ood_race(model, pre, sets, names, batch_size, device):
    """Every coinciding pytorch-ood detector as a user runs it: ``fit(train_loader)`` where it needs fitting,
    then ``detector(x)`` on every batch of the test and OOD sets (each call runs the network)."""
    try:
        import pytorch_ood.detector as pod
    except ImportError:
        print("(d) pytorch-ood is not importable here; run this script with pytorch-ood 0.4.0 installed",
              file=sys.stderr)
        return None, {}, {}
    import logging

    from torch.utils.data import DataLoader, TensorDataset

    logging.getLogger("pytorch_ood").setLevel(logging.ERROR)  # "No device set. Will use 'cpu'" per fit
    loaders = {n: DataLoader(TensorDataset(torch.as_tensor(x), torch.as_tensor(y)), batch_size=batch_size)
               for n, (x, y) in sets.items()}
    makers = pytorch_ood_makers(pod, model, pre, device)
    clock = Clock().__enter__()
    aurocs, seconds = {}, {}
    for name in [n for n in PYTORCH_OOD if n in names]:
        start = time.perf_counter()
        detector = makers[name]().to(device)  # as a user would; without it fit() picks "cpu" and moves the model
        with torch.no_grad():
            if getattr(detector, "requires_fit", False):
                detector.fit(loaders["train"])
        grad = torch.enable_grad() if name == "gradnorm" else torch.no_grad()
        with grad:
            scores = {n: torch.cat([detector(x.to(device)).detach().cpu() for x, _ in loaders[n]]).double().numpy()
                      for n in eval_names(sets)}
        for ood in eval_names(sets)[1:]:
            aurocs[name, ood] = auroc(scores["test"], scores[ood])
        seconds[name] = time.perf_counter() - start
    clock.__exit__()
    return clock, aurocs, seconds


def _vim_dim() -> int:
    from oodscope.detectors.vim import default_principal_dim

    dim = create("vim").dim
    return dim if dim is not None else default_principal_dim(64)


if __name__ == "__main__":
    sys.exit(main())
