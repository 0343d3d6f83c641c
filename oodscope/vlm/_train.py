"""The training loop shared by the prompt-learning detectors (CLIPN, LoCoOp): seeded mini-batches, a learning rate
per epoch, a tqdm bar (silent off a terminal), the mean loss per epoch."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch


def cosine_rates(lr: float, epochs: int, warmup: float | None = None) -> list[float]:
    """``lr_e = lr (1 + cos(pi e / E)) / 2`` for ``e = 0 .. E - 1``; with ``warmup``, epoch 0 runs at ``warmup``
    instead (CoOp's constant warm-up epoch)."""
    rates = [0.5 * lr * (1 + np.cos(np.pi * epoch / epochs)) for epoch in range(epochs)]
    return rates if warmup is None else [warmup] + rates[1:]


def run_epochs(step: Callable[[torch.Tensor], torch.Tensor], optimiser: torch.optim.Optimizer, n: int,
               batch_size: int, rates: Sequence[float], generator: torch.Generator, device: torch.device,
               desc: str) -> list[float]:
    """Minimise ``step(batch)`` (the loss of the sample indices ``batch``, on ``device``) for ``len(rates)`` epochs.

    Each epoch sets every parameter group's learning rate to ``rates[epoch]``, draws a permutation of the ``n``
    samples from ``generator`` and takes one optimiser step per batch of ``batch_size``. ``step`` may draw from the
    same generator (after the epoch's permutation). Returns the sample-weighted mean loss of each epoch.
    """
    from tqdm.auto import tqdm

    history = []
    for rate in tqdm(rates, desc=desc, unit="epoch", leave=False, disable=None):
        for group in optimiser.param_groups:
            group["lr"] = rate
        total = 0.0
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            loss = step(batch.to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        history.append(total / n)
    return history
