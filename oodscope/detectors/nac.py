"""Neuron Activation Coverage for uncertainty estimation (NAC-UE).

Liu, Zhou & Li (et al.), "Neuron Activation Coverage: Rethinking Out-of-distribution Detection and
Generalization", ICLR 2024, Sec. 3:

* neuron state (Eq. 3): ``z_hat = sigmoid(alpha * z * dKL(u || p(x)) / dz)``, the neuron output times the gradient
  of the KL divergence between the uniform distribution and the softmax output (a cross-entropy to uniform
  targets; the constant ``log C`` has no gradient), squashed by a sigmoid of steepness ``alpha``;
* the state PDF over ID training data is a histogram of ``M`` intervals per neuron; coverage of an interval is
  ``min(count / O*, 1)`` (Eq. 5-6, ``O*`` is the minimum count for full coverage);
* NAC-UE (Eq. 7): the mean coverage of a sample's states over the neurons of a layer, averaged over layers.
  The OOD score is its negative.

Details follow the authors' code: conv activations and their gradients are spatially averaged before the
product (one neuron per channel); interval edges are the authors' two-sided logarithmic spacing (dense near 0
and 1, ``M`` edges, ``M - 1`` intervals); defaults ``M = 50``, ``O* = 50``, ``alpha = 100`` are their CIFAR-10
setting for the penultimate layer (``layers=None``); per-layer lists are accepted. Note: pytorch-ood 0.4.0
uses other edges (log-spaced from 1e-6 to 0.5, mirrored: dense near 0 and 1); on the CIFAR-10 ResNet-20, where
most states saturate at 0 or 1, its edges detect far better (near-OOD AUROC ~80 vs ~48 with the authors' edges;
see ``benchmarks/distance_detectors_vs_pytorch_ood.py``).
The state needs gradients, so fitting and scoring re-run the model through ``Outputs.source``
(:mod:`oodscope.extraction.rerun`), with the Probe's named layers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..extraction.outputs import Need, Outputs
from .base import Detector

PENULTIMATE = "penultimate"


def interval_edges(m: int, base: float = 1e3) -> np.ndarray:
    """``m`` increasing edges on [0, 1.2]: log-spaced from 0 up to 0.5 and mirrored towards 1 (authors' code)."""
    half = np.log(np.linspace(1.0, np.sqrt(base), m // 2)) / np.log(base)
    edges = np.concatenate([half[:-1], (1.0 - half)[::-1]])
    edges[-1] += 1e-2
    return np.append(edges, 1.2)


def _per_layer(value, n_layers: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n_layers
    if len(values) != n_layers:
        raise ValueError(f"nac: {name} has {len(values)} entries but there are {n_layers} layers")
    return values


class NAC(Detector):
    """``score(x) = -mean_layers mean_neurons min(count(bin(z_hat(x))) / O*, 1)``."""

    name = "nac"
    needs = frozenset({Need.MODEL})
    grid = {"o_star": [5, 10, 50, 100], "m_bins": [50, 500]}

    def __init__(self, layers: Sequence[str] | None = None, m_bins: int | Sequence[int] = 50,
                 o_star: int | Sequence[int] = 50, alpha: float | Sequence[float] = 100.0):
        self.layers = layers
        self.m_bins = m_bins
        self.o_star = o_star
        self.alpha = alpha

    def _all_layers(self) -> list[str]:
        return list(self.layers) if self.layers is not None else [PENULTIMATE]

    def _check_params(self) -> None:
        if self.layers is not None and (isinstance(self.layers, str) or len(self.layers) == 0):
            raise ValueError(f"nac: layers must be a non-empty list of layer names or None, got {self.layers!r}")
        n = len(self._all_layers())
        for m in _per_layer(self.m_bins, n, "m_bins"):
            if not (isinstance(m, (int, np.integer)) and m >= 4):
                raise ValueError(f"nac: m_bins must be integers >= 4, got {m!r}")
        for o in _per_layer(self.o_star, n, "o_star"):
            if not o > 0:
                raise ValueError(f"nac: o_star must be > 0, got {o!r}")
        for a in _per_layer(self.alpha, n, "alpha"):
            if not (np.isfinite(a) and a > 0):
                raise ValueError(f"nac: alpha must be > 0, got {a!r}")

    def states(self, x: Outputs) -> list[np.ndarray]:
        """Per layer, the ``(N, neurons)`` states ``sigmoid(alpha * mean(z) * mean(dKL/dz))``."""
        import torch

        from ..extraction.rerun import rerun

        source = x.get(Need.MODEL, who=self.name)
        layers = self._all_layers()
        hooked = [layer for layer in layers if layer != PENULTIMATE]
        modules = dict(source.model.named_modules())
        missing = [layer for layer in hooked if layer not in modules]
        if missing:
            raise ValueError(f"nac: the model has no layers {missing}; pass names from dict(model.named_modules())")
        alphas = _per_layer(self.alpha, len(layers), "alpha")

        def pooled(t):
            return t.flatten(2).mean(dim=2) if t.ndim > 2 else t.flatten(1)

        def score_batch(batch, probe):
            with torch.enable_grad():
                parts = probe(batch.detach().requires_grad_(True))
                acts = [parts["features"] if layer == PENULTIMATE else parts[layer] for layer in layers]
                loss = -torch.log_softmax(parts["logits"], dim=1).mean(dim=1).sum()
                grads = torch.autograd.grad(loss, acts)
            return torch.cat([torch.sigmoid(a * pooled(z.detach()) * pooled(g))
                              for a, z, g in zip(alphas, acts, grads)], dim=1)

        if PENULTIMATE in layers and source.head is None:
            raise ValueError("nac: the penultimate layer needs the model's classifier head (extract with head='auto')")
        values = rerun(source, score_batch, layers=hooked, layer_reduce="none")
        bounds = np.cumsum([0] + _neuron_counts(source, layers))
        return [values[:, start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]

    def _bins(self, states: list[np.ndarray]) -> list[np.ndarray]:
        ms = _per_layer(self.m_bins, len(states), "m_bins")
        return [np.clip(np.searchsorted(interval_edges(m), s, side="right") - 1, 0, m - 2)
                for s, m in zip(states, ms)]

    def _fit(self, train: Outputs) -> None:
        states = self.states(train)
        ms = _per_layer(self.m_bins, len(states), "m_bins")
        self.coverage_ = []
        for index, m, o in zip(self._bins(states), ms, _per_layer(self.o_star, len(states), "o_star")):
            n_neurons = index.shape[1]
            flat = (index + np.arange(n_neurons) * (m - 1)).ravel()
            counts = np.bincount(flat, minlength=n_neurons * (m - 1)).reshape(n_neurons, m - 1)
            self.coverage_.append(np.minimum(counts / o, 1.0))

    def _score(self, x: Outputs) -> np.ndarray:
        coverage = [cov[np.arange(cov.shape[0]), index].mean(axis=1)
                    for cov, index in zip(self.coverage_, self._bins(self.states(x)))]
        return -np.mean(coverage, axis=0)


def _neuron_counts(source, layers: list[str]) -> list[int]:
    """Neurons (channels) of every layer, from one forward pass on the first batch."""
    import torch

    from ..extraction.extract import Probe, evaluation_mode
    from ..extraction.rerun import preprocessed_batches

    model = source.model
    head = dict(model.named_modules())[source.head] if source.head else None
    x = next(iter(preprocessed_batches(source)))[:1]
    with evaluation_mode(model):
        with Probe(model, head, [layer for layer in layers if layer != PENULTIMATE], "mean") as probe, \
                torch.no_grad():
            parts = probe(x)
    return [int(parts["features" if layer == PENULTIMATE else layer].flatten(1).shape[1]) for layer in layers]
