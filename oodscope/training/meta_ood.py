"""Continuously adaptive OOD detection (CAOOD) by meta OOD learning (MOL): a detector meta-learned so that a few
gradient steps on ``k`` samples of a new, shifted ID/OOD distribution adapt it.

Wu, Lu, Fang & Zhang, "Meta OOD Learning for Continuously Adaptive OOD Detection", ICCV 2023 (arXiv 2309.11705).
The setting (from the paper's abstract, verified): the ID and OOD distributions shift over time; at deployment
only a few ID samples of each newly arriving distribution are available; MOL learns, by a learning-to-adapt
(meta-learning) scheme during training, an initialisation of the OOD detection model that a few adaptation steps
turn into a good detector for the new distribution, keeping both ID accuracy and OOD detection. **The paper's
method section, equations and defaults could not be read here** (no copy of its text or of released code was
found), so no equation numbers are cited: the objective, task construction and schedule below are this module's
own reading of the abstract as MAML (Finn et al., ICML 2017) on an energy-bounded OOD loss, and every choice is
listed as such.

**Tasks** (a distribution ``D_t``): the ID images through one synthetic covariate shift, a (corruption family,
severity) pair of :mod:`oodscope.data.corruptions` (or the clean images, :data:`CLEAN`), with OOD = auxiliary
outliers (``tin_aux_train.npz``) through the **same** shift (:func:`build_tasks`, seeded). Each task's images go
once through the **frozen** trunk of the network and are kept as features; only a small part on top (``part``;
for the CIFAR ResNets :func:`split_cifar_resnet`: the last residual block of ``layer3`` and the ``fc`` head, batch
norm in eval mode with the pretrained statistics) is meta-learned and adapted.

**Loss on a set** ``S = (X_in, y, X_out)`` (the energy-bounded loss of Liu et al., NeurIPS 2020, our choice for
MOL's ID + OOD objective), with ``f_theta`` the part's logits and ``E(x) = -logsumexp_c f_c(x)``:

    ``L(theta; S) = CE(f_theta(X_in), y) + lambda (mean relu(E(X_in) - m_in)^2 + mean relu(m_out - E(X_out))^2)``

``m_in = -25``, ``m_out = -7``, ``lambda = 0.1`` by default (Liu et al.'s CIFAR values, for a WideResNet). The
detector scores ``E(x)`` (higher = more OOD). On the pretrained CIFAR-10 ResNet-20 the clean ID energies have
median -12.5 and the outliers' -5.8, so ``m_in = -25`` makes the hinge dominate (a loss of 38 on Gaussian-noise
tasks, measured); :func:`clean_margins` sets ``(m_in, m_out)`` to the part's own median energies on the clean task
instead, which the benchmark uses.

**Inner loop** (adaptation, at meta-training and at test time): ``n`` gradient steps on the support set,
``theta_0 = theta``, ``theta_{j+1} = theta_j - alpha clip(grad L(theta_j; S_support))`` (:func:`inner_update`,
:func:`adapt`), where ``clip`` rescales the gradient to global L2 norm at most ``clip`` (default 1 in
:func:`meta_train` and :func:`adaptation_curve`; :func:`adapt` takes plain steps unless given one). The clipping is
our addition: plain steps on the squared hinge diverge on the ResNet-20 part (16 shots of a Gaussian-noise@5
task, measured: with Liu's margins at ``alpha = 3e-3`` the loss is 2.5e9 after two steps, with the clean margins
at ``alpha = 1e-2`` 8e4), while clipped steps at ``alpha`` up to 0.1 stay finite. Defaults: ``n = 5`` inner
steps, ``alpha = 0.05``, ``clip = 1``; support ``k = 16``, query 32, a meta-batch of 4 tasks, Adam at
``beta = 1e-3``, 40 epochs of 20 outer iterations (800 in all).

**Outer loop** (meta-training, :func:`meta_train`): per iteration a meta-batch of ``B`` tasks,
each with a support set (``shots`` ID + ``shots`` OOD) and a disjoint query set (``query`` + ``query``) drawn
from its pool, and

    ``theta <- theta - beta * 1/B sum_t grad_theta L(theta'_t; S_query,t)``,  ``theta'_t = theta_n`` on ``S_support,t``

with Adam as the outer optimiser. ``first_order=True`` (default) is first-order MAML: the meta-gradient is
``grad_{theta'} L(theta'; S_query)`` evaluated at the adapted weights (:func:`meta_gradient`);
``first_order=False`` back-propagates through the inner steps (second order). ``meta=False`` is the **control**:
the same tasks, draws, loss, optimiser and steps, but the loss is taken at ``theta`` itself on the support and
query sets together (joint multi-task training, no inner loop), so its test-time adaptation starts from a
non-meta-learned initialisation.

**Test time** (:func:`adaptation_curve`): for each stage of a sequence of shifted distributions, ``k`` labelled
ID samples of the stage and ``k`` auxiliary outliers through the stage's shift form the support set; ``n`` inner
steps from the meta-learned ``theta`` (each stage starts again from ``theta``, MAML's protocol; ``carry`` in the
benchmark continues from the previous stage instead); the detector after ``0, 1, ..., n`` steps is scored.

**Deviations and our choices** (none verified against the paper): the loss above and its margins; the tasks
(corruption family x severity, shifted auxiliary outliers as the task's OOD, the clean distribution as one more
task); only a small part on cached features is meta-learned (CPU), not the whole network, with batch norm frozen;
first-order MAML by default; Adam outer optimiser, clipped SGD inner steps; the support set's OOD half is
auxiliary outliers through the stage's shift (the deployed detector is assumed to know how to shift its outlier
pool, or to get a few shifted outliers); every stage restarts from the meta-learned weights.

**Training** follows :func:`oodscope.training.finetune`'s conventions and reuses its checkpoint helpers: seeded
(task, support and query draws from one seed; torch's global RNG forked), resumable (an atomic checkpoint after
every epoch of ``steps_per_epoch`` outer iterations; a rerun with the same arguments resumes and gives the same
weights; another part, setting, schedule or task data is an error), a tqdm bar, ``device=``, a non-finite loss
stops with ``FloatingPointError``; the caller's ``part`` is not modified (``copy=False`` trains it in place).
Scores and metrics are float64.
"""

