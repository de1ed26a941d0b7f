"""Stylometric features and evidence-grounded "bootstrap" reasoning traces.

Without a teacher LLM, stage-1 traces are written from evidence a reader can check in the
texts: the content words each candidate shares with the exemplars and the person's visible
habits (punctuation, person of address) each shows or breaks; the full style also cites
sentence length, word length and function-word profile. A trace only argues for the verdict
its evidence supports, and is only written when that verdict is the real text's (see
:func:`evidence_trace`); such traces are labelled ``bootstrap:evidence``.

Everything here is pure.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from .text import split_sentences, words

FUNCTION_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had
has have having he her here hers herself him himself his how i if in into is it its itself just
me might more most must my myself no nor not now of off on once only or other ought our ours
ourselves out over own same shall she should so some such than that the their theirs them
themselves then there these they this those through to too under until up upon very was we
were what when where which while who whom why will with would yet you your yours yourself
yourselves whilst though although whether thus hence indeed therefore however
""".split())

_PUNCT = {"commas": ",", "semicolons": ";", "colons": ":", "dashes": "\u2014", "exclamations": "!",
          "questions": "?", "quotation marks": '"'}
_PROFILE_WORDS = sorted(FUNCTION_WORDS)


@dataclass(frozen=True)
class Features:
    n_words: int
    sentence_length: float              # mean words per sentence
    word_length: float                  # mean letters per word
    punctuation: dict[str, float]       # per 100 words
    function_profile: dict[str, float]  # relative frequency of each function word
    content_words: frozenset[str]


def features(text: str) -> Features:
    toks = [w.lower() for w in words(text)]
    n = max(1, len(toks))
    sentences = split_sentences(text) or [text]
    normalized = text.replace("--", "\u2014").replace("\u201c", '"').replace("\u201d", '"')
    punct = {name: 100.0 * normalized.count(ch) / n for name, ch in _PUNCT.items()}
    counts = Counter(t for t in toks if t in FUNCTION_WORDS)
    profile = {w: counts[w] / n for w in _PROFILE_WORDS if counts[w]}
    return Features(
        n_words=len(toks),
        sentence_length=len(toks) / max(1, len(sentences)),
        word_length=sum(len(t) for t in toks) / n,
        punctuation=punct,
        function_profile=profile,
        content_words=frozenset(t for t in toks if t not in FUNCTION_WORDS and len(t) > 2),
    )


def cosine(a: dict[str, float], b: dict[str, float]) -> float:
    dot = sum(v * b.get(k, 0.0) for k, v in a.items())
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0


@dataclass(frozen=True)
class Comparison:
    """One candidate measured against the exemplars' profile."""

    features: Features
    sentence_gap: float
    word_length_gap: float
    punctuation_gap: float
    function_similarity: float
    vocabulary_overlap: float   # share of the candidate's content words found in the exemplars

    def distance(self, profile: Features) -> float:
        # A weighted sum of gaps, each scaled to roughly 0-1 on ordinary prose.
        return (self.sentence_gap / max(5.0, profile.sentence_length)
                + self.word_length_gap / 1.5
                + self.punctuation_gap / 20.0
                + (1.0 - self.function_similarity)
                + (1.0 - self.vocabulary_overlap))


def compare(profile: Features, candidate: str) -> Comparison:
    f = features(candidate)
    punct_gap = sum(abs(f.punctuation[k] - profile.punctuation[k]) for k in _PUNCT)
    overlap = (len(f.content_words & profile.content_words) / len(f.content_words)
               if f.content_words else 0.0)
    return Comparison(f, abs(f.sentence_length - profile.sentence_length),
                      abs(f.word_length - profile.word_length), punct_gap,
                      cosine(f.function_profile, profile.function_profile), overlap)


#: Habits a small model can check by looking (present or not), named as a trace names them.
HABITS: tuple[tuple[str, Any], ...] = (
    ("semicolons", ";"), ("colons", ":"), ("dashes", "\u2014"), ("exclamations", "!"),
    ("questions", "?"), ("quotation marks", '"'), ("parentheses", "("),
    ("first person", ("i", "me", "my", "mine")), ("second person", ("you", "your", "yours")),
    ("first person plural", ("we", "us", "our", "ours")),
)
#: How a brief trace writes each habit.
HABIT_MARKS = {"semicolons": ";", "colons": ":", "dashes": "\u2014", "exclamations": "!", "questions": "?",
               "quotation marks": '"', "parentheses": "(", "first person": "I", "second person": "you",
               "first person plural": "we"}
MAX_SHARED = 8   # words listed (and counted) per candidate
MIN_SHARED_LETTERS = 4


def habits(text: str) -> list[str]:
    """The :data:`HABITS` ``text`` shows, in :data:`HABITS` order."""
    toks = {w.lower() for w in words(text)}
    found = []
    for name, mark in HABITS:
        if (mark in text) if isinstance(mark, str) else any(w in toks for w in mark):
            found.append(name)
    return found


def shared_words(exemplars: Sequence[str], text: str, limit: int = MAX_SHARED) -> list[str]:
    """Content words of ``text`` (in order, once each) that also occur in the exemplars.

    Content words: at least :data:`MIN_SHARED_LETTERS` letters and not function words,
    compared lower-cased. At most ``limit`` are returned.
    """
    vocab = {w.lower() for ex in exemplars for w in words(ex)}
    out: list[str] = []
    for w in words(text):
        lw = w.lower()
        if len(lw) >= MIN_SHARED_LETTERS and lw not in FUNCTION_WORDS and lw in vocab and lw not in out:
            out.append(lw)
            if len(out) == limit:
                break
    return out


