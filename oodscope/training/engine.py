"""``finetune``: train a classifier with a registered objective (outlier exposure and its successors).

Standard torch parts only: a ``DataLoader`` over the ID images (and one over the auxiliary outliers), SGD with
Nesterov (or plain) momentum and a per-step cosine (or constant) learning-rate schedule, optionally after constant
warm-up epochs (CoOp's), AMP on CUDA. The CIFAR recipe's augmentation (random crop with 4 px zero padding,
horizontal flip; Hendrycks et al.'s and Liu et al.'s code) runs vectorised on the raw uint8 batch before the model's
own preprocessing.

* **Deterministic under a seed** on CPU: model copy, data order, augmentation and outlier draws come from one seed;
  torch's global RNG is forked, so the caller's state is left alone.
* **Resumable**: after every epoch an atomic checkpoint (model, optimiser, scheduler, the data generators' states,
  the history, and the model's and objective's identity) is written to ``checkpoint_dir``. A rerun with the same
  arguments resumes after the last finished epoch and gives the same weights as an uninterrupted run; resuming with
  another model or objective is an error naming both. Checkpoints are read with ``weights_only=True``.
* **A non-finite loss** stops training with ``FloatingPointError`` naming the epoch and step; the last good
  checkpoint stays on disk.
* The caller's model is never modified: ``finetune`` trains and returns a copy (``copy=False`` trains in place).
"""

from __future__ import annotations

import copy as copying
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..detectors import get
from ..extraction.outputs import Need
from .objective import Objective

CHECKPOINT = "finetune.pt"


@dataclass
class History:
    """What training did: per-epoch mean loss terms, seconds per epoch and training images per second."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    images: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images / max(sum(self.seconds), 1e-9)


def _as_images(data: Any, who: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(images, labels)`` from a ``(images, labels)`` tuple, a split with ``inputs``/``labels``, or an array."""
    if isinstance(data, tuple) and len(data) == 2:
        images, labels = data
    elif hasattr(data, "inputs"):
        images, labels = data.inputs, getattr(data, "labels", None)
    else:
        images, labels = data, None
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"{who}: expected a non-empty batch of images (N, H, W, C) or (N, C, H, W), got shape "
                         f"{images.shape}")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise ValueError(f"{who}: images contain NaN or inf")
    return images, None if labels is None else np.asarray(labels)


def _check_labels(labels: np.ndarray | None, n: int, n_classes: int | None) -> np.ndarray:
    if labels is None:
        raise ValueError("finetune: the training images have no labels; pass (images, labels)")
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise ValueError(f"finetune: need one integer label per training image, got {labels.dtype} {labels.shape} "
                         f"for {n} images")
    if (labels < 0).any() or (n_classes is not None and labels.max() >= n_classes):
        raise ValueError(f"finetune: training labels must lie in [0, {n_classes}), got {labels.min()}..{labels.max()}"
                         " (OOD samples belong in outliers=, not in the training set)")
    return labels.astype(np.int64)


def _channels_last(images: np.ndarray) -> bool:
    return images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3)


