"""BLOOD: between-layer transformation smoothness.

Jelenić, Jukić, Tutek, Puljiz & Šnajder, "Out-of-Distribution Detection by Leveraging Between-Layer
Transformation Smoothness", ICLR 2024. For a transformer with layer representations ``h_l(x)`` (the ``[CLS]``
token), the smoothness of the transformation ``f_l: h_l -> h_{l+1}`` at ``x`` is the squared Frobenius norm of its
Jacobian, ``phi_l(x) = ||J_{f_l}(h_l(x))||_F^2`` (Sec. 3). It is estimated without forming the Jacobian by the
unbiased estimator with random projections ``v, w ~ N(0, I)``: ``E[(v^T J w)^2] = ||J||_F^2``, averaged over ``M``
draws (Sec. 3; ``v^T J`` is one vector-Jacobian product). The score is the mean over the transitions between
consecutive block outputs (BLOOD_M) or the last transition only (BLOOD_L); ID data, which fine-tuning
smoothed, gets lower values, so higher = more OOD. ``M = 50`` follows the authors' code.

Checked against the authors' code (github.com/fjelenic/between-layer-ood, ``get_grad_layers``): the
representation is the ``[CLS]`` token (position 0) of each block's output; the transitions are those between
consecutive block outputs ``h_l -> h_{l+1}``, ``l = 1 .. L-1`` (the embedding layer's output is not used); the
derivative is taken with the other token positions of layer ``l`` held fixed; ``v`` and ``w`` are standard normal,
``M = 50`` draws; the model is in eval mode; BLOOD_M averages the transitions; the classifier is the whole
pre-trained transformer fine-tuned with a linear head on the last layer's ``[CLS]`` state.

It runs the network again (``Need.MODEL``) and needs a model that exposes its between-layer maps, such as
:class:`oodscope.text.model.TextClassifier` (``between_layer_maps``); it has no training step. Use it on a
fine-tuned ``TextClassifier(..., pooling="cls")`` (``benchmarks/clinc150_finetuned.py``, ``oodscope bench
clinc150-ftfull``): with mean pooling, or on a frozen pre-trained encoder, the ``[CLS]`` transformations are not the
ones fine-tuning shaped, and the score loses its reason to separate ID from OOD (a warning says so).
"""

from __future__ import annotations

import warnings

import numpy as np

from ..extraction.outputs import Need, Outputs
from .base import Detector


class BLOOD(Detector):
    """``score(x) = mean_l (1/M) sum_m (v_m^T J_l(x) w_m)^2`` (or the last ``l`` only)."""

    name = "blood"
    needs = frozenset({Need.MODEL})
    grid = {"aggregate": ["mean", "last"]}

    def __init__(self, n_estimators: int = 50, aggregate: str = "mean", seed: int = 0, rows_per_pass: int = 2048):
        self.n_estimators = n_estimators
        self.aggregate = aggregate
        self.seed = seed
        self.rows_per_pass = rows_per_pass

    def _check_params(self) -> None:
        if not (isinstance(self.n_estimators, (int, np.integer)) and self.n_estimators >= 1):
            raise ValueError(f"blood: n_estimators must be a positive integer, got {self.n_estimators!r}")
        if self.aggregate not in ("mean", "last"):
            raise ValueError(f"blood: aggregate must be 'mean' (BLOOD_M) or 'last' (BLOOD_L), got {self.aggregate!r}")

    def _fit(self, train: Outputs) -> None:
        """Nothing is learned (BLOOD needs no training data); ``fit`` only checks the parameters."""

    def layer_scores(self, x: Outputs) -> np.ndarray:
        """``(N, transitions)`` estimates of ``||J_l||_F^2`` for every pair of consecutive blocks."""
        import torch

        from ..extraction.rerun import rerun
        from ..text.model import between_layer_maps

        source = x.get(Need.MODEL, who=self.name)
        if not hasattr(source.model, "blocks"):
            raise ValueError(f"blood: the model {type(source.model).__name__} does not expose transformer blocks; "
                             "use oodscope.text.model.TextClassifier (or a model with a BERT-style .blocks)")
        if getattr(source.model, "pooling", "cls") != "cls":
            warnings.warn("blood: the classifier reads mean-pooled states, BLOOD measures the [CLS] token's "
                          "transformations (the paper's fine-tuned [CLS] classifier); build "
                          "TextClassifier(..., pooling='cls') and fine-tune it for the paper's setting", stacklevel=3)
        generator = torch.Generator().manual_seed(int(self.seed))

        def score_batch(tokens, probe):
            columns = []
            for x_l, f_l in between_layer_maps(probe.model, tokens):
                total = torch.zeros(len(x_l), dtype=torch.float64, device=x_l.device)
                per_pass = max(1, self.rows_per_pass // len(x_l))  # bounded memory: draws stacked per pass
                for first in range(0, self.n_estimators, per_pass):
                    draws = min(per_pass, self.n_estimators - first)
                    shape = (draws * len(x_l), x_l.shape[1])
                    v = torch.randn(shape, generator=generator).to(x_l.device, x_l.dtype)
                    w = torch.randn(shape, generator=generator).to(x_l.device, x_l.dtype)
                    stacked = x_l.detach().repeat(draws, 1).requires_grad_(True)  # draw-major copies
                    with torch.enable_grad():  # rows are independent: one backward gives each v_m^T J(x_i)
                        (vjp,) = torch.autograd.grad(f_l(stacked), stacked, grad_outputs=v)
                    total += ((vjp * w).sum(dim=-1).double() ** 2).view(draws, len(x_l)).sum(dim=0)
                columns.append(total / self.n_estimators)
            return torch.stack(columns, dim=1)

        return rerun(source, score_batch)

    def _score(self, x: Outputs) -> np.ndarray:
        per_layer = self.layer_scores(x)
        return per_layer.mean(axis=1) if self.aggregate == "mean" else per_layer[:, -1]