@dataclass(frozen=True)
class Evidence:
    """What one candidate shares with the exemplars, and the score a trace argues from."""

    shared: tuple[str, ...]
    habits_shared: tuple[str, ...]
    habits_foreign: tuple[str, ...]

    @property
    def score(self) -> int:
        return len(self.shared) + len(self.habits_shared) - len(self.habits_foreign)


def evidence(exemplars: Sequence[str], text: str) -> Evidence:
    person = set(habits("\n".join(exemplars)))
    own = habits(text)
    return Evidence(tuple(shared_words(exemplars, text)), tuple(h for h in own if h in person),
                    tuple(h for h in own if h not in person))


def _listing(items: Sequence[str], none: str = "none") -> str:
    return ", ".join(items) if items else none


def _evidence_line(pos: str, ev: Evidence) -> str:
    n = len(ev.shared)
    line = (f"Response {pos}: {n} word{'s' if n != 1 else ''} shared with the exemplars "
            f"({_listing(ev.shared)}); the person's habits it shows: {_listing(ev.habits_shared)}")
    if ev.habits_foreign:
        line += f"; habits the person does not show: {_listing(ev.habits_foreign)}"
    return line + "."


@dataclass(frozen=True)
class EvidenceTrace:
    """A reasoning trace argued from evidence, or why none could be written."""

    reasoning: str | None
    scores: tuple[int, int] | None
    outcome: str      # "favours_real", "evidence_disagrees" or "evidence_tied"


def evidence_trace(exemplars: Sequence[str], prompt: str, chosen: str, rejected: str,
                   chosen_position: str, brief: bool = True) -> EvidenceTrace:
    """A trace that argues only from what it can show, for the real text at ``chosen_position``.

    The evidence: content words each candidate shares with the exemplars (listed, counted)
    and the person's visible habits (:data:`HABITS`) each candidate shows or breaks. The
    trace is written only when that evidence favours the real text (``favours_real``); when
    it points the other way or ties, no trace is written (the outcome says which), since a
    trace that concluded for the real text anyway would teach a verdict without evidence.
    Nothing in it depends on knowing which text is real beyond the verdict the evidence gives.
    ``brief=False`` adds the stylometric measures that favour the same verdict, and only those.

    Returns scores ``(score_A, score_B)`` that grow apart with the evidence margin.
    """
    if chosen_position not in ("A", "B"):
        raise ValueError(f"chosen_position must be 'A' or 'B', got {chosen_position!r}")
    real, other = chosen_position, "B" if chosen_position == "A" else "A"
    ev = {real: evidence(exemplars, chosen), other: evidence(exemplars, rejected)}
    margin = ev[real].score - ev[other].score
    if margin <= 0:
        return EvidenceTrace(None, None, "evidence_tied" if margin == 0 else "evidence_disagrees")
    person = habits("\n".join(exemplars))
    high, low = min(9, 6 + margin), max(2, 5 - margin)
    scores = (high, low) if real == "A" else (low, high)
    if brief:
        # Compact, for small models: habits as the marks themselves, which a model can spot and copy.
        def marks(names: Sequence[str]) -> str:
            return " ".join(HABIT_MARKS[n] for n in names) or "none"

        lines = [f"Person: {marks(person)}."]
        for pos in ("A", "B"):
            e = ev[pos]
            line = f"{pos}: {len(e.shared)} shared ({_listing(e.shared)}); habits {marks(e.habits_shared)}"
            if e.habits_foreign:
                line += f"; not theirs {marks(e.habits_foreign)}"
            lines.append(line + ".")
        lines.append(f"A: {ev['A'].score}, B: {ev['B'].score}. {real} is closer.")
        return EvidenceTrace("\n".join(lines), scores, "favours_real")
    lines = [f"The person's habits in the exemplars: {_listing(person)}."]
    lines += [_evidence_line(pos, ev[pos]) for pos in ("A", "B")]
    profile = features("\n\n".join(exemplars))
    cmp = {real: compare(profile, chosen), other: compare(profile, rejected)}
    measures = [
        ("sentence length", cmp[real].sentence_gap < cmp[other].sentence_gap,
         f"its sentences average {cmp[real].features.sentence_length:.0f} words against the exemplars' "
         f"{profile.sentence_length:.0f} and Response {other}'s {cmp[other].features.sentence_length:.0f}"),
        ("word length", cmp[real].word_length_gap < cmp[other].word_length_gap,
         f"its words average {cmp[real].features.word_length:.2f} letters against the exemplars' "
         f"{profile.word_length:.2f} and Response {other}'s {cmp[other].features.word_length:.2f}"),
        ("function words", cmp[real].function_similarity > cmp[other].function_similarity,
         f"its function words are closer to the exemplars' (cosine {cmp[real].function_similarity:.2f} "
         f"against {cmp[other].function_similarity:.2f})"),
    ]
    for name, favours, why in measures:
        if favours:
            lines.append(f"On {name}, Response {real} is closer: {why}.")
    lines.append(f"Response {real} shares more of the person's words and habits than Response {other} "
                 f"({ev[real].score} against {ev[other].score}), so it is more likely their writing.")
    return EvidenceTrace("\n".join(lines), scores, "favours_real")