def augment(batch, generator, padding: int = 4):
    """Random crop after zero padding and a random horizontal flip, per image, on an ``(B, H, W, C)`` tensor."""
    import torch

    b, h, w, _ = batch.shape
    padded = torch.nn.functional.pad(batch, (0, 0, padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (top[:, None] + torch.arange(h))[:, :, None]
    cols = (left[:, None] + torch.arange(w))[:, None, :]
    cropped = padded[torch.arange(b)[:, None, None], rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(2), cropped)


def resized_crop_boxes(b: int, h: int, w: int, generator, scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10):
    """``(top, left, height, width)`` integer tensors of ``b`` random crops, torchvision's ``RandomResizedCrop``
    rule: up to ``attempts`` draws of an area share in ``scale`` and a log-uniform aspect ratio in ``ratio`` until the
    box fits; images none of whose draws fit get the centre crop at the ratio clamped to ``ratio``."""
    import torch

    tops, lefts = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)
    heights, widths = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float64))
    for _ in range(attempts):  # a loop over attempts, every image at once
        area = h * w * (scale[0] + (scale[1] - scale[0]) * torch.rand(b, generator=generator, dtype=torch.float64))
        aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(b, generator=generator,
                                                                                       dtype=torch.float64))
        cw, ch = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()
        top = (torch.rand(b, generator=generator, dtype=torch.float64) * (h - ch + 1).clamp(min=1)).long()
        left = (torch.rand(b, generator=generator, dtype=torch.float64) * (w - cw + 1).clamp(min=1)).long()
        fits = (~done) & (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        tops, lefts = torch.where(fits, top, tops), torch.where(fits, left, lefts)
        heights, widths = torch.where(fits, ch, heights), torch.where(fits, cw, widths)
        done |= fits
    if not done.all():  # the fallback: the whole image at the nearest allowed aspect ratio, centred
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, round(w / ratio[0])
        elif in_ratio > ratio[1]:
            cw, ch = round(h * ratio[1]), h
        else:
            cw, ch = w, h
        rest = ~done
        heights[rest], widths[rest] = ch, cw
        tops[rest], lefts[rest] = (h - ch) // 2, (w - cw) // 2
    return tops, lefts, heights, widths


def _resample_axis(x, axis: int, start, length, size: int, reverse=None):
    """Bilinear resampling (half-pixel centres, edges clamped to the crop) of the crop ``[start, start + length)``
    of every image along ``axis`` (1: rows, 2: columns of ``(B, H, W, C)``) to ``size`` samples, mirrored where
    ``reverse``: what resizing the cropped image does, without antialiasing."""
    import torch

    b = x.shape[0]
    centres = start[:, None] + (torch.arange(size, dtype=torch.float64) + 0.5) * length[:, None] / size - 0.5
    centres = torch.minimum(torch.maximum(centres, start[:, None].double()), (start + length - 1)[:, None].double())
    if reverse is not None:
        centres = torch.where(reverse[:, None], centres.flip(1), centres)
    low = centres.floor().long()
    high = torch.minimum(low + 1, (start + length - 1)[:, None])
    frac = (centres - low).float()
    batch_index = torch.arange(b)[:, None, None]
    if axis == 1:
        lanes = torch.arange(x.shape[2])[None, None, :]
        pick = lambda rows: x[batch_index, rows[:, :, None], lanes]  # noqa: E731
        return pick(low) * (1 - frac[:, :, None, None]) + pick(high) * frac[:, :, None, None]
    lanes = torch.arange(x.shape[1])[None, :, None]
    pick = lambda cols: x[batch_index, lanes, cols[:, None, :]]  # noqa: E731
    return pick(low) * (1 - frac[:, None, :, None]) + pick(high) * frac[:, None, :, None]


def augment_resized_crop(batch, generator):
    """CoOp's training augmentation on an ``(B, H, W, C)`` tensor: a random resized crop (:func:`resized_crop_boxes`)
    back to ``H x W`` and a random horizontal flip, per image: the crop resized bilinearly with half-pixel centres
    (no antialiasing: torchvision's PIL resize antialiases a crop it shrinks, so a large box differs slightly)."""
    import torch

    b, h, w, _ = batch.shape
    top, left, height, width = resized_crop_boxes(b, h, w, generator)
    flip = torch.rand(b, generator=generator) < 0.5
    x = batch.float()
    x = _resample_axis(x, 2, left, width, w, reverse=flip)
    x = _resample_axis(x, 1, top, height, h)
    return x.round().clamp(0, 255).to(batch.dtype) if not batch.dtype.is_floating_point else x.to(batch.dtype)


AUGMENTATIONS = {"crop": augment, "resized_crop": augment_resized_crop}


def model_identity(model) -> str:
    """The model's class and a digest of its state shapes, plus its ``checkpoint_key`` when it has one (a digest of
    what it depends on outside its ``state_dict``, e.g. a frozen backbone held outside the module tree)."""
    shapes = [(name, tuple(p.shape)) for name, p in model.state_dict().items()]
    key = getattr(model, "checkpoint_key", None)
    return f"{type(model).__name__} {hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]}" + (f" {key}" if key else "")


def _identity(model, objective: Objective) -> dict[str, str]:
    """:func:`model_identity` and the objective's name and parameters: a checkpoint resumes only into the same
    model and objective."""
    return {"model": model_identity(model),
            "objective": f"{objective.name} {json.dumps(objective.get_params(deep=False), sort_keys=True, default=repr)}"}


def _data_fingerprint(images: np.ndarray, labels: np.ndarray, outliers: np.ndarray | None) -> str:
    """sha256 of the training images, labels and outliers: a checkpoint resumes only on the data it was trained
    on (the same images with other labels, e.g. another label-noise draw, are other data)."""
    digest = hashlib.sha256()
    for array in (images, labels, outliers):
        if array is not None:
            digest.update(repr((array.shape, str(array.dtype))).encode())
            digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()[:16]


def _save_atomic(state: dict, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _check_outliers(outliers: Any, train_images: np.ndarray, objective: Objective) -> np.ndarray | None:
    if Need.OUTLIERS not in objective.needs:
        if outliers is not None:
            raise ValueError(f"finetune: objective {objective.name!r} uses no outliers, but outliers were given")
        return None
    if outliers is None:
        raise ValueError(f"finetune: objective {objective.name!r} needs auxiliary outliers; pass outliers=<images>")
    images, labels = _as_images(outliers, "finetune: outliers")
    if images.shape[1:] != train_images.shape[1:]:
        raise ValueError(f"finetune: outlier images are {images.shape[1:]} but the training images "
                         f"{train_images.shape[1:]}; resize them the same way")
    if images.dtype != train_images.dtype:
        raise ValueError(f"finetune: outliers are {images.dtype} but the training images {train_images.dtype}")
    from ..data.spec import count_shared

    shared = count_shared(train_images, images)
    if shared == len(images):
        raise ValueError(f"finetune: all {len(images)} outlier images are ID training images; pass auxiliary "
                         "outliers from other classes (e.g. tin_aux_train.npz)")
    if shared:
        import warnings

        warnings.warn(f"finetune: {shared} of {len(images)} outlier images are also ID training images",
                      stacklevel=3)
    return images


def finetune(model: Any, train: Any, objective: Objective | str, outliers: Any = None, *, epochs: int = 10,
             lr: float = 0.001, batch_size: int = 128, outlier_batch_size: int | None = None,
             schedule: str = "cosine", momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0,
             device: str = "cpu", checkpoint_dir: str | Path | None = None, preprocess: Callable | None = None,
             augmentation: bool | str = True, copy: bool = True, progress: bool = True,
             max_steps: int | None = None, nesterov: bool = True, warmup_epochs: int = 0,
             warmup_lr: float = 1e-5) -> tuple[Any, History]:
    """Fine-tune ``model`` on ``train = (images, labels)`` with ``objective``; returns ``(model, history)``.

    Args:
        model: a torch classifier returning logits; trained as a copy unless ``copy=False``.
        train: ID images (uint8 ``N x H x W x C``, the ``.npz`` layout, or float ``N x C x H x W``) and labels.
        objective: a registered training objective (``oodscope.available(family="training")``) or its name.
        outliers: auxiliary outlier images of the same size, for objectives that declare ``Need.OUTLIERS``.
        epochs: passes over the ID training images.
        lr: SGD's learning rate (Nesterov momentum).
        batch_size: ID images per step.
        outlier_batch_size: outliers per step (default ``2 * batch_size``, as in OE's code).
        schedule: ``"cosine"`` (per step, to 0) or ``"constant"``.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        seed: data order, augmentation, outlier draws.
        device: ``"cpu"``, ``"cuda"``, ... (AMP on CUDA).
        checkpoint_dir: where the per-epoch checkpoint lives; a rerun resumes from it.
        preprocess: maps a raw image batch tensor to the model input (e.g. the model's ``ImageNormalize``).
        augmentation: ``True`` or ``"crop"``: random crop (padding 4) and horizontal flip of channels-last images
            (the CIFAR recipe); ``"resized_crop"``: CoOp's random resized crop (scale 0.08-1) and flip;
            ``False``: none.
        max_steps: stop each epoch after this many steps (for short CPU schedules; part of the checkpoint identity).
        nesterov: Nesterov momentum (default) or plain momentum (CoOp's SGD).
        warmup_epochs: the first epochs run at the constant ``warmup_lr``, the schedule's later steps unchanged
            (CoOp's constant warm-up epoch before its cosine decay); 0 (default): no warm-up.
        warmup_lr: the learning rate of the warm-up epochs.
        copy: train a copy of ``model`` (default) or ``model`` itself.
        progress: show a progress bar per epoch with the loss terms.
    """
    import torch
    from tqdm.auto import tqdm

    objective = get(objective)() if isinstance(objective, str) else objective
    if not isinstance(objective, Objective):
        raise ValueError(f"finetune: objective must be a training objective, got {type(objective).__name__}; "
                         f"choose from oodscope.available(family='training')")
    objective.check_params()
    images, labels = _as_images(train, "finetune: training images")
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    n_classes = linear[-1].out_features if linear else None  # the classifier head: the last linear layer
    labels = _check_labels(labels, len(images), n_classes)
    outlier_images = _check_outliers(outliers, images, objective)
    if not (isinstance(epochs, int) and epochs >= 1 and batch_size >= 1 and lr > 0):
        raise ValueError(f"finetune: need epochs >= 1, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"finetune: schedule must be 'cosine' or 'constant', got {schedule!r}")
    if not (isinstance(warmup_epochs, int) and 0 <= warmup_epochs <= epochs and warmup_lr > 0):
        raise ValueError(f"finetune: need 0 <= warmup_epochs <= epochs and warmup_lr > 0, got {warmup_epochs}, "
                         f"{warmup_lr}")
    outlier_batch_size = outlier_batch_size or 2 * batch_size
    outliers_drawn = objective.outliers_per_step(batch_size, outlier_batch_size)
    channels_last = _channels_last(images)
    name = ("crop" if augmentation else None) if isinstance(augmentation, (bool, np.bool_)) else augmentation
    if name is not None and not (isinstance(name, str) and name in AUGMENTATIONS):
        raise ValueError(f"finetune: augmentation must be True, False or one of {sorted(AUGMENTATIONS)}, got "
                         f"{augmentation!r}")
    augment_batch = None if name is None else AUGMENTATIONS[name]
    if augmentation and not channels_last:
        raise ValueError("finetune: augmentation works on channels-last (N, H, W, C) images; pass those or "
                         "augmentation=False")

    model = copying.deepcopy(model) if copy else model
    model.to(device)
    with torch.random.fork_rng(devices=[]):  # a head's random initialisation: seeded, the caller's RNG untouched
        torch.manual_seed(seed)
        model = objective.adapt(model, n_classes, (images, labels), preprocess)
    model.to(device)  # a head the objective put in place
    prep = preprocess if preprocess is not None else (lambda batch: batch.float())
    if hasattr(prep, "to"):
        prep = prep.to(device)
    fingerprint = _data_fingerprint(images, labels, outlier_images)
    if outlier_images is not None:  # on the adapted, untrained model: a resumed run selects the same outliers
        outlier_images = objective.prepare_outliers(model, (images, labels), outlier_images, prep, seed)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    if max_steps is not None:
        steps_per_epoch = min(steps_per_epoch, int(max_steps))
    total_steps = epochs * steps_per_epoch
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov,
                                weight_decay=weight_decay)
    decay = (lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))) if schedule == "cosine" else \
        (lambda step: 1.0)
    warmup_steps = warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: warmup_lr / lr if step < warmup_steps else decay(step))
    data_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    out_gen = torch.Generator().manual_seed(seed + 2)
    history = History()
    identity = {**_identity(model, objective), "schedule": f"{epochs}x{steps_per_epoch} {schedule} lr={lr} "
                f"bs={batch_size}/{outliers_drawn} wd={weight_decay} seed={seed} aug={augmentation}"
                + ("" if nesterov else " nesterov=False")
                + (f" warmup={warmup_epochs}@{warmup_lr}" if warmup_epochs else ""), "data": fingerprint}
    path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT
    start_epoch = 0
    if path is not None and path.exists():
        start_epoch = _resume(path, identity, model, optimiser, scheduler, (data_gen, aug_gen, out_gen), history)

    ids = torch.utils.data.TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
    scaler = torch.amp.GradScaler("cuda") if str(device).startswith("cuda") else None
    captured = _FeatureCapture(model, objective)
    with torch.random.fork_rng(devices=[]), captured:
        torch.manual_seed(seed)
        for epoch in range(start_epoch, epochs):
            loader = torch.utils.data.DataLoader(ids, batch_size=batch_size, shuffle=True, generator=data_gen)
            model.train()
            sums: dict[str, float] = {}
            steps, seen = 0, 0
            started = time.perf_counter()
            bar = tqdm(loader, total=steps_per_epoch, desc=f"{objective.name} epoch {epoch + 1}/{epochs}",
                       disable=not progress, leave=False)
            for step, (x, y) in enumerate(bar):
                if step >= steps_per_epoch:
                    break
                x_out = None
                if outlier_images is not None:
                    pick = torch.randint(0, len(outlier_images), (outliers_drawn,), generator=out_gen)
                    x_out = torch.from_numpy(outlier_images[pick.numpy()])
                if augment_batch is not None:
                    x = augment_batch(x, aug_gen)
                    x_out = None if x_out is None else augment_batch(x_out, aug_gen)
                if x_out is not None:
                    x_out = objective.select_outliers(x, x_out, model, prep, out_gen)
                inputs, context = objective.batch(x, x_out, aug_gen)
                y = y.to(device)
                inputs = objective.extend_inputs(model, prep(inputs.to(device)), y, aug_gen, epoch / epochs)
                with torch.autocast("cuda", enabled=scaler is not None):
                    logits = model(inputs)
                    total, terms = objective.loss(logits[:len(x)], y,
                                                  logits[len(x):] if len(inputs) > len(x) else None, **context,
                                                  **captured.split(len(x), len(inputs)))
                if not torch.isfinite(total):
                    raise FloatingPointError(f"finetune: the {objective.name} loss is {float(total.detach())} at epoch "
                                             f"{epoch + 1}, step {step + 1}; lower lr (now {lr})"
                                             + (f"; the last good checkpoint is {path}" if path else ""))
                optimiser.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(total).backward()
                    scaler.step(optimiser)
                    scaler.update()
                else:
                    total.backward()
                    optimiser.step()
                scheduler.step()
                steps, seen = steps + 1, seen + len(x)
                for key, value in {"loss": float(total.detach()), **terms}.items():
                    sums[key] = sums.get(key, 0.0) + value
                bar.set_postfix({k: f"{v / steps:.4f}" for k, v in sums.items()})
            history.epochs.append({k: v / max(steps, 1) for k, v in sums.items()})
            history.epochs[-1].update(objective.end_epoch(model, (images, labels), prep))  # e.g. SCONE's multipliers
            history.seconds.append(time.perf_counter() - started)
            history.images += seen
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                _save_atomic({"identity": identity, "epoch": epoch + 1, "model": model.state_dict(),
                              "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                              "generators": [g.get_state() for g in (data_gen, aug_gen, out_gen)],
                              "history": json.dumps({"epochs": history.epochs, "seconds": history.seconds,
                                                     "images": history.images})}, path)
    model = objective.deploy(model)
    model.eval()
    return model, history


