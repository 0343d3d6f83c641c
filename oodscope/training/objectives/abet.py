"""AbeT: a learned input-dependent temperature, scored with the ablated temperature energy.

LeVine, Pikus, Phillips, Norman, Amat Gil & Hendryx, "Out-of-Distribution Detection & Applications With Ablated
Learned Temperature Energy", arXiv 2401.12129 (2024; defaults from the authors' released ``nets.py`` /
``main.py``). The head (GODIN's decomposition, :func:`oodscope.training.heads.learned_temperature_head`) computes
cosine logits ``h_c(x) = cos(phi(x), w_c)`` and a temperature ``T(x) = sigmoid(BN(w_T . phi(x) + b_T))``, and
the network's logits are ``f_c(x) = h_c(x) / T(x)``, trained with plain cross-entropy (no outliers)

    ``L = CE(h(x) / T(x), y)``.

The ablated energy drops the temperature factor in front of the energy: the ID confidence is
``log sum_c exp(h_c(x) / T(x))`` (the "Forefront Temperature Constant" removed), which is minus oodscope's
``energy`` detector on the fine-tuned model's logits: ``energy`` is AbeT's score (higher = more OOD). The authors
train a ResNet-20 from scratch for 200 epochs; here the pretrained head's rows start the cosine directions and the
whole network is fine-tuned on the engine's schedule.
"""

from __future__ import annotations

from typing import Any

from .cross_entropy import CrossEntropy


class AbeT(CrossEntropy):
    """``L = CE(cos(phi, w) / T(x), y)`` with ``T(x) = sigmoid(BN(w_T . phi(x) + b_T))``; score: energy."""

    name = "abet"
    score = "energy"

    def adapt(self, model, n_classes: int, train, preprocess) -> Any:
        from ..heads import head_name, learned_temperature_head, replace_module

        name = head_name(model)
        replace_module(model, name, learned_temperature_head(model.get_submodule(name)))
        return model
