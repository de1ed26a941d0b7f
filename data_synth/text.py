"""Pure text helpers: sentences, prompt/continuation split, words, edit distances.

Everything here is a function of its arguments: strings in, values out, no I/O.
"""

from __future__ import annotations

import re
from typing import Sequence

# Words that end in a period without ending a sentence (lower-cased, without the dot).
_ABBREVIATIONS = frozenset(
    "mr mrs ms messrs dr st jr sr prof rev gen col capt lt sgt maj hon esq mt no vol vs etc "
    "viz cf ch fig ft inc co ltd jan feb mar apr jun jul aug sep sept oct nov dec".split())

# A sentence ends at ., ! or ? (possibly repeated), optionally followed by closing quotes or
# brackets, then whitespace.
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s+)")
_WORD = re.compile(r"[A-Za-z]+(?:['\u2019][A-Za-z]+)*")


def normalize_space(text: str) -> str:
    """Collapse runs of whitespace to single spaces and strip the ends."""
    return " ".join(text.split())


_TYPOGRAPHY = str.maketrans({
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u2032": "'",
    "\u00a0": " ", "\u2009": " ", "\u202f": " ",
    "*": None, "_": None,
})


def normalize_typography(text: str) -> str:
    """One typography for every text of a pair: real, teacher-written and exemplars alike.

    Curly quotes become straight, ``--`` and spaced en dashes become an em dash, ``...``
    characters become three dots, emphasis markers (``*``, ``_``) go, whitespace (newlines
    included) collapses to single spaces. Applied to both sides of a pair, it leaves a
    judge nothing to tell real from generated text by but the words.

    >>> print(normalize_typography('\u201cWell\u2019s\u201d -- _he_ said\u2026\\n*Yes*'))
    "Well's" \u2014 he said... Yes
    """
    text = text.translate(_TYPOGRAPHY).replace("\u2026", "...").replace("--", "\u2014")
    text = text.replace(" \u2013 ", " \u2014 ")
    return normalize_space(text)


def split_sentences(text: str) -> list[str]:
    """Split a paragraph into sentences (rule-based, English).

    A boundary is ``.``, ``!`` or ``?`` (plus closing quotes) followed by whitespace, unless
    the word before it is a known abbreviation ("Mr.") or a single capital initial ("J.").

    >>> split_sentences('Mr. Holmes sat down. "Well?" said he. It was late.')
    ['Mr. Holmes sat down.', '"Well?" said he.', 'It was late.']
    """
    text = normalize_space(text)
    if not text:
        return []
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        end = m.end()
        before = text[start:m.start()]
        last = before.rsplit(" ", 1)[-1].strip("\"'\u201c\u2018([")
        if m.group(0).startswith(".") and (last.lower() in _ABBREVIATIONS
                                           or (len(last) == 1 and last.isupper())):
            continue
        nxt = text[end:].lstrip()
        # "he said?" followed by a lower-case word is usually dialogue, not a new sentence.
        if nxt[:1].islower() and m.group(0)[-1] in "\"'\u201d\u2019":
            continue
        sentences.append(text[start:end].strip())
        start = end
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def words(text: str) -> list[str]:
    """Alphabetic words (with inner apostrophes), in order, case kept."""
    return _WORD.findall(text)


def count_words(text: str) -> int:
    return len(text.split())


def split_prompt(text: str, *, min_prompt_words: int = 8, max_prompt_sentences: int = 3,
                 min_continuation_words: int = 25) -> tuple[str, str] | None:
    """``(prompt, continuation)``: the opening sentence(s) of a paragraph and the rest.

    The prompt is the shortest run of opening sentences with at least
    ``min_prompt_words`` words (at most ``max_prompt_sentences`` sentences); the
    continuation must keep ``min_continuation_words``. Returns None when no split fits.

    >>> split_prompt("It rained. The roads were flooded and cold. " + "We walked on. " * 10,
    ...              min_prompt_words=5, min_continuation_words=10)[0]
    'It rained. The roads were flooded and cold.'
    """
    sentences = split_sentences(text)
    for k in range(1, min(max_prompt_sentences, len(sentences) - 1) + 1):
        prompt = " ".join(sentences[:k])
        if count_words(prompt) < min_prompt_words:
            continue
        continuation = " ".join(sentences[k:])
        if count_words(continuation) < min_continuation_words:
            return None
        return prompt, continuation
    return None


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions) between two sequences.

    Works on strings (characters) or lists (e.g. words). O(len(a) * len(b)).

    >>> levenshtein("kitten", "sitting"), levenshtein("a b c".split(), "a x c".split())
    (3, 1)
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def word_edit_distance(a: str, b: str) -> int:
    """Edit distance counted in whitespace-separated tokens."""
    return levenshtein(a.split(), b.split())


def longest_common_run(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest run of consecutive equal items shared by ``a`` and ``b``."""
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            if x == y:
                current[j] = previous[j - 1] + 1
                if current[j] > best:
                    best = current[j]
        previous = current
    return best
