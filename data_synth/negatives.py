"""Rejected responses ("negatives") and the checks every negative must pass.

Four kinds (names from :data:`openrlhf_persrm.pairs.KNOWN_NEGATIVE_TYPES`):

* ``minor_replacement``: 3-4 adjectives, adverbs or regular verbs of the real continuation
  replaced by close WordNet synonyms, nothing else changed (offline);
* ``cross_author``: a real continuation by another author, of similar length (offline);
* ``style_mimic``: a teacher LLM continues the prompt imitating the author's exemplars;
* ``style_random``: a teacher LLM continues the prompt in a random, clearly different style.

The builders here are pure (text and a seeded ``random.Random`` in, text out); the teacher
kinds only build the request and clean the reply. :func:`check_negative` returns the
reason a candidate is rejected, or None.
"""

from __future__ import annotations

import bisect
import random
import re
from dataclasses import dataclass
from typing import Sequence

from .lexicon import WordNet
from .stylometry import FUNCTION_WORDS
from .text import (count_words, longest_common_run, normalize_space, normalize_typography, split_sentences,
                   word_edit_distance)

TEACHER_TYPES = ("style_mimic", "style_random")

#: The prompt of a ``cross_author`` pair (``--pairs.cross_author_prompt neutral``): another
#: author's paragraph cannot continue this person's opening, so both candidates are whole
#: paragraphs answering the same neutral request, and the prompt gives neither away.
NEUTRAL_PROMPT = "Write a paragraph in your own words."
OFFLINE_TYPES = ("minor_replacement", "cross_author")
ALL_TYPES = ("minor_replacement", "style_mimic", "style_random", "cross_author")

#: Styles for ``style_random``: each clearly unlike literary prose of any one person.
RANDOM_STYLES = (
    "a breezy modern lifestyle blogger, with short upbeat sentences and exclamation marks",
    "a terse police incident report, in flat bureaucratic language",
    "a sports commentator calling a match live, excited and fragmented",
    "a corporate press release full of business jargon",
    "a teenager texting a friend, casual, lower-case, with slang",
    "a legal contract clause, formal and full of qualifications",
    "a children's picture book, with very simple words and short sentences",
    "a pirate captain addressing his crew, salty and boisterous",
    "a technical instruction manual, numbered steps and imperative verbs",
    "a weather forecaster on morning radio, cheerful and precise",
    "a hard-boiled 1940s detective narrator, cynical and clipped",
    "a scientific abstract, impersonal and dense with hedging",
    "an over-enthusiastic real-estate listing",
    "a medieval chronicle, solemn and archaic",
    "a stand-up comedian's monologue, conversational with punchlines",
    "a product review on a shopping site, opinionated and informal",
)

_SPAN = re.compile(r"(?<![A-Za-z'\u2019-])[A-Za-z]+(?![A-Za-z'\u2019-])")
_VOWELS = set("aeiou")


@dataclass(frozen=True)
class Replacement:
    position: int      # character offset in the original text
    original: str
    replacement: str
    pos: str           # WordNet part of speech: a, r, v


def _cvc(word: str) -> bool:
    # consonant-vowel-consonant endings double their last letter in some inflections
    # (stop -> stopped): skip such synonyms rather than guess.
    return (len(word) >= 3 and word[-1] not in _VOWELS and word[-1] not in "wxy"
            and word[-2] in _VOWELS and word[-3] not in _VOWELS)


def _inflect(lemma: str, suffix: str) -> str | None:
    if suffix == "":
        return lemma
    if lemma.endswith("y") or _cvc(lemma):
        return None
    if suffix == "ed":
        return lemma + "d" if lemma.endswith("e") else lemma + "ed"
    if suffix == "ing":
        if lemma.endswith("ee") or lemma.endswith("ie"):
            return None
        return lemma[:-1] + "ing" if lemma.endswith("e") else lemma + "ing"
    return None


