"""The training loop shared by the prompt-learning detectors CLIPN and CLIP-AD's SDP+ (LoCoOp trains through
:func:`oodscope.training.finetune` instead): seeded mini-batches, a learning rate per epoch, a tqdm bar with the loss
(silent off a terminal), the mean loss per epoch, a clear error on a non-finite loss, and an optional checkpoint
after every epoch from which an interrupted fit resumes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch


def cosine_rates(lr: float, epochs: int) -> list[float]:
    """``lr_e = lr (1 + cos(pi e / E)) / 2`` for ``e = 0 .. E - 1``."""
    return [0.5 * lr * (1 + np.cos(np.pi * epoch / epochs)) for epoch in range(epochs)]


def run_epochs(step: Callable[[torch.Tensor], torch.Tensor], optimiser: torch.optim.Optimizer, n: int,
               batch_size: int, rates: Sequence[float], generator: torch.Generator, device: torch.device,
               desc: str, checkpoint: str | os.PathLike | None = None, key: str = "") -> list[float]:
    """Minimise ``step(batch)`` (the loss of the sample indices ``batch``, on ``device``) for ``len(rates)`` epochs.

    Each epoch sets every parameter group's learning rate to ``rates[epoch]`` (times the group's ``lr_scale``,
    default 1), draws a permutation of the ``n``
    samples from ``generator`` and takes one optimiser step per batch of ``batch_size``. ``step`` may draw from the
    same generator (after the epoch's permutation). Returns the sample-weighted mean loss of each epoch. A
    non-finite loss stops the fit with ``FloatingPointError`` (never trained-on NaN weights).

    With ``checkpoint`` (a path), the optimised tensors, the optimiser's and the generator's states and the losses
    are saved atomically after every epoch, and a rerun of the same fit resumes after the last saved epoch with the
    same result as an uninterrupted run. The file is keyed by ``key`` (the caller's digest of its data), the
    schedule and the tensors' starting values; a checkpoint of another fit is refused.
    """
    from tqdm.auto import tqdm

    params = [p for group in optimiser.param_groups for p in group["params"]]
    fingerprint = _fingerprint(desc, n, batch_size, rates, key, params)
    history: list[float] = []
    if checkpoint is not None and os.path.exists(checkpoint):
        history = _resume(Path(checkpoint), fingerprint, params, optimiser, generator, desc)
    bar = tqdm(total=len(rates), initial=len(history), desc=desc, unit="epoch", leave=False, disable=None)
    for epoch in range(len(history), len(rates)):
        for group in optimiser.param_groups:  # a group's "lr_scale" (default 1) scales the epoch's rate for it
            group["lr"] = float(rates[epoch]) * float(group.get("lr_scale", 1.0))  # numpy floats break the checkpoint
        total = 0.0
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            loss = step(batch.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the loss is {float(loss.detach())} at epoch {epoch + 1}; "
                                         f"lower the learning rate (now {rates[epoch]:g})")
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        history.append(total / n)
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if checkpoint is not None:
            _save(Path(checkpoint), fingerprint, params, optimiser, generator, history)
    bar.close()
    return history


def digest_arrays(*arrays: np.ndarray) -> str:
    """One digest of the arrays a fit trains on (dtype, shape and bytes of each), the ``key`` of its checkpoint."""
    from ..extraction.cache import digest_array

    return hashlib.sha256("".join(digest_array(np.asarray(a)) for a in arrays).encode()).hexdigest()


def _fingerprint(desc: str, n: int, batch_size: int, rates: Sequence[float], key: str,
                 params: list[torch.Tensor]) -> str:
    digest = hashlib.sha256(repr((desc, n, batch_size, [float(r) for r in rates], key)).encode())
    for p in params:
        digest.update(repr((tuple(p.shape), str(p.dtype))).encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save(path: Path, fingerprint: str, params: list[torch.Tensor], optimiser: torch.optim.Optimizer,
          generator: torch.Generator, history: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"fingerprint": fingerprint, "params": [p.detach().cpu() for p in params],
                "optimiser": optimiser.state_dict(), "generator": generator.get_state(),
                "history": torch.tensor(history, dtype=torch.float64)}, tmp)
    os.replace(tmp, path)


def _resume(path: Path, fingerprint: str, params: list[torch.Tensor], optimiser: torch.optim.Optimizer,
            generator: torch.Generator, desc: str) -> list[float]:
    from ..safeio import load_torch

    state = load_torch(path, what=f"{desc} checkpoint")
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise ValueError(f"{desc}: checkpoint {path} belongs to another fit (other data, settings or seed); "
                         "delete it or pass another checkpoint path")
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved.to(p.device))
    optimiser.load_state_dict(state["optimiser"])
    generator.set_state(state["generator"])
    return [float(v) for v in state["history"]]
