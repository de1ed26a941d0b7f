"""The evidence measures, pure: strings and numbers in, values out, no model and no I/O.

A PersRM judge with evidence reads, for each candidate, what a frozen language model (the
*scorer*) and simple text statistics say about it against the person's exemplars:

* **exemplar gain**: how much the exemplars raise the candidate's mean token log-probability,
  ``mean log p(c | exemplars, prompt) - mean log p(c | prompt)``. The person's own text is made
  more predictable by their other writing; another person's, or a generic imitation, less so.
* **fluency**: ``mean log p(c | prompt)``, without exemplars. When two candidates are nearly the
  same text, the one a few words were swapped in reads less fluently.
* **style**: cosine similarity of character n-gram profiles with the pooled exemplars (the
  classic authorship baseline).
* **copied**: the share of the candidate's words inside runs of at least :data:`COPY_RUN_WORDS`
  words that also stand in the exemplars, and the longest such run. Copied words are left out of
  both log-probability means (see :func:`copied_char_spans`), so copying the exemplars cannot buy
  exemplar gain; the share is reported so a judge can see it.

and, for the pair, how **alike** the two candidates are (word-level similarity): a nearly
identical pair is a tampered copy of one text, where fluency decides.

The model-backed part (log-probabilities) is in :mod:`openrlhf_persrm.evidence.scorers`; the
orchestration in :mod:`openrlhf_persrm.evidence.compute`. How evidence is shown to the judge is
:func:`openrlhf_persrm.judge_format.render_evidence`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

#: Version of the measures and of their rendering in the judge's input. A judge trained on one
#: version reads only that version; bump it whenever a measure or its rendering changes.
EVIDENCE_VERSION = 1

#: A run of this many words shared with the exemplars counts as copied.
COPY_RUN_WORDS = 8

#: Below this many scored tokens a mean log-probability says little; the gain is then 0.
MIN_SCORED_TOKENS = 3

_WS = re.compile(r"\s+")
_WORD = re.compile(r"[A-Za-z0-9']+|[^\sA-Za-z0-9']")


# --------------------------------------------------------------------------- style

def char_ngrams(text: str, n: int = 3) -> Counter:
    """Counts of lower-cased character n-grams, whitespace collapsed to single spaces."""
    t = _WS.sub(" ", text.lower()).strip()
    return Counter(t[i:i + n] for i in range(max(0, len(t) - n + 1)))


def cosine(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Cosine similarity of two sparse vectors (0.0 when either is empty)."""
    if len(a) > len(b):
        a, b = b, a
    dot = sum(v * b.get(k, 0.0) for k, v in a.items())
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0


def idf_table(documents: Sequence[str], n: int = 3) -> tuple[dict[str, float], float]:
    """Smoothed inverse document frequencies of character n-grams over ``documents``, and the
    weight of an n-gram seen in none of them: ``log((1 + N) / (1 + df)) + 1``."""
    df: Counter = Counter()
    for d in set(documents):
        df.update(char_ngrams(d, n).keys())
    n_docs = len(set(documents))
    return {g: math.log((1 + n_docs) / (1 + c)) + 1.0 for g, c in df.items()}, math.log(1 + n_docs) + 1.0


def style_similarity(exemplars: Sequence[str], text: str, *, n: int = 3,
                     idf: tuple[Mapping[str, float], float] | None = None) -> float:
    """Cosine similarity of ``text``'s character n-gram profile with the pooled exemplars'.

    ``idf``: an :func:`idf_table` to weight n-grams by (down-weights those every writer uses);
    plain term frequencies without it.

    >>> style_similarity(["the cat sat on the mat"], "the cat sat") > style_similarity(["the cat sat"], "xyz qrs")
    True
    """
    profile, cand = char_ngrams("\n".join(exemplars), n), char_ngrams(text, n)
    if idf is not None:
        table, unseen = idf
        profile = Counter({g: c * table.get(g, unseen) for g, c in profile.items()})
        cand = Counter({g: c * table.get(g, unseen) for g, c in cand.items()})
    return cosine(cand, profile)


# --------------------------------------------------------------------------- copying

def _word_spans(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0).lower(), m.start(), m.end()) for m in re.finditer(r"[A-Za-z0-9']+", text)]


