"""Training and evaluation of the family's density networks (PixelCNN, RealNVP, the hierarchical VAE).

A density network here is an ``nn.Module`` with ``bits_per_dim(images, generator=None)``: its training loss in
bits per dimension on a uint8 ``(N, C, H, W)`` batch (the exact NLL of a PixelCNN, the dequantised NLL of a flow,
the negative ELBO of a VAE), ``generator`` supplying any noise it draws. A network whose loss changes over the
schedule (a VAE's KL warm-up) also has ``training_loss(images, generator=None, progress=0..1)``, which training
then minimises instead; its ``loss_name`` (default ``"bits_per_dim"``) names the loss in the training log.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TrainingLog:
    """Mean training loss per epoch (bits/dim for the likelihood models), seconds per epoch."""

    loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def train(model: torch.nn.Module, images: np.ndarray, *, epochs: int, batch_size: int, lr: float, seed: int,
          device: str = "cpu", perturb: float = 0.0, desc: str = "pixelcnn", checkpoint=None) -> TrainingLog:
    """Adam on ``model.bits_per_dim`` of shuffled mini-batches of uint8 ``(N, C, H, W)`` images, seeded (torch's global RNG is
    forked), on ``device``, with a progress bar per epoch (off when not a terminal). ``perturb > 0`` replaces each
    pixel-channel value with a uniform random one with that probability (the background model of Ren et al.).
    With ``checkpoint`` (a path) the state after each epoch is saved atomically and a rerun resumes from it."""
    from tqdm.auto import tqdm

    from ..extraction.extract import resolve_device

    target = resolve_device(device)
    data = torch.from_numpy(np.ascontiguousarray(images))
    log = TrainingLog()
    start_epoch = 0
    with torch.random.fork_rng(devices=[]):
        generator = torch.Generator().manual_seed(int(seed))
        model.to(target)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        if checkpoint is not None and os.path.exists(checkpoint):
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            optimiser.load_state_dict(state["optimiser"])
            generator.set_state(state["generator"])
            log = TrainingLog(list(state["loss"]), list(state["seconds"]))
            start_epoch = len(log.loss)
        model.train()
        for epoch in range(start_epoch, epochs):
            started, total = time.perf_counter(), 0.0
            order = torch.randperm(len(data), generator=generator)
            bar = tqdm(range(0, len(data), batch_size), desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False,
                       disable=None)
            for begin in bar:
                batch = data[order[begin:begin + batch_size]]
                if perturb > 0:
                    replace = torch.rand(batch.shape, generator=generator) < perturb
                    noise = torch.randint(0, 256, batch.shape, generator=generator, dtype=torch.uint8)
                    batch = torch.where(replace, noise, batch)
                if hasattr(model, "training_loss"):  # a loss that changes over training (a VAE's KL warm-up)
                    progress = (epoch + begin / len(data)) / epochs
                    loss = model.training_loss(batch.to(target), generator=generator, progress=progress).mean()
                else:
                    loss = model.bits_per_dim(batch.to(target), generator=generator).mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: the loss is {float(loss.detach())} at epoch {epoch + 1}; "
                                             f"lower lr (now {lr})")
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(batch)
                bar.set_postfix(bpd=f"{float(loss.detach()):.3f}")
            log.loss.append(total / len(data))
            log.seconds.append(time.perf_counter() - started)
            if checkpoint is not None:
                tmp = f"{checkpoint}.{os.getpid()}.tmp"
                torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                            "generator": generator.get_state(), "loss": log.loss,
                            "seconds": log.seconds}, tmp)
                os.replace(tmp, checkpoint)
    model.to("cpu").eval()
    return log


def evaluate_bits_per_dim(model: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Bits/dim of each uint8 ``(N, C, H, W)`` image (CPU, no gradient, float64 out)."""
    out = []
    model.eval()
    with torch.no_grad():
        for begin in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[begin:begin + batch_size]))
            out.append(model.bits_per_dim(batch).double().numpy())
    return np.concatenate(out)
