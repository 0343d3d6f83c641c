"""Fine-tuning the whole transformer classifier, resumable, for slow or shared machines.

:func:`finetune_full` trains every parameter of a :class:`~oodscope.text.model.TextClassifier` (embeddings, all
blocks, head) with cross-entropy and Adam, the usual BERT-style recipe and the setting of BLOOD (Jelenić et al.,
ICLR 2024: the whole pre-trained transformer fine-tuned on the ID task, dropout on, constant-rate Adam). Batches
are made of texts of similar length (sorted by length, cut into batches, batch order shuffled per epoch by a
seeded generator), so little time goes into padding.

Resumable: with ``checkpoint`` set, the full training state (weights, Adam moments, step, the torch RNG that
drives dropout) is written there every ``every`` steps, atomically (a temporary file, then ``os.replace``); a
later call with the same arguments continues from it and ends with exactly the weights of an uninterrupted run
(same batches, same dropout masks). A checkpoint written with other settings is refused, not silently reused.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn


def batch_plan(lengths: np.ndarray, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Indices of every training step: length-sorted batches, their order shuffled per epoch (seeded)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    generator = torch.Generator().manual_seed(int(seed))
    plan = []
    for _ in range(epochs):
        plan.extend(batches[k] for k in torch.randperm(len(batches), generator=generator).tolist())
    return plan


def _atomic_save(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _resume(path: Path | None, settings: str, model: nn.Module, optimizer: torch.optim.Optimizer, who: str,
            total: int, log: Callable[[str], None] | None) -> tuple[int, list[float]]:
    """``(step, losses)`` of the checkpoint at ``path`` (weights, optimizer and RNG restored), or ``(0, [])``."""
    if path is None or not path.exists():
        return 0, []
    from ..safeio import load_torch

    # weights_only: a checkpoint is tensors and plain values (the RNG state is a uint8 tensor), so a planted
    # file cannot run code on resume
    state = load_torch(path, f"{who} checkpoint")
    if not isinstance(state, dict) or not {"settings", "model", "optimizer", "rng", "step", "losses"} <= set(state):
        raise ValueError(f"{who}: {path} is not a checkpoint of {who}; delete it to start over")
    if state.get("settings") != settings:
        raise ValueError(f"{who}: checkpoint {path} was written with other settings or data "
                         f"({state.get('settings')} vs {settings}); delete it to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if log is not None:
        log(f"{who}: resumed at step {state['step']}/{total} from {path}")
    return state["step"], state["losses"]


def _checkpoint(path: Path | None, settings: str, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                losses: list[float]) -> None:
    if path is not None:
        _atomic_save({"settings": settings, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "rng": torch.get_rng_state(), "step": int(step), "losses": [float(v) for v in losses]}, path)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, n_steps: int, step: int, losses: list[float],
           loss_at: Callable[[int], torch.Tensor], path: Path | None, settings: str, every: int, who: str,
           log: Callable[[str], None] | None) -> nn.Module:
    """Optimizer steps ``step .. n_steps - 1`` on ``loss_at(step)``, checkpointing every ``every`` steps; the model
    ends frozen and in eval mode, also when interrupted. A tqdm bar (from the resumed step, the loss in the postfix;
    off when not a terminal) shows the progress."""
    from tqdm.auto import tqdm

    bar = tqdm(total=n_steps, initial=step, desc=who, unit="step", leave=False, disable=None)
    try:
        while step < n_steps:
            loss = loss_at(step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.item()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            if step % every == 0 or step == n_steps:
                _checkpoint(path, settings, model, optimizer, step, losses)
                if log is not None:
                    log(f"{who}: step {step}/{n_steps}, mean loss of the last {every}: {np.mean(losses[-every:]):.4f}")
    finally:
        bar.close()
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are: training runs there (the caller's model is not moved)."""
    return next(model.parameters()).device


