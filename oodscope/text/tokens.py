"""Texts -> model-ready token arrays, with bad input reported instead of silently dropped.

A text dataset becomes one ``int64`` array of shape ``(N, 2, L)``: ``[:, 0]`` the token ids (``[CLS] ... [SEP]``
then padding) and ``[:, 1]`` the attention mask. Such an array goes through :func:`oodscope.extract` like an
image array (batched, hashed for the cache), and :class:`~oodscope.text.model.TextClassifier` consumes it.

Checks (nothing is dropped; every decision is counted in :class:`TokenReport`):

* items that are neither ``str`` nor ``bytes`` (``None``, numbers) -> ``ValueError`` naming their positions;
* ``bytes`` are decoded as UTF-8; undecodable ones -> ``ValueError`` (``on_bad_bytes="error"``) or decoded with
  U+FFFD replacement characters and counted (``on_bad_bytes="replace"``);
* empty or whitespace-only texts -> ``ValueError`` (``on_empty="error"``) or kept as ``[CLS] [SEP]`` and counted
  (``on_empty="keep"``: an empty request is a legitimate, probably out-of-scope, input at deployment);
* texts longer than ``max_length`` tokens are truncated (``[CLS]`` + first ``max_length - 2`` word pieces +
  ``[SEP]``, as the tokenizer's own truncation does), with a warning giving their count and positions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


@dataclass
class TokenReport:
    """What happened to the texts of one dataset (positions are indices into the input)."""

    name: str
    n: int
    max_length: int
    length: int = 0
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    empty: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    replaced: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def summary(self) -> str:
        return (f"{self.name}: {self.n} texts, padded to {self.length} tokens; truncated to {self.max_length}: "
                f"{len(self.truncated)}, empty kept: {len(self.empty)}, undecodable bytes replaced: "
                f"{len(self.replaced)}")


def _positions(index: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(int(i)) for i in list(index)[:limit])
    return shown + (f", ... ({len(index)} in all)" if len(index) > limit else "")


def clean_texts(texts: Sequence[Any], name: str = "texts", on_empty: str = "error",
                on_bad_bytes: str = "error") -> tuple[list[str], TokenReport]:
    """Decode and check ``texts`` (see module docstring); returns the strings and a partial report."""
    if on_empty not in ("error", "keep"):
        raise ValueError(f"on_empty must be 'error' or 'keep', got {on_empty!r}")
    if on_bad_bytes not in ("error", "replace"):
        raise ValueError(f"on_bad_bytes must be 'error' or 'replace', got {on_bad_bytes!r}")
    if isinstance(texts, (str, bytes)):
        raise ValueError(f"dataset {name!r}: expected a sequence of texts, got a single {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"dataset {name!r} has no texts")
    wrong = [i for i, t in enumerate(texts) if not isinstance(t, (str, bytes))]
    if wrong:
        kinds = sorted({type(texts[i]).__name__ for i in wrong})
        raise ValueError(f"dataset {name!r}: items at positions {_positions(wrong)} are {', '.join(kinds)}, not "
                         "str or bytes; convert or remove them before tokenizing")
    decoded, bad = [], []
    for i, text in enumerate(texts):
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(i)
                text = text.decode("utf-8", errors="replace")
        decoded.append(text)
    if bad and on_bad_bytes == "error":
        raise ValueError(f"dataset {name!r}: {len(bad)} byte strings are not valid UTF-8 (positions "
                         f"{_positions(bad)}); decode them yourself or pass on_bad_bytes='replace'")
    empty = [i for i, t in enumerate(decoded) if not t.strip()]
    if empty and on_empty == "error":
        raise ValueError(f"dataset {name!r}: {len(empty)} texts are empty or whitespace only (positions "
                         f"{_positions(empty)}); remove them or pass on_empty='keep' to score them as '[CLS] [SEP]'")
    report = TokenReport(name=name, n=len(decoded), max_length=0, empty=np.asarray(empty, np.int64),
                         replaced=np.asarray(bad, np.int64))
    return decoded, report


def tokenize(texts: Sequence[Any], tokenizer: Any, max_length: int = 128, name: str = "texts",
             on_empty: str = "error", on_bad_bytes: str = "error", warn: bool = True) -> tuple[np.ndarray, TokenReport]:
    """``(N, 2, L)`` int64 array of token ids and attention mask, and the :class:`TokenReport`.

    ``tokenizer`` is a Hugging Face tokenizer (``__call__`` returning ``input_ids``, ``sep_token_id``,
    ``pad_token_id``). ``L`` is the longest (truncated) text of this dataset.
    """
    if not (isinstance(max_length, (int, np.integer)) and max_length >= 2):
        raise ValueError(f"max_length must be an integer >= 2 ([CLS] and [SEP]), got {max_length!r}")
    strings, report = clean_texts(texts, name, on_empty, on_bad_bytes)
    ids = tokenizer(strings, add_special_tokens=True, truncation=False, padding=False)["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    truncated = np.flatnonzero(lengths > max_length)
    if truncated.size:
        sep = tokenizer.sep_token_id
        for i in truncated:
            ids[i] = list(ids[i][:max_length - 1]) + [sep]
        lengths = np.minimum(lengths, max_length)
        if warn:
            warnings.warn(f"dataset {name!r}: {truncated.size} of {len(ids)} texts are longer than {max_length} "
                          f"tokens and were truncated (positions {_positions(truncated)})", stacklevel=2)
    length = int(lengths.max())
    out = np.full((len(ids), 2, length), tokenizer.pad_token_id or 0, dtype=np.int64)
    out[:, 1] = 0
    flat = np.concatenate([np.asarray(x, np.int64) for x in ids])
    rows = np.repeat(np.arange(len(ids)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, 0, cols] = flat
    out[rows, 1, cols] = 1
    report.max_length, report.length, report.truncated = int(max_length), length, truncated.astype(np.int64)
    return out, report
