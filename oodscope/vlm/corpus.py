"""Word corpora for NegLabel's negative-label mining: WordNet nouns when present, a bundled list otherwise.

:func:`load_corpus` ``("auto")`` looks, in this order, for

1. NLTK's WordNet data (``corpora/wordnet/index.noun`` or ``corpora/wordnet.zip`` under ``$NLTK_DATA`` or
   NLTK's default folders; read directly, NLTK itself is not imported),
2. the Debian / Ubuntu ``wordnet-base`` files (``/usr/share/wordnet/index.noun``),
3. the bundled list ``oodscope/vlm/data/nouns.txt``: the 5,000 WordNet 3.0 noun lemmas (single words) with the
   highest sense-tagged frequency in WordNet's ``index.noun`` (WordNet 3.0 Copyright 2006 by Princeton
   University, redistributed under its license, kept at the top of the file).

Every noun lemma of ``index.noun`` is a candidate (multi-word lemmas with spaces for underscores), lowercased and
deduplicated in file order. :class:`Corpus` records where its words came from; NegLabel stores that as
``corpus_``. ``"wordnet"`` requires one of the first two, ``"bundled"`` takes the list, a path reads one word per
line (``#`` comments allowed), a list of strings is used as it is.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

DEBIAN_WORDNET = Path("/usr/share/wordnet")
BUNDLED = Path(__file__).with_name("data") / "nouns.txt"


@dataclass(frozen=True)
class Corpus:
    words: tuple[str, ...]
    source: str


def nltk_data_dirs() -> list[Path]:
    """NLTK's data search path (``$NLTK_DATA`` first, then its defaults), without importing NLTK."""
    dirs = [Path(p) for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    dirs += [Path.home() / "nltk_data", Path(sys.prefix) / "nltk_data", Path(sys.prefix) / "share" / "nltk_data",
             Path(sys.prefix) / "lib" / "nltk_data", Path("/usr/share/nltk_data"),
             Path("/usr/local/share/nltk_data"), Path("/usr/lib/nltk_data"), Path("/usr/local/lib/nltk_data")]
    return dirs


def parse_index_noun(text: str) -> list[str]:
    """Noun lemmas of a WordNet ``index.noun`` (license lines start with a space), lowercased, unique, in order."""
    words: dict[str, None] = {}
    for line in text.splitlines():
        if not line or line[0] == " ":
            continue
        lemma = line.split(" ", 1)[0].replace("_", " ").strip().lower()
        if lemma:
            words.setdefault(lemma, None)
    return list(words)


def _find_wordnet() -> tuple[str, str] | None:
    """``(index.noun text, where)`` from NLTK's data or the Debian files, or ``None``."""
    for base in nltk_data_dirs():
        plain = base / "corpora" / "wordnet" / "index.noun"
        if plain.is_file():
            return plain.read_text(encoding="utf-8", errors="replace"), f"wordnet nouns (NLTK data: {plain})"
        packed = base / "corpora" / "wordnet.zip"
        if packed.is_file():
            try:
                with zipfile.ZipFile(packed) as archive:
                    return (io.TextIOWrapper(archive.open("wordnet/index.noun"), encoding="utf-8",
                                             errors="replace").read(), f"wordnet nouns (NLTK data: {packed})")
            except (KeyError, zipfile.BadZipFile, OSError):
                continue
    debian = DEBIAN_WORDNET / "index.noun"
    if debian.is_file():
        return debian.read_text(encoding="utf-8", errors="replace"), f"wordnet nouns (Debian wordnet: {debian})"
    return None


def read_word_file(path: Path) -> list[str]:
    words: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        word = line.split("#", 1)[0].strip().lower()
        if word:
            words.setdefault(word, None)
    return list(words)


def load_corpus(corpus: str | os.PathLike | Sequence[str] = "auto") -> Corpus:
    """The candidate words for negative labels (see the module docstring)."""
    if isinstance(corpus, (list, tuple)):
        words = [str(w).strip().lower() for w in corpus if str(w).strip()]
        if not words:
            raise ValueError("corpus: the given word list is empty")
        return Corpus(tuple(dict.fromkeys(words)), f"given list ({len(words)} words)")
    if corpus in ("auto", "wordnet"):
        found = _find_wordnet()
        if found is not None:
            return Corpus(tuple(parse_index_noun(found[0])), found[1])
        if corpus == "wordnet":
            raise ValueError("corpus='wordnet': no WordNet data found; install the Debian package wordnet-base, or "
                             "NLTK's data (python -m nltk.downloader wordnet), or use corpus='bundled'")
        corpus = "bundled"
    if corpus == "bundled":
        return Corpus(tuple(read_word_file(BUNDLED)), f"bundled list ({BUNDLED.name}: frequent WordNet 3.0 nouns)")
    path = Path(corpus)
    if not path.is_file():
        raise ValueError(f"corpus {str(corpus)!r}: not 'auto', 'wordnet', 'bundled', a word list or a file")
    words = read_word_file(path)
    if not words:
        raise ValueError(f"corpus file {path} holds no words")
    return Corpus(tuple(words), f"file {path}")


def describe(corpus: Any) -> str:
    return load_corpus(corpus).source