def _own_rng(function):
    """Run ``function`` inside a fork of torch's global RNG: it seeds that RNG (head init, dropout masks, restored
    on resume) for reproducibility, and the caller's RNG state is what it was afterwards."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return function(*args, **kwargs)
    return wrapper


def _reset_head(model: nn.Module, seed: int, train_encoder: bool) -> None:
    """Seed torch, give the head a fresh Xavier-normal weight and zero bias, and (un)freeze the encoder."""
    torch.manual_seed(int(seed))
    with torch.no_grad():
        nn.init.xavier_normal_(model.head.weight)
        model.head.bias.zero_()
    for p in model.parameters():
        p.requires_grad_(train_encoder)


@_own_rng
def finetune_full(model: nn.Module, tokens: np.ndarray, labels: np.ndarray, epochs: int = 10, lr: float = 2e-5,
                  head_lr: float | None = None, batch_size: int = 32, seed: int = 0, dropout: bool = True,
                  checkpoint: str | Path | None = None, every: int = 25,
                  log: Callable[[str], None] | None = None) -> nn.Module:
    """Train all parameters of ``model`` (a ``TextClassifier``) on ``(tokens, labels)``; returns it in eval mode.

    The defaults are the BLOOD authors' recipe (their ``TransformerClassifier.train_loop``: Adam at 2e-5 for
    every parameter, 10 epochs, batch 32, length-sorted batches in shuffled order). The head starts from a seeded
    Xavier-normal initialisation (as in their classifier) and learns at ``head_lr`` (``None``: ``lr``); a larger
    head rate helps much shorter schedules. ``dropout`` keeps the encoder's dropout on while training.
    """
    head_lr = lr if head_lr is None else head_lr
    tokens = np.asarray(tokens)
    labels = np.asarray(labels, dtype=np.int64)
    if len(tokens) != len(labels):
        raise ValueError(f"finetune_full: {len(tokens)} token rows but {len(labels)} labels")
    n_classes = model.head.out_features
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"finetune_full: labels must lie in [0, {n_classes}), got [{labels.min()}, {labels.max()}]")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("every", every)):
        if not (isinstance(value, (int, np.integer)) and value >= 1):
            raise ValueError(f"finetune_full: {name} must be a positive integer, got {value!r}")
    settings = repr((epochs, lr, head_lr, batch_size, seed, dropout, len(tokens),
                     hashlib.sha256(tokens.tobytes() + labels.tobytes()).hexdigest()[:16]))
    plan = batch_plan(tokens[:, 1].sum(axis=1), batch_size, epochs, seed)
    _reset_head(model, seed, train_encoder=True)
    head = set(id(p) for p in model.head.parameters())
    optimizer = torch.optim.Adam([{"params": [p for p in model.parameters() if id(p) not in head], "lr": lr},
                                  {"params": list(model.head.parameters()), "lr": head_lr}])
    path = Path(checkpoint) if checkpoint is not None else None
    step, losses = _resume(path, settings, model, optimizer, "finetune_full", len(plan), log)
    device = _device_of(model)
    tokens_t, labels_t = torch.as_tensor(tokens).to(device), torch.as_tensor(labels).to(device)
    model.train(dropout)

    def loss_at(k: int) -> torch.Tensor:
        index = torch.as_tensor(plan[k]).to(device)
        return nn.functional.cross_entropy(model(tokens_t[index]), labels_t[index])

    return _train(model, optimizer, len(plan), step, losses, loss_at, path, settings, every, "finetune_full", log)


# -- the cheap variant for CPUs: the last block trained for the [CLS] output only --------------------------------
def lower_states(model: nn.Module, tokens: np.ndarray, first: int, chunk: int = 256,
                 store: str | Path | None = None, log: Callable[[str], None] | None = None
                 ) -> list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Token states entering block ``first`` (embeddings, then blocks ``0 .. first-1``), frozen, in eval mode.

    Returns ``[(index, states, mask), ...]`` over length-sorted chunks of ``chunk`` texts, each trimmed to its
    longest text. With ``store`` (a folder), every chunk is saved there atomically when computed and read back
    on a later call: an interrupted run resumes chunk by chunk. The blocks run where the model is; the states are
    kept on the CPU.
    """
    from .model import extended_mask

    tokens = np.asarray(tokens)
    order = np.argsort(tokens[:, 1].sum(axis=1), kind="stable")
    folder = Path(store) if store is not None else None
    out = []
    for number, start in enumerate(range(0, len(order), chunk)):
        index = order[start:start + chunk]
        path = folder / f"chunk-{number:05d}.pt" if folder is not None else None
        if path is not None and path.exists():
            from ..safeio import load_torch

            saved = load_torch(path, "lower_states chunk")
            if isinstance(saved, dict) and np.array_equal(saved["index"].numpy(), index):
                out.append((index, saved["states"], saved["mask"]))
                continue
        ids, mask = model.split_tokens(torch.as_tensor(tokens[index]).to(_device_of(model)))
        with torch.no_grad():
            states = model.encoder.embeddings(input_ids=ids)
            additive = extended_mask(mask, states.dtype)
            for block in model.blocks[:first]:
                result = block(states, attention_mask=additive)
                states = result[0] if isinstance(result, (tuple, list)) else result
        states, mask = states.cpu(), mask.cpu()
        out.append((index, states, mask))
        if path is not None:
            _atomic_save({"index": torch.as_tensor(index), "states": states, "mask": mask}, path)
        if log is not None and (number + 1) % 10 == 0:
            log(f"lower_states: {start + len(index)}/{len(order)} texts")
    return out