class _FeatureCapture:
    """For an objective with ``needs_features``: a forward pre-hook on ``objective.feature_module(model)`` keeps
    the module's input of the last forward pass (with its gradient); :meth:`split` hands it to ``loss`` as
    ``features`` (the ID rows) and ``outlier_features`` (the rest, when the step has outliers). Likewise, for an
    objective whose ``feature_map_module(model)`` names a module, a forward hook keeps that module's output, handed
    to ``loss`` as ``feature_map`` and ``outlier_feature_map``. A no-op otherwise."""

    def __init__(self, model, objective: Objective):
        self.module = model.get_submodule(objective.feature_module(model)) if objective.needs_features else None
        map_name = objective.feature_map_module(model)
        self.map_module = None if map_name is None else model.get_submodule(map_name)
        self.seen: dict[str, Any] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> "_FeatureCapture":
        if self.module is not None:
            self.handles.append(self.module.register_forward_pre_hook(
                lambda _m, args: self.seen.__setitem__("x", args[0])))
        if self.map_module is not None:
            self.handles.append(self.map_module.register_forward_hook(
                lambda _m, _args, output: self.seen.__setitem__("map", output)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def split(self, n_id: int, n_inputs: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, key, module in (("features", "x", self.module), ("feature_map", "map", self.map_module)):
            if module is not None:
                seen = self.seen.pop(key)
                out[name] = seen[:n_id]
                if n_inputs > n_id:
                    out[f"outlier_{name}"] = seen[n_id:]
        return out


def _resume(path: Path, identity: dict, model, optimiser, scheduler, generators, history: History) -> int:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a corrupt or foreign file: say which
        raise ValueError(f"finetune: cannot read checkpoint {path} ({type(error).__name__}); delete it to start "
                         "over") from None
    saved = state.get("identity", {}) if isinstance(state, dict) else {}
    for key in ("model", "objective", "schedule", "data"):
        if saved.get(key) != identity[key]:
            raise ValueError(f"finetune: checkpoint {path} was written for {key} {saved.get(key)!r}, not "
                             f"{identity[key]!r}; use another checkpoint_dir or delete it")
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    scheduler.load_state_dict(state["scheduler"])
    for generator, saved_state in zip(generators, state["generators"]):
        generator.set_state(saved_state)
    past = json.loads(state["history"])
    history.epochs, history.seconds, history.images = past["epochs"], past["seconds"], past["images"]
    return int(state["epoch"])