from __future__ import annotations

import copy as copying
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..detectors._common import energy as energy_score  # E(x) = -logsumexp f(x), float64
from ..detectors._common import probabilities
from .engine import History, _resume, _save_atomic, model_identity

CHECKPOINT = "meta_ood.pt"
CLEAN = "clean"  # the unshifted distribution (severity 0)
M_IN, M_OUT, LAMBDA = -25.0, -7.0, 0.1  # Liu et al.'s energy margins and weight for CIFAR


# -- the shifted distributions --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shift:
    """One synthetic covariate shift: a corruption ``family`` of :mod:`oodscope.data.corruptions` at ``severity``
    1-5, or :data:`CLEAN` at severity 0."""

    family: str
    severity: int

    def __post_init__(self) -> None:
        check_shift(self.family, self.severity)

    @property
    def name(self) -> str:
        return CLEAN if self.family == CLEAN else f"{self.family}@{self.severity}"


def check_shift(family: Any, severity: Any) -> None:
    """``ValueError`` naming the fix for an unknown family or a severity outside 1-5 (0 for :data:`CLEAN`)."""
    from ..data.corruptions import CORRUPTIONS

    if family == CLEAN:
        if severity != 0:
            raise ValueError(f"meta_ood: the clean distribution has severity 0, got {severity!r}")
        return
    if family not in CORRUPTIONS:
        raise ValueError(f"meta_ood: unknown corruption family {family!r}; known: {CLEAN}, {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"meta_ood: corruption severity must be 1-5, got {severity!r} for {family!r}")


def shift_grid(families: Sequence[str], severities: Sequence[int], clean: bool = False) -> list[Shift]:
    """Every (family, severity) pair, family by family (and :data:`CLEAN` first when ``clean``)."""
    if not families or not severities:
        raise ValueError("meta_ood: need at least one corruption family and one severity")
    return ([Shift(CLEAN, 0)] if clean else []) + [Shift(f, int(s)) for f in families for s in severities]


def apply_shift(images: np.ndarray, shift: Shift, seed: int = 0) -> np.ndarray:
    """``images`` (uint8 N x H x W x 3) through ``shift`` (a copy; :data:`CLEAN` returns them unchanged)."""
    from ..data.corruptions import corrupt

    return np.asarray(images).copy() if shift.family == CLEAN else corrupt(images, shift.family, shift.severity, seed)


@dataclass
class ShiftTask:
    """One distribution as frozen-trunk features: ``id_features`` with ``id_labels`` and ``ood_features``."""

    shift: Shift
    id_features: np.ndarray
    id_labels: np.ndarray
    ood_features: np.ndarray

    def __post_init__(self) -> None:
        for name in ("id_features", "ood_features"):
            array = getattr(self, name)
            if len(array) == 0:
                raise ValueError(f"meta_ood: task {self.shift.name} has no {name.split('_')[0].upper()} samples"
                                 + ("; pass auxiliary outliers (e.g. tin_aux_train.npz)" if name == "ood_features"
                                    else ""))
            if not np.isfinite(array).all():
                raise ValueError(f"meta_ood: task {self.shift.name}: {name} contain NaN or inf")
        if self.id_labels.shape != (len(self.id_features),) or self.id_labels.dtype.kind not in "iu":
            raise ValueError(f"meta_ood: task {self.shift.name}: need one integer label per ID sample, got "
                             f"{self.id_labels.dtype} {self.id_labels.shape} for {len(self.id_features)}")


def _check_images(images: Any, who: str) -> np.ndarray:
    if images is None:
        raise ValueError(f"meta_ood: no {who}; pass images" + (" (e.g. tin_aux_train.npz)" if who == "outliers"
                                                                  else ""))
    array = np.asarray(images)
    if array.ndim != 4 or len(array) == 0:
        raise ValueError(f"meta_ood: {who} must be a non-empty N x H x W x 3 batch, got shape {array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"meta_ood: {who} contain NaN or inf")
    if array.dtype != np.uint8:
        raise ValueError(f"meta_ood: {who} must be uint8 images (the corruptions work on those), got {array.dtype}")
    return array


def build_tasks(encode: Callable[[np.ndarray], np.ndarray], id_images: Any, id_labels: Any, outliers: Any,
                shifts: Sequence[Shift], n_id: int, n_ood: int, seed: int = 0) -> list[ShiftTask]:
    """One :class:`ShiftTask` per shift: ``n_id`` ID images (with labels) and ``n_ood`` outliers, drawn without
    replacement per shift (seed ``seed + i`` for shift ``i``), through the shift (corruption noise seeded the same
    way), then through ``encode`` (the frozen trunk: uint8 images -> float32 features)."""
    images = _check_images(id_images, "ID images")
    outlier_images = _check_images(outliers, "outliers")
    labels = np.asarray(id_labels)
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise ValueError(f"meta_ood: need one integer label per ID image, got {labels.dtype} {labels.shape}")
    for name, n, pool in (("n_id", n_id, len(images)), ("n_ood", n_ood, len(outlier_images))):
        if not (isinstance(n, (int, np.integer)) and 1 <= n <= pool):
            raise ValueError(f"meta_ood: {name} = {n!r} samples per task, but {pool} are available; lower {name}")
    tasks = []
    for i, shift in enumerate(shifts):
        rng = np.random.default_rng(seed + i)
        rows = np.sort(rng.choice(len(images), n_id, replace=False))
        out_rows = np.sort(rng.choice(len(outlier_images), n_ood, replace=False))
        id_features = encode(apply_shift(images[rows], shift, seed + i))
        ood_features = encode(apply_shift(outlier_images[out_rows], shift, seed + 10_000 + i))
        tasks.append(ShiftTask(shift, np.asarray(id_features, np.float32), labels[rows].astype(np.int64),
                               np.asarray(ood_features, np.float32)))
    return tasks


# -- the network: a frozen trunk and the meta-learned part ----------------------------------------------------------
def split_cifar_resnet(model, preprocess: Callable | None = None, blocks: int = 1, device: str = "cpu",
                       batch_size: int = 256) -> tuple[Callable[[np.ndarray], np.ndarray], Any]:
    """``(encode, part)`` of an oodscope CIFAR ResNet: ``encode(images)`` runs the frozen trunk (stem, ``layer1``,
    ``layer2`` and ``layer3`` but its last ``blocks`` blocks; eval mode, no gradient) on uint8 images and returns
    float32 maps; ``part`` (a copy) = those blocks, global average pooling and ``fc``."""
    import torch
    from torch import nn

    layer3 = model.layer3
    if not 1 <= blocks <= len(layer3):
        raise ValueError(f"meta_ood: blocks must be 1..{len(layer3)} (the blocks of layer3), got {blocks!r}")
    trunk = nn.Sequential(model.conv1, model.bn1, model.relu, model.layer1, model.layer2,
                          layer3[:len(layer3) - blocks]).to(device).eval()
    part = copying.deepcopy(nn.Sequential(*layer3[len(layer3) - blocks:], nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                          model.fc))
    prep = preprocess if preprocess is not None else (lambda batch: batch.permute(0, 3, 1, 2).float() / 255.0)

    def encode(images: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
                out.append(trunk(prep(batch)).float().cpu().numpy())
        return np.concatenate(out)

    return encode, part.eval()


# -- loss, inner loop, meta-gradient --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """A support or query set as tensors: ID features, their labels, OOD features."""

    x_in: Any
    y: Any
    x_out: Any


def caood_loss(logits_in, labels, logits_out, m_in: float = M_IN, m_out: float = M_OUT, lam: float = LAMBDA):
    """``CE + lambda (mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2)``, ``E = -logsumexp(f)``."""
    from torch.nn import functional as F

    energy_in, energy_out = -logits_in.logsumexp(dim=1), -logits_out.logsumexp(dim=1)
    hinge = F.relu(energy_in - m_in).pow(2).mean() + F.relu(m_out - energy_out).pow(2).mean()
    return F.cross_entropy(logits_in, labels) + lam * hinge


def set_loss(part, params: dict, batch: Batch, margins: tuple[float, float, float] = (M_IN, M_OUT, LAMBDA)):
    """:func:`caood_loss` of ``part`` with weights ``params`` on one set (ID and OOD in one forward pass)."""
    import torch
    from torch.func import functional_call

    logits = functional_call(part, params, (torch.cat([batch.x_in, batch.x_out]),))
    n = len(batch.x_in)
    return caood_loss(logits[:n], batch.y, logits[n:], *margins)


def inner_update(params: dict, grads: Sequence, lr: float) -> dict:
    """One inner step: ``theta' = theta - alpha g`` for every named weight."""
    return {name: value - lr * g for (name, value), g in zip(params.items(), grads)}


def clip_gradients(grads: Sequence, max_norm: float | None):
    """``grads`` scaled by ``min(1, max_norm / ||g||)`` (one global L2 norm over all tensors); ``None``: unchanged."""
    import torch

    if max_norm is None:
        return list(grads)
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    factor = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
    return [g * factor for g in grads]


def adapt(part, support: Batch, steps: int, lr: float, params: dict | None = None,
          margins: tuple[float, float, float] = (M_IN, M_OUT, LAMBDA), create_graph: bool = False,
          clip: float | None = None) -> list[dict]:
    """The weights after ``0, 1, ..., steps`` inner steps on ``support`` (from ``params``, default the part's own),
    each gradient clipped to global norm ``clip`` (``None``: plain steps). Without ``create_graph`` every step's
    weights are detached leaves that require grad (first order)."""
    import torch

    if params is None:
        params = {name: p.detach().clone().requires_grad_() for name, p in part.named_parameters()}
    path = [params]
    for _ in range(steps):
        loss = set_loss(part, params, support, margins)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        params = inner_update(params, clip_gradients(grads, clip), lr)
        if not create_graph:
            params = {name: value.detach().requires_grad_() for name, value in params.items()}
        path.append(params)
    return path


def meta_gradient(part, params: dict, support: Batch, query: Batch, steps: int, lr: float,
                  margins: tuple[float, float, float] = (M_IN, M_OUT, LAMBDA), first_order: bool = True,
                  clip: float | None = None) -> tuple[list, float]:
    """``(grads, query loss)``: the gradient of the query loss after ``steps`` inner steps on ``support``; first
    order: ``grad_{theta'} L(theta'; query)`` at the adapted weights, else ``grad_theta`` through the inner steps."""
    import torch

    start = {name: p.detach().clone().requires_grad_() for name, p in params.items()} if first_order else params
    fast = adapt(part, support, steps, lr, start, margins, create_graph=not first_order, clip=clip)[-1]
    loss = set_loss(part, fast, query, margins)
    wrt = list(fast.values()) if first_order else list(params.values())
    return list(torch.autograd.grad(loss, wrt)), float(loss.detach())


def joint_gradient(part, params: dict, support: Batch, query: Batch,
                   margins: tuple[float, float, float] = (M_IN, M_OUT, LAMBDA)) -> tuple[list, float]:
    """The control's ``(grads, loss)``: the loss at ``theta`` on the support and query sets together."""
    import torch

    both = Batch(torch.cat([support.x_in, query.x_in]), torch.cat([support.y, query.y]),
                 torch.cat([support.x_out, query.x_out]))
    loss = set_loss(part, params, both, margins)
    return list(torch.autograd.grad(loss, list(params.values()))), float(loss.detach())


def task_gradient(part, params: dict, support: Batch, query: Batch, settings: dict) -> tuple[list, float]:
    """One task's contribution to an outer step (meta or control, per ``settings``)."""
    margins = (settings["m_in"], settings["m_out"], settings["lam"])
    if settings["meta"]:
        return meta_gradient(part, params, support, query, settings["inner_steps"], settings["inner_lr"], margins,
                             settings["first_order"], settings["clip"])
    return joint_gradient(part, params, support, query, margins)


# -- drawing support and query sets ---------------------------------------------------------------------------------
def check_shots(task: ShiftTask, n_id: int, n_ood: int, who: str = "shots") -> None:
    """``ValueError`` when a task has fewer ID or OOD samples than a draw needs."""
    if not (isinstance(n_id, (int, np.integer)) and n_id >= 1 and isinstance(n_ood, (int, np.integer))
            and n_ood >= 1):
        raise ValueError(f"meta_ood: {who} must be whole numbers >= 1, got {n_id!r} ID / {n_ood!r} OOD")
    for kind, need, have in (("ID", n_id, len(task.id_features)), ("OOD", n_ood, len(task.ood_features))):
        if need > have:
            raise ValueError(f"meta_ood: {who} need {need} {kind} samples of {task.shift.name}, only {have} are "
                             f"available; lower k (shots/query) or give more samples per task")


def draw_sets(task: ShiftTask, sizes: Sequence[int], generator, device: str = "cpu") -> list[Batch]:
    """Disjoint sets of ``sizes[i]`` ID and ``sizes[i]`` OOD samples of ``task`` (one permutation each)."""
    import torch

    order_in = torch.randperm(len(task.id_features), generator=generator).numpy()
    order_out = torch.randperm(len(task.ood_features), generator=generator).numpy()
    out, start = [], 0
    for size in sizes:
        rows_in, rows_out = order_in[start:start + size], order_out[start:start + size]
        start += size
        out.append(Batch(torch.from_numpy(task.id_features[rows_in]).to(device),
                         torch.from_numpy(task.id_labels[rows_in]).to(device),
                         torch.from_numpy(task.ood_features[rows_out]).to(device)))
    return out


def support_set(task: ShiftTask, k: int, seed: int = 0, device: str = "cpu") -> Batch:
    """``k`` labelled ID samples and ``k`` OOD samples of ``task``, seeded: a test-time support set."""
    import torch

    check_shots(task, k, k, "k")
    return draw_sets(task, [k], torch.Generator().manual_seed(seed), device)[0]


# -- meta-training --------------------------------------------------------------------------------------------------
def _tasks_fingerprint(tasks: Sequence[ShiftTask]) -> str:
    digest = hashlib.sha256()
    for task in tasks:
        digest.update(task.shift.name.encode())
        for array in (task.id_features, task.id_labels, task.ood_features):
            digest.update(repr((array.shape, str(array.dtype))).encode())
            digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()[:16]


def _check_settings(settings: dict, epochs: int, steps_per_epoch: int) -> None:
    for name in ("meta_batch", "inner_steps"):
        value = settings[name]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= (0 if name == "inner_steps"
                                                                                    else 1)):
            raise ValueError(f"meta_ood: {name} must be a whole number >= {0 if name == 'inner_steps' else 1}, "
                             f"got {value!r}")
    for name in ("inner_lr", "outer_lr", "lam", "clip"):
        value = settings[name]
        if name == "clip" and value is None:
            continue
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"meta_ood: {name} must be a finite number > 0, got {value!r}")
    if not settings["m_in"] < settings["m_out"]:
        raise ValueError(f"meta_ood: m_in must be below m_out, got {settings['m_in']!r}, {settings['m_out']!r}")
    if not (isinstance(epochs, int) and epochs >= 1 and isinstance(steps_per_epoch, int) and steps_per_epoch >= 1):
        raise ValueError(f"meta_ood: need epochs >= 1 and steps_per_epoch >= 1, got {epochs!r}, {steps_per_epoch!r}")


def meta_train(part, tasks: Sequence[ShiftTask], *, meta: bool = True, epochs: int = 40, steps_per_epoch: int = 20,
               meta_batch: int = 4, shots: int = 16, query: int = 32, inner_steps: int = 5, inner_lr: float = 0.05,
               clip: float | None = 1.0, outer_lr: float = 1e-3, first_order: bool = True, m_in: float = M_IN,
               m_out: float = M_OUT,
               lam: float = LAMBDA, seed: int = 0, device: str = "cpu", checkpoint_dir: str | Path | None = None,
               progress: bool = True, copy: bool = True) -> tuple[Any, History]:
    """Meta-train ``part`` (MOL, ``meta=True``) or train it jointly on the same draws (the control); returns
    ``(part, history)``.

    Args:
        part: the torch module on top of the frozen trunk (e.g. from :func:`split_cifar_resnet`); kept in eval
            mode (batch-norm statistics fixed); a copy is trained unless ``copy=False``.
        tasks: the meta-training distributions (:func:`build_tasks`); each outer iteration draws ``meta_batch``
            of them uniformly, with replacement.
        meta: the meta objective (first- or second-order MAML) or the control (loss at ``theta`` on support and
            query together).
        epochs, steps_per_epoch: outer iterations = ``epochs * steps_per_epoch``; a checkpoint after every epoch.
        shots, query: ID (and as many OOD) samples per task in the support and the query set (disjoint).
        inner_steps, inner_lr: the inner loop's plain gradient steps and their learning rate ``alpha``.
        clip: the inner steps' gradients are clipped to this global L2 norm (``None``: not clipped).
        outer_lr: Adam's learning rate ``beta``.
        first_order: first-order MAML (default) or back-propagation through the inner steps.
        m_in, m_out, lam: the energy-bounded loss (:func:`caood_loss`).
        seed: task, support and query draws.
        device: ``"cpu"``, ``"cuda"``, ...
        checkpoint_dir: where the per-epoch checkpoint lives; a rerun resumes from it.
        progress: a tqdm bar per epoch with the mean loss.
        copy: train a copy of ``part`` (default) or ``part`` itself.
    """
    import torch
    from tqdm.auto import tqdm

    if not tasks:
        raise ValueError("meta_ood: no meta-training tasks; build them with build_tasks(...)")
    settings = dict(meta=bool(meta), meta_batch=meta_batch, shots=shots, query=query, inner_steps=inner_steps,
                    inner_lr=inner_lr, clip=clip, outer_lr=outer_lr, first_order=bool(first_order), m_in=float(m_in),
                    m_out=float(m_out), lam=lam)
    _check_settings(settings, epochs, steps_per_epoch)
    for task in tasks:
        check_shots(task, shots + query, shots + query, "shots + query")
    part = copying.deepcopy(part) if copy else part
    part.to(device).eval()
    params = dict(part.named_parameters())
    optimiser = torch.optim.Adam(params.values(), lr=outer_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0)
    generators = (torch.Generator().manual_seed(seed),)
    history = History()
    identity = {"model": model_identity(part),
                "objective": f"meta_ood {json.dumps(settings, sort_keys=True)}",
                "schedule": f"{epochs}x{steps_per_epoch} adam seed={seed}", "data": _tasks_fingerprint(tasks)}
    path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT
    start = 0
    if path is not None and path.exists():
        start = _resume(path, identity, part, optimiser, scheduler, generators, history)
    label = "meta_ood" if meta else "meta_ood control"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(start, epochs):
            started, total = time.perf_counter(), 0.0
            bar = tqdm(range(steps_per_epoch), desc=f"{label} epoch {epoch + 1}/{epochs}", disable=not progress,
                       leave=False)
            for step in bar:
                loss = _outer_step(part, params, tasks, optimiser, generators[0], settings, device)
                if not math.isfinite(loss):
                    saved = f"; the last good checkpoint is {path}" if path and path.exists() else ""
                    raise FloatingPointError(f"meta_ood: the loss is {loss} at epoch {epoch + 1}, step {step + 1}; "
                                             f"lower inner_lr / outer_lr{saved}")
                total += loss
                bar.set_postfix({"loss": f"{total / (step + 1):.4f}"})
            history.epochs.append({"loss": total / steps_per_epoch})
            history.seconds.append(time.perf_counter() - started)
            history.images += steps_per_epoch * meta_batch * 2 * (shots + query)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                _save_atomic({"identity": identity, "epoch": epoch + 1, "model": part.state_dict(),
                              "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                              "generators": [g.get_state() for g in generators],
                              "history": json.dumps({"epochs": history.epochs, "seconds": history.seconds,
                                                     "images": history.images})}, path)
    return part.eval(), history


def _outer_step(part, params: dict, tasks: Sequence[ShiftTask], optimiser, generator, settings: dict,
                device: str) -> float:
    """One outer iteration: draw the meta-batch, average the tasks' gradients, one Adam step; the mean loss."""
    import torch

    picks = torch.randint(0, len(tasks), (settings["meta_batch"],), generator=generator).tolist()
    summed, losses = [torch.zeros_like(p) for p in params.values()], []
    for index in picks:
        support, query = draw_sets(tasks[index], [settings["shots"], settings["query"]], generator, device)
        grads, loss = task_gradient(part, params, support, query, settings)
        losses.append(loss)
        summed = [s + g for s, g in zip(summed, grads)]
    if all(math.isfinite(v) for v in losses):
        optimiser.zero_grad(set_to_none=True)
        for p, g in zip(params.values(), summed):
            p.grad = g / len(picks)
        optimiser.step()
    return float(np.mean(losses))


# -- test time ------------------------------------------------------------------------------------------------------
def logits_of(part, params: dict, features: np.ndarray, batch_size: int = 1024, device: str = "cpu") -> np.ndarray:
    """float64 logits of ``part`` with weights ``params`` on ``features`` (no gradient, in batches)."""
    import torch
    from torch.func import functional_call

    features = np.asarray(features, np.float32)
    if not np.isfinite(features).all():
        raise ValueError("meta_ood: features contain NaN or inf")
    out = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            x = torch.from_numpy(features[start:start + batch_size]).to(device)
            out.append(functional_call(part, params, (x,)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def clean_margins(part, task: ShiftTask, quantile: float = 0.5) -> tuple[float, float]:
    """``(m_in, m_out)`` from the part's own energies on ``task`` (e.g. the clean one): the ``quantile`` of its ID
    energies and of its OOD energies (float64)."""
    params = dict(part.named_parameters())
    m_in = float(np.quantile(energy_score(logits_of(part, params, task.id_features)), quantile))
    m_out = float(np.quantile(energy_score(logits_of(part, params, task.ood_features)), quantile))
    if not m_in < m_out:
        raise ValueError(f"meta_ood: on {task.shift.name} the ID energies ({m_in:.3g}) are not below the OOD ones "
                         f"({m_out:.3g}); give m_in and m_out by hand")
    return m_in, m_out


def msp_score(logits: np.ndarray) -> np.ndarray:
    """``-max_c softmax(f)_c`` in float64; higher = more OOD (the ``msp`` detector's score on raw logits)."""
    return -probabilities(logits).max(axis=1)


def adaptation_curve(part, support: Batch, evaluation: dict[str, np.ndarray], steps: int, lr: float,
                     params: dict | None = None, margins: tuple[float, float, float] = (M_IN, M_OUT, LAMBDA),
                     clip: float | None = 1.0, device: str = "cpu") -> list[dict[str, np.ndarray]]:
    """The part's logits on every set of ``evaluation`` (name -> features) after ``0, 1, ..., steps`` inner steps
    (:func:`adapt`, learning rate ``lr``, clipped at ``clip``) on ``support``: one dict per step. The adapted
    weights of each step are ``curve[step]["params"]``."""
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"meta_ood: steps must be a whole number >= 0, got {steps!r}")
    path = adapt(part, support, steps, lr, params, margins, clip=clip)
    curve = []
    for weights in path:
        entry: dict[str, Any] = {name: logits_of(part, weights, x, device=device) for name, x in evaluation.items()}
        entry["params"] = {k: v.detach() for k, v in weights.items()}
        curve.append(entry)
    return curve
