"""RankFeat: rank-1 feature removal.

Song, Sebe & Wang, "RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection", NeurIPS 2022, Sec. 3:
a high-level feature map ``X`` (``C x HW`` per sample, the output of a late block) is replaced by
``X' = X - s_1 u_1 v_1^T`` (Eq. 2, the largest singular value and its singular vectors), the rest of the
network runs on ``X'`` and the score is the energy of the resulting logits, ``-T log sum_j exp(f_j / T)``
with ``T = 1`` (Eq. 3; higher = more OOD). ``iterations=None`` uses an exact SVD; an integer uses that many
power-iteration steps, the paper's fast approximation (Sec. 3.3, 20 steps).

How: the feature map must be modified *inside* the network, so the detector needs the model
(``Outputs.source``, attached by :func:`oodscope.extract`) and the name of the block (``layer``, e.g.
``"layer3"`` of the CIFAR ResNets or ``"layer4"`` of torchvision ResNets). A forward hook on that module
returns the rank-1-removed map; the model is re-run once per dataset (:mod:`oodscope.extraction.rerun`).
"""

from __future__ import annotations

import numpy as np

from ..extraction.outputs import Need, Outputs
from .base import Detector


def remove_rank1(maps, iterations: int | None = None):
    """``X - s_1 u_1 v_1^T`` for every sample of a ``(B, C, ...)`` tensor (spatial dims flattened)."""
    import torch

    x = maps.flatten(2)
    if iterations is None:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        rank1 = s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :])
    else:
        v = torch.ones(x.shape[0], x.shape[2], 1, dtype=x.dtype, device=x.device) / np.sqrt(x.shape[2])
        for _ in range(iterations):
            u = torch.nn.functional.normalize(x @ v, dim=1)
            v = torch.nn.functional.normalize(x.transpose(1, 2) @ u, dim=1)
        u = torch.nn.functional.normalize(x @ v, dim=1)
        rank1 = u @ (u.transpose(1, 2) @ x)
    return (x - rank1).view_as(maps)


class RankFeat(Detector):
    """``score(x) = -logsumexp(f(x with the rank-1 component of layer's map removed))``."""

    name = "rankfeat"
    needs = frozenset({Need.MODEL})

    def __init__(self, layer: str | None = None, iterations: int | None = None, temperature: float = 1.0):
        self.layer = layer
        self.iterations = iterations
        self.temperature = temperature

    def _check_params(self) -> None:
        if not isinstance(self.layer, str):
            raise ValueError("rankfeat: pass layer=<name of a late block whose output is a feature map>, e.g. "
                             "'layer3' for the CIFAR ResNets or 'layer4' for torchvision ResNets")
        if self.iterations is not None and not (isinstance(self.iterations, (int, np.integer)) and self.iterations >= 1):
            raise ValueError(f"rankfeat: iterations must be a positive integer or None, got {self.iterations!r}")
        if not self.temperature > 0:
            raise ValueError(f"rankfeat: temperature must be > 0, got {self.temperature!r}")

    def _fit(self, train: Outputs) -> None:
        self._module(train)  # checks that the layer exists

    def _module(self, data: Outputs):
        source = data.get(Need.MODEL, who=self.name)
        modules = dict(source.model.named_modules())
        if self.layer not in modules:
            names = ", ".join(n for n in list(modules)[1:13])
            raise ValueError(f"rankfeat: the model has no layer {self.layer!r}; its modules include {names}, ...")
        return source, modules[self.layer]

    def _score(self, x: Outputs) -> np.ndarray:
        import torch

        from ..extraction.rerun import rerun

        source, module = self._module(x)

        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor) or output.ndim < 3:
                raise ValueError(f"rankfeat: layer {self.layer!r} outputs {tuple(getattr(output, 'shape', ()))}, "
                                 "not a feature map (batch x channels x spatial)")
            return remove_rank1(output, self.iterations)

        def score_batch(batch, probe):
            with torch.no_grad():
                logits = probe(batch)["logits"].double()
            return -self.temperature * torch.logsumexp(logits / self.temperature, dim=1)

        handle = module.register_forward_hook(hook)
        try:
            return rerun(source, score_batch)
        finally:
            handle.remove()
