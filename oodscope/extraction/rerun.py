"""Running the network again, for the few methods that must (input perturbation, gradients).

Detectors that declare ``Need.MODEL`` get :class:`~oodscope.extraction.outputs.ModelSource` from
``Outputs.source`` (attached by :func:`oodscope.extract`, also when it read the cache). These helpers iterate
over its inputs in batches, preprocessed and on the right device, with a :class:`~.extract.Probe` that returns
logits, penultimate features and named layers with autograd enabled.

Typical use (ODIN-style, Liang et al. 2018, Eq. 2)::

    def score_batch(x, probe):
        x = perturb(x, lambda z: log_softmax(probe(z)["logits"] / T).max(1).values, epsilon)
        with torch.no_grad():
            return -softmax(probe(x)["logits"] / T).max(1).values

    scores = rerun(outputs.get(Need.MODEL, who=self.name), score_batch)
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .extract import LayerReduce, Probe, _iterate, evaluation_mode, resolve_device
from .outputs import ModelSource


def preprocessed_batches(source: ModelSource) -> Iterator[torch.Tensor]:
    """Model-ready input batches (float, on ``source.device``) in dataset order."""
    device = resolve_device(source.device)
    if isinstance(source.preprocess, nn.Module):
        source.preprocess.to(device)
    if isinstance(source.inputs, dict):
        raise ValueError("detectors that re-run the model on perturbed inputs (ODIN, GradNorm, ...) need one input "
                         "tensor; these outputs came from dict (keyword) inputs")
    for batch, _ in _iterate(source.inputs, None, source.batch_size):
        x = torch.as_tensor(batch).to(device)
        yield (source.preprocess(x) if source.preprocess is not None else x).float()


def perturb(x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], epsilon: float) -> torch.Tensor:
    """One signed-gradient step that *increases* ``objective`` (summed over the batch): ``x + eps * sign(grad)``.

    Pass the negative of a loss to decrease it. The returned tensor is detached.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value = objective(x).sum()
        (gradient,) = torch.autograd.grad(value, x)
    return (x + epsilon * gradient.sign()).detach()


def rerun(source: ModelSource, score_batch: Callable[[torch.Tensor, Probe], torch.Tensor],
          layers: Iterable[str] = (), layer_reduce: LayerReduce = "mean") -> np.ndarray:
    """Call ``score_batch(x, probe)`` on every preprocessed batch; concatenate its per-sample results."""
    model = source.model
    device = resolve_device(source.device)
    model.to(device)
    head = dict(model.named_modules())[source.head] if source.head else None
    results = []
    with evaluation_mode(model):
        with Probe(model, head, layers, layer_reduce) as probe:
            for x in preprocessed_batches(source):
                results.append(torch.as_tensor(score_batch(x, probe)).detach().double().cpu().numpy())
    return np.concatenate(results)