_VERB_CONTEXT = frozenset("to would could should will shall might must may can did do does not never".split())
_EXCLUDED = frozenset("still else even ever much many more most less least well quite rather very such only "
                      "also just really".split())


def _analyse(word: str, wn: WordNet, prev: str = "") -> tuple[str, str, str] | None:
    """``(pos, lemma, suffix)`` for a replaceable adjective, adverb or verb form.

    ``suffix`` tells how to inflect a synonym: "" (as is), "ed" (past or participle),
    "ing". Participles are treated as verbs, never adjectives, and word forms that can be
    nouns are left alone (a synonym of the wrong part of speech would be a grammar error).
    """
    if word in FUNCTION_WORDS or word in _EXCLUDED or len(word) < 4:
        return None
    if word.endswith("ly") and wn.has(word, "r") and wn.tagged(word, "r") > 0:
        return "r", word, ""
    tag_a, tag_n, tag_v = wn.tagged(word, "a"), wn.tagged(word, "n"), wn.tagged(word, "v")
    participle = word.endswith(("ed", "en", "ing")) or word in wn.verb_forms
    if not participle and wn.has(word, "a") and tag_a > 0 and tag_a >= tag_n and tag_a >= tag_v:
        return "a", word, ""
    if wn.has(word, "n") or (wn.has(word, "a") and tag_a > 0):
        return None
    if prev in _VERB_CONTEXT and wn.has(word, "v") and tag_v > 0 and not participle:
        return "v", word, ""
    irregular = wn.verb_forms.get(word)
    if irregular and irregular != word and not wn.has(word, "v") and not word.endswith(("ing", "s")):
        if wn.tagged(irregular, "v") > 0:
            return "v", irregular, "ed"  # a past form: a regular synonym takes -ed
    for suffix in ("ed", "ing"):
        if not word.endswith(suffix):
            continue
        stem = word[: -len(suffix)]
        for lemma in (stem + "e", stem) if suffix == "ing" else (stem, word[:-1]):
            if wn.has(lemma, "v") and wn.tagged(lemma, "v") > 0 and lemma not in wn.irregular_verbs \
                    and _inflect(lemma, suffix) == word:
                return "v", lemma, suffix
    return None


def replaceable_words(text: str, wn: WordNet) -> list[tuple[int, str, list[tuple[str, str]]]]:
    """Words of ``text`` that have close synonyms: ``(offset, word, [(replacement, pos), ...])``.

    Only lower-case words are considered (capitalised words may be names). A replacement
    that would break "a"/"an" agreement with the preceding article is left out.
    """
    out = []
    previous = ""
    for m in _SPAN.finditer(text):
        word = m.group(0)
        prev, previous = previous, word.lower()
        if not word.islower():
            continue
        analysis = _analyse(word, wn, prev)
        if analysis is None:
            continue
        pos, lemma, suffix = analysis
        options = []
        for _ in (0,):
            for syn in wn.synonyms(lemma, pos):
                if pos == "v" and syn in wn.irregular_verbs:
                    continue
                if pos == "r" and word.endswith("ly") and not syn.endswith("ly"):
                    continue  # "easily" -> "easy" reads as a grammar slip, not a synonym
                form = _inflect(syn, suffix)
                if not form or form == word or form.startswith(word[:4]) or word.startswith(form[:4]):
                    continue
                if prev in ("a", "an") and ((form[0] in _VOWELS) != (word[0] in _VOWELS)):
                    continue
                if (form, pos) not in options:
                    options.append((form, pos))
            if options:
                break  # prefer the closest (first-sense) synonyms
        if options:
            out.append((m.start(), word, options))
    return out


