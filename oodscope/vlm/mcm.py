"""MCM and GL-MCM: zero-shot OOD scores from the softmax of CLIP's image-to-class-prompt cosine similarities.

* **MCM** (Ming, Cai, Gu, Sun & Li, "Delving into Out-of-Distribution Detection with Vision-Language
  Representations", NeurIPS 2022, Eq. 3): with ``s_i(x) = cos(I(x), T(t_i))`` the cosine similarity of the
  image embedding and the embedding of the prompt ``t_i = "a photo of a <class i>."``,
  ``S_MCM(x) = max_i exp(s_i(x) / T) / sum_j exp(s_j(x) / T)``, temperature ``T = 1`` (the paper's default).
  The score here is ``-S_MCM`` (higher = more OOD), the same number pytorch-ood's ``MCM`` returns.
* **GL-MCM** (Miyai, Yu, Irie & Aizawa, "Zero-Shot In-Distribution Detection in Multi-Object Settings Using
  Vision-Language Foundation Models", arXiv 2304.04521, 2023, Eq. 5-6): ``S_GL-MCM = S_MCM + lambda S_L-MCM``
  with the local MCM ``S_L-MCM(x) = max_{p, i} exp(s_i(x'_p) / T) / sum_j exp(s_j(x'_p) / T)`` over the patch
  (local) features ``x'_p`` (projected value features of the last attention layer, see
  :mod:`oodscope.vlm.backbone`); ``lambda = 1`` and ``T = 1`` as in the paper. Score ``-S_GL-MCM``.
"""

from __future__ import annotations

import numpy as np

from .base import VLMDetector, softmax

DEFAULT_PROMPT = "a photo of a {}."


def mcm_probability(image: np.ndarray, texts: np.ndarray, temperature: float) -> np.ndarray:
    """``max_i softmax(cos / T)_i`` of normalised embeddings ``image (..., D)`` against ``texts (K, D)``."""
    return softmax(image @ texts.T / temperature, axis=-1).max(axis=-1)


class MCM(VLMDetector):
    """Maximum concept matching: ``-max_i softmax_i(cos(image, prompt_i) / T)`` (see module docstring)."""

    name = "mcm"
    grid = {"temperature": [0.5, 1.0, 10.0, 100.0]}

    def __init__(self, model=None, prompt: str = DEFAULT_PROMPT, temperature: float = 1.0, device: str = "cpu"):
        self.model = model
        self.prompt = prompt
        self.temperature = temperature
        self.device = device

    def _check_params(self) -> None:
        super()._check_params()
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"{self.name}: temperature must be > 0, got {self.temperature!r}")

    def _score_embeddings(self, image: np.ndarray, patches: np.ndarray | None) -> np.ndarray:
        return -mcm_probability(image, self.text_embeddings_, self.temperature)


class GLMCM(MCM):
    """Global MCM plus ``lambda`` times the largest local (patch) MCM (see module docstring)."""

    name = "gl_mcm"
    uses_patches = True
    grid = {"lambda_local": [0.5, 1.0, 2.0], "temperature": [1.0]}

    def __init__(self, model=None, prompt: str = DEFAULT_PROMPT, temperature: float = 1.0, lambda_local: float = 1.0,
                 device: str = "cpu"):
        super().__init__(model, prompt, temperature, device)
        self.lambda_local = lambda_local

    def _check_params(self) -> None:
        super()._check_params()
        if not (isinstance(self.lambda_local, (int, float)) and self.lambda_local >= 0):
            raise ValueError(f"{self.name}: lambda_local must be >= 0, got {self.lambda_local!r}")

    def _score_embeddings(self, image: np.ndarray, patches: np.ndarray | None) -> np.ndarray:
        global_ = mcm_probability(image, self.text_embeddings_, self.temperature)
        local = mcm_probability(patches, self.text_embeddings_, self.temperature).max(axis=1)
        return -(global_ + self.lambda_local * local)