def copied_char_spans(exemplars: Sequence[str], text: str, run: int = COPY_RUN_WORDS) -> list[tuple[int, int]]:
    """Character spans of ``text`` lying in runs of at least ``run`` consecutive words (case and
    punctuation ignored) that also stand, in that order, in one of the exemplars. Merged and sorted.

    >>> ex = ["one two three four five six seven eight nine"]
    >>> copied_char_spans(ex, "zero one two three four five six seven eight end")
    [(5, 44)]
    """
    words = _word_spans(text)
    if len(words) < run:
        return []
    grams: set[tuple[str, ...]] = set()
    for ex in exemplars:
        ex_words = [w for w, _, _ in _word_spans(ex)]
        grams.update(tuple(ex_words[i:i + run]) for i in range(len(ex_words) - run + 1))
    if not grams:
        return []
    covered = [False] * len(words)
    tokens = [w for w, _, _ in words]
    for i in range(len(words) - run + 1):
        if tuple(tokens[i:i + run]) in grams:
            for j in range(i, i + run):
                covered[j] = True
    spans: list[tuple[int, int]] = []
    for (_, start, end), c in zip(words, covered):
        if not c:
            continue
        if spans and _gap_is_copy(text, spans[-1][1], start):
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def _gap_is_copy(text: str, end: int, start: int) -> bool:
    return not re.search(r"[A-Za-z0-9]", text[end:start])


def copy_stats(exemplars: Sequence[str], text: str, run: int = COPY_RUN_WORDS) -> tuple[float, int]:
    """``(share of text's words copied from the exemplars, longest copied run in words)``.

    >>> copy_stats(["a b c d e f g h i j"], "a b c d e f g h i j")
    (1.0, 10)
    >>> copy_stats(["a b c d e f g h i j"], "nothing shared here at all")
    (0.0, 0)
    """
    words = _word_spans(text)
    if not words:
        return 0.0, 0
    spans = copied_char_spans(exemplars, text, run)
    inside = [any(s <= start and end <= e for s, e in spans) for _, start, end in words]
    longest = current = 0
    for flag in inside:
        current = current + 1 if flag else 0
        longest = max(longest, current)
    return round(sum(inside) / len(words), 4), longest


# --------------------------------------------------------------------------- the pair

def alike(a: str, b: str) -> float:
    """How alike two texts are, in [0, 1]: difflib's ratio over their word and punctuation tokens
    (case-sensitive). A synonym swap of 3-4 words in 60 scores about 0.95; two different texts
    well under 0.5.

    >>> alike("the cat sat on the mat", "the cat sat on the mat")
    1.0
    >>> round(alike("the cat sat on the mat", "the dog sat on the rug"), 2)
    0.67
    """
    ta, tb = _WORD.findall(a), _WORD.findall(b)
    if not ta and not tb:
        return 1.0
    return round(difflib.SequenceMatcher(None, ta, tb, autojunk=False).ratio(), 4)


@dataclass(frozen=True)
class CandidateEvidence:
    """What the measures say about one candidate (all position-free)."""

    logp_with: float      # mean token log-probability given the exemplars and the prompt
    logp_without: float   # ... given the prompt alone
    style: float          # character n-gram cosine with the pooled exemplars
    copied: float         # share of words copied from the exemplars
    longest_copied: int   # longest copied run, in words
    scored_tokens: int    # tokens the means are over (copied tokens left out)

    @property
    def gain(self) -> float:
        """Exemplar gain: how much the exemplars raise the mean log-probability (0 when too few
        tokens were scored)."""
        if self.scored_tokens < MIN_SCORED_TOKENS:
            return 0.0
        return self.logp_with - self.logp_without

    @property
    def fluency(self) -> float:
        return self.logp_without

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "CandidateEvidence":
        try:
            return cls(float(obj["logp_with"]), float(obj["logp_without"]), float(obj["style"]),
                       float(obj["copied"]), int(obj["longest_copied"]), int(obj["scored_tokens"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"candidate evidence {dict(obj)!r} is malformed: {exc}") from None


@dataclass(frozen=True)
class PairEvidence:
    """Evidence on two candidates, in the order given (``first``, ``second``), and how alike they are.

    Stored on pair rows with ``first`` the real text (``chosen``) and ``second`` the negative;
    :meth:`arranged` puts them in the A/B order a judgment shows.
    """

    first: CandidateEvidence
    second: CandidateEvidence
    alike: float
    scorer: str = ""
    version: int = EVIDENCE_VERSION

    def swapped(self) -> "PairEvidence":
        return PairEvidence(self.second, self.first, self.alike, self.scorer, self.version)

    def arranged(self, chosen_position: str) -> "PairEvidence":
        """With ``first`` the real text: the evidence in A/B order when the real text is at
        ``chosen_position``."""
        if chosen_position == "A":
            return self
        if chosen_position == "B":
            return self.swapped()
        raise ValueError(f"chosen_position must be 'A' or 'B', got {chosen_position!r}")

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "scorer": self.scorer, "alike": self.alike,
                "first": self.first.to_json(), "second": self.second.to_json()}

    @classmethod
    def from_json(cls, obj: Any) -> "PairEvidence":
        if not isinstance(obj, Mapping):
            raise ValueError(f"evidence must be an object, got {type(obj).__name__}")
        version = obj.get("version")
        if version != EVIDENCE_VERSION:
            raise ValueError(f"evidence version {version!r} is not {EVIDENCE_VERSION}: recompute it with this "
                             "release (`persrm evidence`), or judge with the release that made it")
        try:
            return cls(CandidateEvidence.from_json(obj["first"]), CandidateEvidence.from_json(obj["second"]),
                       float(obj["alike"]), str(obj.get("scorer", "")), int(version))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"evidence is malformed: missing {exc}") from None