def minor_replacement(text: str, wn: WordNet, rng: random.Random, *, min_replaced: int = 3,
                      max_replaced: int = 4) -> tuple[str, list[Replacement]] | None:
    """Replace ``min_replaced``..``max_replaced`` words of ``text`` by close synonyms.

    Returns the new text and what was replaced, or None when fewer than ``min_replaced``
    words can be replaced. Everything outside the replaced words is kept byte for byte.
    """
    candidates = replaceable_words(text, wn)
    if len(candidates) < min_replaced:
        return None
    k = min(rng.randint(min_replaced, max_replaced), len(candidates))
    chosen = sorted(rng.sample(range(len(candidates)), k))
    pieces, last, done = [], 0, []
    for i in chosen:
        offset, word, options = candidates[i]
        form, pos = options[rng.randrange(min(2, len(options)))]
        pieces.append(text[last:offset])
        pieces.append(form)
        last = offset + len(word)
        done.append(Replacement(offset, word, form, pos))
    pieces.append(text[last:])
    return "".join(pieces), done


@dataclass(frozen=True)
class Continuation:
    uid: str
    author: str
    text: str
    n_words: int


class CrossAuthorPool:
    """Real continuations of one split, searchable by length."""

    def __init__(self, items: Sequence[Continuation]):
        self.items = sorted(items, key=lambda c: (c.n_words, c.uid))
        self._lengths = [c.n_words for c in self.items]

    def pick(self, author: str, n_words: int, rng: random.Random, *, tolerance: float = 0.2,
             exclude: frozenset[str] = frozenset()) -> Continuation | None:
        """A continuation by another author whose length is within ``tolerance`` of ``n_words``."""
        lo = bisect.bisect_left(self._lengths, n_words * (1 - tolerance))
        hi = bisect.bisect_right(self._lengths, n_words * (1 + tolerance))
        options = [c for c in self.items[lo:hi] if c.author != author and c.uid not in exclude]
        if not options:
            return None
        # The author first, uniformly, then one of their paragraphs: negatives then come from every
        # author as evenly as targets do, not mostly from the most prolific ones (whose typography
        # would otherwise mark "the negative").
        by_author: dict[str, list[Continuation]] = {}
        for c in options:
            by_author.setdefault(c.author, []).append(c)
        other = rng.choice(sorted(by_author))
        return rng.choice(by_author[other])


def cross_author(author: str, n_words: int, pool: CrossAuthorPool, rng: random.Random,
                 *, exclude: frozenset[str] = frozenset()) -> Continuation | None:
    """Another author's real continuation of similar length (closest band first)."""
    for tolerance in (0.15, 0.3, 0.5):
        found = pool.pick(author, n_words, rng, tolerance=tolerance, exclude=exclude)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------- teacher kinds

def mimic_messages(exemplars: Sequence[str], prompt: str, n_words: int) -> list[dict[str, str]]:
    """Chat messages asking a teacher to continue ``prompt`` in the exemplars' voice."""
    shown = "\n\n".join(f"<passage>\n{ex}\n</passage>" for ex in exemplars)
    return [
        {"role": "system", "content": "You are a skilled literary imitator: you continue texts in the "
                                      "exact voice of a given writer."},
        {"role": "user", "content": (
            f"Passages written by one person:\n\n{shown}\n\n"
            "Continue the opening below as this person would, matching their vocabulary, sentence "
            f"length, punctuation and tone. Write one paragraph of about {n_words} words. Output only "
            f"the continuation, without repeating the opening.\n\nOpening: {prompt}")},
    ]


def random_style_messages(prompt: str, n_words: int, style: str) -> list[dict[str, str]]:
    """Chat messages asking a teacher to continue ``prompt`` in the given, different style."""
    return [
        {"role": "system", "content": "You are a versatile writer who can write in any style."},
        {"role": "user", "content": (
            f"Continue the opening below in the style of {style}. Write one paragraph of about "
            f"{n_words} words. Output only the continuation, without repeating the opening.\n\n"
            f"Opening: {prompt}")},
    ]


_THINK = re.compile(r"^.*</think>", re.DOTALL | re.IGNORECASE)
_PREAMBLE = re.compile(
    r"^\s*(?:sure|certainly|of course|okay|ok|here(?:'s| is| are)|continuation|the continuation)\b"
    r"[^\n:]{0,80}:\s*", re.IGNORECASE)


