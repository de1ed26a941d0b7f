"""Stylometric features and evidence-grounded "bootstrap" reasoning traces.

Without a teacher LLM, stage-1 traces are written from measurements: sentence length,
punctuation habits, function-word profile, word length, vocabulary overlap with the
exemplars, and (when the candidates differ in a few words only) the differing words
themselves. The text cites the numbers, compares each candidate with the exemplars and
ends in the correct answer; such traces are labelled ``bootstrap:stylometry``.

Everything here is pure.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

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


def _habits(f: Features) -> str:
    marks = sorted(((v, k) for k, v in f.punctuation.items() if v >= 0.5), reverse=True)[:3]
    if marks:
        return ", ".join(f"{v:.1f} {k}" for v, k in marks) + " per 100 words"
    return "almost no punctuation beyond full stops"


def _diff_words(a: str, b: str) -> list[tuple[str, str]] | None:
    ta, tb = a.split(), b.split()
    if len(ta) != len(tb):
        return None
    diff = [(x, y) for x, y in zip(ta, tb) if x != y]
    return diff if 0 < len(diff) <= 6 else None


def _strip(token: str) -> str:
    return "".join(c for c in token if c.isalpha() or c == "'").lower()


def bootstrap_reasoning(exemplars: Sequence[str], prompt: str, chosen: str, rejected: str,
                        chosen_position: str, brief: bool = False) -> tuple[str, tuple[int, int], bool]:
    """A readable, evidence-grounded analysis ending in the correct answer.

    ``brief`` keeps only the key numbers and the conclusion (about a fifth of the length):
    for small models and CPU runs, where every generated token counts.

    Returns ``(reasoning, (score_A, score_B), agrees)``: the scores always rank the real text
    (at ``chosen_position``) higher; ``agrees`` says whether the overall stylometric distance
    also favours it (it may not: the trace then cites the measures that do and names the
    ones that do not).
    """
    if chosen_position not in ("A", "B"):
        raise ValueError(f"chosen_position must be 'A' or 'B', got {chosen_position!r}")
    real, other = chosen_position, "B" if chosen_position == "A" else "A"
    profile = features("\n\n".join(exemplars))
    cmp = {real: compare(profile, chosen), other: compare(profile, rejected)}
    text = {real: chosen, other: rejected}

    top_function = sorted(profile.function_profile.items(), key=lambda kv: -kv[1])[:5]
    distinctive = sorted(profile.content_words, key=lambda w: (-len(w), w))[:4]
    lines = [
        f"The {len(exemplars)} exemplar(s) show a writer whose sentences average "
        f"{profile.sentence_length:.1f} words, with words of {profile.word_length:.2f} letters on average "
        f"and {_habits(profile)}. Their most frequent function words are "
        + ", ".join(f'"{w}"' for w, _ in top_function)
        + ("; their vocabulary includes words such as " + ", ".join(f'"{w}"' for w in distinctive) + "."
           if distinctive else "."),
        "",
    ]
    for pos in ("A", "B"):
        c = cmp[pos]
        lines.append(
            f"Response {pos}: sentences average {c.features.sentence_length:.1f} words, words "
            f"{c.features.word_length:.2f} letters, {_habits(c.features)}; its function-word profile has a "
            f"cosine similarity of {c.function_similarity:.2f} with the exemplars, and "
            f"{100 * c.vocabulary_overlap:.0f}% of its content words also occur in them.")
    lines.append("")

    measures = [
        ("sentence length", cmp[real].sentence_gap, cmp[other].sentence_gap, "is closer to the exemplars' average"),
        ("word length", cmp[real].word_length_gap, cmp[other].word_length_gap, "is closer to the exemplars' average"),
        ("punctuation habits", cmp[real].punctuation_gap, cmp[other].punctuation_gap,
         "is nearer the exemplars' rates"),
        ("function words", -cmp[real].function_similarity, -cmp[other].function_similarity,
         "uses function words more like the exemplars"),
        ("vocabulary", -cmp[real].vocabulary_overlap, -cmp[other].vocabulary_overlap,
         "shares more of the exemplars' vocabulary"),
    ]
    favour_real = [(name, why) for name, r, o, why in measures if r < o - 1e-9]
    favour_other = [name for name, r, o, _ in measures if o < r - 1e-9]
    for name, why in favour_real:
        lines.append(f"On {name}, Response {real} {why} than Response {other}.")
    if favour_other:
        lines.append(f"Response {other} is closer on {', '.join(favour_other)}, so these measures alone "
                     "do not settle it.")

    diff = _diff_words(text[real], text[other])
    if diff:
        vocab = {w for ex in exemplars for w in (t.lower() for t in words(ex))}
        ours = [_strip(x) for x, _ in diff]
        theirs = [_strip(y) for _, y in diff]
        in_real = sum(w in vocab for w in ours)
        in_other = sum(w in vocab for w in theirs)
        lines.append(
            f"The two responses differ in only {len(diff)} words: Response {real} has "
            + ", ".join(f'"{w}"' for w in ours) + f" where Response {other} has "
            + ", ".join(f'"{w}"' for w in theirs) + ". "
            f"{in_real} of Response {real}'s words and {in_other} of Response {other}'s appear in the exemplars. "
            f"Everything else is identical, so the question is whose word choice this is: Response {other}'s "
            "words look like synonyms swapped into the sentence, while Response "
            f"{real}'s fit the register of the exemplars.")
    d_real, d_other = cmp[real].distance(profile), cmp[other].distance(profile)
    agrees = d_real < d_other
    n_for = len(favour_real) + (1 if diff else 0)
    lines.append("")
    lines.append(
        f"Overall, Response {real} matches this person's habits better"
        + (f" on {len(favour_real)} of {len(measures)} measures" if favour_real else "")
        + (" and in its word choice" if diff else "")
        + f", so it is more likely to be their own writing than Response {other}.")
    strength = max(0.0, min(1.0, (d_other - d_real) / 0.5 + 0.15 * n_for))
    high = 7 + round(2 * strength)
    low = max(1, high - 2 - round(3 * strength))
    scores = (high, low) if real == "A" else (low, high)
    if brief:
        short = [f"Exemplars: {profile.sentence_length:.0f} words per sentence, {_habits(profile)}."]
        for pos in ("A", "B"):
            c = cmp[pos]
            short.append(f"Response {pos}: {c.features.sentence_length:.0f} words per sentence, function-word "
                         f"similarity {c.function_similarity:.2f}, {100 * c.vocabulary_overlap:.0f}% shared vocabulary.")
        short.append(lines[-1])
        return "\n".join(short), scores, agrees
    return "\n".join(lines), scores, agrees
