"""NegLabel: zero-shot OOD detection with negative labels mined from a word corpus.

Jiang, Liu, Wang, Tian, Tang, Wang, Han & Zhang, "Negative Label Guided OOD Detection with Pretrained
Vision-Language Models", ICLR 2024.

* **Mining** (Sec. 3.2, Algorithm 1 "NegMining"): every corpus word ``y~_i`` that is not an ID class name is a
  candidate; with ``e~_i`` its prompt embedding and ``e_k`` the ID prompt embeddings, its distance to the ID
  labels is the ``eta``-percentile of the negative cosine similarities, ``d_i = P_eta({-cos(e~_i, e_k)}_k)``
  (``eta = 0.05``: the 95th percentile of its similarities, robust to a single close ID label); the ``M``
  candidates with the largest ``d_i`` are the negative labels (``M = 10,000`` in the paper, all of them when the
  corpus has fewer).
* **Score** (Eq. 4-5): ``S(x) = sum_i exp(cos(h, e_i) / tau) / (sum_i exp(cos(h, e_i) / tau) + sum_j
  exp(cos(h, e~_j) / tau))`` over the K ID labels ``e_i`` and the negative labels ``e~_j`` of the image
  embedding ``h``, ``tau = 0.01``.
* **Grouping** (Sec. 3.3): the negative labels are split at random (seeded) into ``n_groups`` groups of equal
  size (the last ones one smaller when ``M`` is not a multiple) and ``S`` is averaged over the groups, each
  group's score using all ID labels and that group's negatives only; ``n_groups = 100`` as in the paper.

The score here is ``-S`` (higher = more OOD). Corpus: :func:`oodscope.vlm.corpus.load_corpus` (WordNet nouns
from NLTK's data or the Debian ``wordnet-base`` files when present, the bundled frequent-noun list otherwise;
the paper also adds WordNet adjectives, not done here); the detector records which one it used in ``corpus_``.
Negative prompts use the same ``prompt`` as the ID classes.
"""

from __future__ import annotations

import numpy as np

from .base import VLMDetector, l2_normalise
from .corpus import load_corpus
from .mcm import DEFAULT_PROMPT


def mine_negatives(candidates: np.ndarray, id_embeddings: np.ndarray, n_negatives: int, eta: float) -> np.ndarray:
    """Indices of the ``n_negatives`` candidate rows farthest from the ID rows: the largest ``eta``-percentile of
    ``-cos`` (normalised embeddings), in decreasing order of that distance (stable on ties)."""
    distance = np.quantile(-(candidates @ id_embeddings.T), eta, axis=1)
    return np.argsort(-distance, kind="stable")[:n_negatives]


def grouped_neglabel(image: np.ndarray, id_embeddings: np.ndarray, negative_embeddings: np.ndarray,
                     groups: np.ndarray, n_groups: int, temperature: float) -> np.ndarray:
    """Mean over groups of ``sum_id e^{cos/tau} / (sum_id e^{cos/tau} + sum_group e^{cos/tau})`` (log-sum-exp)."""
    from scipy.special import expit, logsumexp

    id_lse = logsumexp(image @ id_embeddings.T / temperature, axis=1)  # (N,)
    neg = image @ negative_embeddings.T / temperature  # (N, M)
    group_lse = np.stack([logsumexp(neg[:, groups == g], axis=1) for g in range(n_groups)], axis=1)  # (N, G)
    return expit(id_lse[:, None] - group_lse).mean(axis=1)


class NegLabel(VLMDetector):
    """``-mean_g S_g``: ID prompt mass against mined negative labels, grouped (see module docstring)."""

    name = "neglabel"
    grid = {"n_groups": [1, 10, 100], "n_negatives": [1000, 10000]}

    def __init__(self, model=None, prompt: str = DEFAULT_PROMPT, corpus="auto", n_negatives: int = 10000,
                 eta: float = 0.05, n_groups: int = 100, temperature: float = 0.01, seed: int = 0,
                 device: str = "cpu"):
        self.model = model
        self.prompt = prompt
        self.corpus = corpus
        self.n_negatives = n_negatives
        self.eta = eta
        self.n_groups = n_groups
        self.temperature = temperature
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        super()._check_params()
        for key in ("n_negatives", "n_groups"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{self.name}: {key} must be a positive integer, got {value!r}")
        if not (isinstance(self.eta, (int, float)) and 0.0 <= self.eta <= 1.0):
            raise ValueError(f"{self.name}: eta (the percentile of -cos) must be in [0, 1], got {self.eta!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"{self.name}: temperature must be > 0, got {self.temperature!r}")

    def _fit_texts(self, clip) -> None:
        corpus = load_corpus(self.corpus)
        ids = {c.lower() for c in self.classes_}
        words = [w for w in corpus.words if w not in ids]
        if len(words) < self.n_groups:
            raise ValueError(f"{self.name}: the corpus ({corpus.source}) leaves {len(words)} candidate words after "
                             f"removing the ID class names, fewer than n_groups={self.n_groups}; give a larger "
                             "corpus or fewer groups")
        candidates = l2_normalise(self._encode_texts(clip, [self.prompt.format(w) for w in words], "corpus"))
        chosen = mine_negatives(candidates, self.text_embeddings_, self.n_negatives, self.eta)
        if len(chosen) < self.n_groups:
            raise ValueError(f"{self.name}: {len(chosen)} negative labels cannot fill n_groups={self.n_groups}")
        self.corpus_ = corpus.source
        self.negative_labels_ = [words[i] for i in chosen]
        self.negative_embeddings_ = candidates[chosen]
        order = np.random.default_rng(self.seed).permutation(len(chosen))
        groups = np.empty(len(chosen), dtype=np.int64)
        for g, part in enumerate(np.array_split(order, self.n_groups)):
            groups[part] = g
        self.groups_ = groups

    def _score_embeddings(self, image: np.ndarray, patches: np.ndarray | None) -> np.ndarray:
        return -grouped_neglabel(image, self.text_embeddings_, self.negative_embeddings_, self.groups_,
                                 self.n_groups, self.temperature)