def clean_continuation(raw: str, prompt: str, *, max_words: int | None = None) -> str:
    """Turn a teacher's reply into a one-paragraph continuation.

    Drops reasoning blocks, chatty preambles ("Here is the continuation:"), wrapping quotes
    and a repeated opening; joins lines; cuts at a sentence boundary to ``max_words``.

    >>> clean_continuation('Sure! Here is the continuation:\\n"It rained all night."', "Opening.")
    'It rained all night.'
    """
    text = _THINK.sub("", raw or "")
    text = re.sub(r"<think>.*", "", text, flags=re.DOTALL | re.IGNORECASE)
    text = re.sub(r"^\s*(?:sure|certainly|of course|okay)[!.,]?\s*", "", text, flags=re.IGNORECASE)
    text = _PREAMBLE.sub("", text)
    text = normalize_typography(text)  # the same normalisation the real text gets
    prompt_n = normalize_typography(prompt)
    if prompt_n and text.startswith(prompt_n):
        text = text[len(prompt_n):].strip()
    quotes = {'"': '"', "'": "'"}
    if len(text) > 1 and text[0] in quotes and text.endswith(quotes[text[0]]):
        inner = text[1:-1]
        if text[0] not in inner and quotes[text[0]] not in inner:  # one quoted block, not dialogue
            text = inner.strip()
    if max_words is not None and count_words(text) > max_words:
        kept: list[str] = []
        for sentence in split_sentences(text):
            if count_words(" ".join(kept + [sentence])) > max_words:
                break
            kept.append(sentence)
        text = " ".join(kept) if kept else " ".join(text.split()[:max_words])
    return text


# --------------------------------------------------------------------------- checks

_END = re.compile(r"[.!?\u2014)\]\"']\s*$")


def ends_sentence(text: str) -> bool:
    """True if ``text`` ends like a finished sentence (terminal punctuation, maybe a closing quote)."""
    return bool(_END.search(text.strip()))


@dataclass(frozen=True)
class NegativeBounds:
    min_length_ratio: float = 0.5
    max_length_ratio: float = 2.0
    min_replaced: int = 3
    max_replaced: int = 4
    max_copied_words: int = 12


def check_negative(kind: str, chosen: str, rejected: str, *, exemplars: Sequence[str] = (),
                   prompt: str = "", bounds: NegativeBounds = NegativeBounds()) -> str | None:
    """Why ``rejected`` is not a usable negative for ``chosen`` (a short reason), or None.

    * every kind: non-empty, not identical to the real text (ignoring spacing and case),
      length ratio within bounds; ends like a finished sentence when the real text does
      (a reply cut at the token limit would give itself away);
    * ``minor_replacement``: same number of tokens and a word edit distance within
      [min_replaced, max_replaced];
    * teacher kinds: does not copy a run of ``max_copied_words`` words from an exemplar or
      the prompt.
    """
    if not rejected or not rejected.strip():
        return "empty"
    if normalize_space(rejected).lower() == normalize_space(chosen).lower():
        return "identical"
    n_chosen, n_rejected = count_words(chosen), count_words(rejected)
    ratio = n_rejected / max(1, n_chosen)
    if not bounds.min_length_ratio <= ratio <= bounds.max_length_ratio:
        return "length_ratio"
    if ends_sentence(chosen) and not ends_sentence(rejected):
        return "unfinished"
    if kind == "minor_replacement":
        if len(chosen.split()) != len(rejected.split()):
            return "edit_distance"
        distance = word_edit_distance(chosen, rejected)
        if not bounds.min_replaced <= distance <= bounds.max_replaced:
            return "edit_distance"
    if kind in TEACHER_TYPES:
        tokens = [w.lower() for w in rejected.split()]
        for source in list(exemplars) + [prompt]:
            if source and longest_common_run(tokens, [w.lower() for w in source.split()]) >= bounds.max_copied_words:
                return "copies_source"
    return None
