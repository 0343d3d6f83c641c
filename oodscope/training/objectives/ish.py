"""ISH: intermediate tensor shaping of the head's weight gradient during training.

Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc Out-of-distribution Detection Enhancement", ICLR
2024 (Sec. 4, the training half of SCALE; details from the authors' trainer in OpenOOD, ``ish_trainer.py``). The
forward pass is unchanged; in the backward pass the gradient of the last linear layer's weight is computed with
the shaped penultimate activations instead of the activations themselves,

    ``dL/dW = g^T shape(a)``,  ``shape(a) = exp(s1 / s2) * topk_{n(1-p)}(a)`` (the rest zeroed),

``s1 = sum_j a_j``, ``s2`` = the sum of the kept top ``n (1 - p)`` activations, ``p = 0.85`` (the authors' default);
the input and bias gradients are the usual ones, so the backbone's gradients are plain cross-entropy's. Samples whose
activations are concentrated in few units (small ``s1/s2``) weigh less in the head's update. Scored with SCALE
(``scale`` with percentile 85, the paper's pairing). The paper fine-tunes an ImageNet ResNet-50 for 10 epochs
(lr 0.003, cosine); here the engine's schedule on CIFAR-10.
"""

from __future__ import annotations

from typing import Any

from .cross_entropy import CrossEntropy


class ISH(CrossEntropy):
    """Cross-entropy; the head's weight gradient uses ``exp(s1/s2)``-scaled top-``(1-p)`` activations."""

    name = "ish"
    score = "scale"

    def __init__(self, percentile: float = 0.85):
        self.percentile = percentile

    def check_params(self) -> None:
        if not (isinstance(self.percentile, float) and 0.0 <= self.percentile < 1.0):
            raise ValueError(f"{self.name}: percentile must be a fraction in [0, 1), got {self.percentile!r}")

    def adapt(self, model, n_classes: int, train, preprocess) -> Any:
        from ..heads import head_name, ish_linear, replace_module

        name = head_name(model)
        replace_module(model, name, ish_linear(model.get_submodule(name), self.percentile))
        return model