# --------------------------------------------------------------------------- reading it

#: The measures a reader may trust, in the order the evidence block lists them.
MEASURES = ("gain", "fluency", "style")
MEASURE_NAMES = {"gain": "exemplar gain", "fluency": "fluency", "style": "style"}

#: Margins below the first bound are "barely", below the second "slightly", else "clearly".
#: Fixed on the development corpus's validation split (see docs/study-smollm2-cpu-evidence.md).
STRENGTH_BOUNDS = {"gain": (0.02, 0.08), "fluency": (0.03, 0.12), "style": (0.01, 0.04)}

#: Candidates at least this alike are treated as one text with a few words changed.
ALIKE_THRESHOLD = 0.6

#: A candidate with at least this share of words copied from the exemplars is a copy.
COPY_THRESHOLD = 0.5


def value(ev: CandidateEvidence, measure: str) -> float:
    if measure == "gain":
        return ev.gain
    if measure == "fluency":
        return ev.fluency
    if measure == "style":
        return ev.style
    raise ValueError(f"unknown measure {measure!r}; known: {', '.join(MEASURES)}")


def favours(pair: PairEvidence, measure: str) -> tuple[str | None, float]:
    """``('A' | 'B' | None, margin)``: which of ``pair`` (in A/B order) the measure favours."""
    a, b = value(pair.first, measure), value(pair.second, measure)
    if a == b:
        return None, 0.0
    return ("A" if a > b else "B"), abs(a - b)


def strength(measure: str, margin: float) -> str:
    low, high = STRENGTH_BOUNDS[measure]
    return "barely" if margin < low else "slightly" if margin < high else "clearly"


@dataclass(frozen=True)
class Reading:
    """What the fixed reader concludes from a pair's evidence (in A/B order)."""

    measure: str            # the measure it trusts here
    reason: str             # why that measure, in words
    preferred: str | None   # 'A', 'B' or None (the measure ties)
    strength: str           # barely / slightly / clearly


def read_evidence(pair: PairEvidence, *, alike_threshold: float = ALIKE_THRESHOLD,
                  copy_threshold: float = COPY_THRESHOLD) -> Reading:
    """The fixed reader: a copy of the exemplars loses; nearly identical candidates are one text
    with words swapped, so fluency decides; otherwise the exemplar gain decides.

    This is the procedure the evidence traces teach (``data_synth``) and the ``reader`` judge of
    ``persrm eval`` applies; a trained judge reads the same evidence and the texts and may learn
    when to trust something else.
    """
    copy_a, copy_b = pair.first.copied >= copy_threshold, pair.second.copied >= copy_threshold
    if copy_a != copy_b:
        return Reading("copied", "one is copied from the exemplars", "B" if copy_a else "A", "clearly")
    if pair.alike >= alike_threshold:
        measure, reason = "fluency", "nearly identical"
    else:
        measure, reason = "gain", "different texts"  # the words render_evidence uses for the pair
    side, margin = favours(pair, measure)
    return Reading(measure, reason, side, strength(measure, margin) if side else "barely")


def measure_accuracy(evidence: Sequence[PairEvidence]) -> dict[str, float]:
    """How often each measure alone, and the fixed reader, picks the real text, over pairs whose
    ``first`` is the real text (ties count one half); and how alike the pairs are on average."""
    if not evidence:
        return {}
    out: dict[str, float] = {}
    for m in MEASURES:
        won = 0.0
        for ev in evidence:
            side, _ = favours(ev, m)
            won += 1.0 if side == "A" else 0.5 if side is None else 0.0
        out[m] = round(won / len(evidence), 4)
    reader = [read_evidence(ev).preferred for ev in evidence]
    out["reader"] = round(sum(1.0 if p == "A" else 0.5 if p is None else 0.0 for p in reader) / len(evidence), 4)
    out["alike"] = round(sum(ev.alike for ev in evidence) / len(evidence), 4)
    return out