def cls_top(model: nn.Module, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[CLS]`` output ``(B, H)`` of the last block given the token states entering it: keys and values of every
    token, the query of ``[CLS]`` only (the rest of the last block's output does not reach a ``[CLS]`` head)."""
    from .model import _cls_block, extended_mask

    block = model.blocks[-1]
    kv = (block.attention.self.key(states), block.attention.self.value(states))
    return _cls_block(block, states[:, 0], kv, extended_mask(mask, states.dtype), 0)


@_own_rng
def finetune_last_cls(model: nn.Module, chunks: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]],
                      labels: np.ndarray, epochs: int = 3, lr: float = 1e-4, head_lr: float = 1e-3,
                      batch_size: int = 32, seed: int = 0, checkpoint: str | Path | None = None, every: int = 50,
                      log: Callable[[str], None] | None = None) -> nn.Module:
    """Train the last block and the head of a ``pooling="cls"`` classifier on :func:`lower_states` chunks.

    Cross-entropy, Adam (``lr`` for the block, ``head_lr`` for the seeded Xavier-initialised head), mini-batches
    inside the length-sorted chunks visited in a seeded order, dropout off. Resumable like
    :func:`finetune_full` (checkpoint every ``every`` steps, written atomically).
    """
    if getattr(model, "pooling", None) != "cls":
        raise ValueError("finetune_last_cls trains a [CLS] classifier: build TextClassifier(..., pooling='cls')")
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    pieces = [(c, s) for c, (index, _, _) in enumerate(chunks) for s in range(0, len(index), batch_size)]
    generator = torch.Generator().manual_seed(int(seed))
    plan = [pieces[k] for _ in range(epochs) for k in torch.randperm(len(pieces), generator=generator).tolist()]
    settings = repr(("last-cls", epochs, lr, head_lr, batch_size, seed, len(labels_t),
                     hashlib.sha256(np.asarray(labels, np.int64).tobytes()).hexdigest()[:16]))
    _reset_head(model, seed, train_encoder=False)
    block_params = list(model.blocks[-1].parameters())
    for p in block_params + list(model.head.parameters()):
        p.requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": block_params, "lr": lr},
                                  {"params": list(model.head.parameters()), "lr": head_lr}])
    path = Path(checkpoint) if checkpoint is not None else None
    step, losses = _resume(path, settings, model, optimizer, "finetune_last_cls", len(plan), log)
    model.eval()
    device = _device_of(model)
    labels_t = labels_t.to(device)

    def loss_at(k: int) -> torch.Tensor:
        chunk, start = plan[k]
        index, states, mask = chunks[chunk]
        x, m = states[start:start + batch_size].to(device), mask[start:start + batch_size].to(device)
        return nn.functional.cross_entropy(model.head(cls_top(model, x, m)),
                                           labels_t[torch.as_tensor(index[start:start + batch_size]).to(device)])

    return _train(model, optimizer, len(plan), step, losses, loss_at, path, settings, every, "finetune_last_cls", log)
