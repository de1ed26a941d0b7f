"""Judges for ``persrm eval``: the :class:`Judge` protocol, three baselines and the model judge.

A judge looks at pair records with the real text shown at a given position ('A' or 'B')
and returns, for each, ``(score_A, score_B)`` or a :class:`JudgeFailure`. The protocol is
batched because a model judge generates many prompts at once; the baselines score one
pair at a time (:class:`PairwiseJudge`).

Baselines (all deterministic):

* ``random``: a seeded coin per (seed, pair id, position): scores (1, 0) or (0, 1).
* ``length``: prefers the candidate whose length in characters (whitespace runs
  collapsed to one space) is closest to the mean length of the pair's exemplars; the
  score is minus that distance, so equal distances tie.
* ``stylometry``: the classic authorship baseline. Each text becomes a profile of
  character n-grams (default 3-grams, lower-cased, whitespace collapsed); the exemplars
  are pooled into one profile; each candidate is scored by the cosine similarity of its
  profile with the exemplars'. With ``weighting="tfidf"`` (the default) n-gram
  frequencies are weighted by a smoothed inverse document frequency fitted, per batch,
  on the distinct exemplar texts being judged (no labels are used), which down-weights
  n-grams every writer uses.

The ``model`` judge renders the judge format (:mod:`openrlhf_persrm.judge_format`) and
reads outputs with the strict parser; an unreadable output is a :class:`JudgeFailure`
named after its :class:`~openrlhf_persrm.judge_format.FailureKind`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from ..evidence.measures import PairEvidence, idf_table, style_similarity
from ..judge_format import ExemplarBudget, Judgment, PromptTooLong, arrange, build_messages, parse_judgment
from ..pairs import PairRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeFailure:
    """No readable scores for one judgment; ``kind`` is a short machine-readable reason."""

    kind: str
    detail: str = ""


Scores = tuple[float, float]
Outcome = Scores | JudgeFailure


@runtime_checkable
class Judge(Protocol):
    """Scores pair records with the real text shown at the given positions.

    ``judge(records, positions)`` returns one outcome per record: ``(score_A, score_B)``
    for the responses as shown, or a :class:`JudgeFailure`. ``progress``, if given, is a
    tqdm-like object whose ``update(n)`` is called as judgments complete. ``identity()``
    is what ``metrics.json`` records about the judge (name and settings).
    """

    name: str

    def identity(self) -> dict[str, Any]: ...

    def judge(self, records: Sequence[PairRecord], positions: Sequence[str], *,
              progress: Any = None) -> list[Outcome]: ...


class PairwiseJudge:
    """Base for judges that score one pair at a time: implement :meth:`score`."""

    name = "pairwise"

    def identity(self) -> dict[str, Any]:
        return {"name": self.name}

    def score(self, record: PairRecord, position: str) -> Outcome:
        raise NotImplementedError

    def prepare(self, records: Sequence[PairRecord]) -> None:
        """Hook run once per batch before scoring (e.g. fit statistics); default: nothing."""

    def judge(self, records: Sequence[PairRecord], positions: Sequence[str], *,
              progress: Any = None) -> list[Outcome]:
        if len(records) != len(positions):
            raise ValueError(f"{len(records)} records but {len(positions)} positions")
        self.prepare(records)
        out = []
        for rec, pos in zip(records, positions):
            out.append(self.score(rec, pos))
            if progress is not None:
                progress.update(1)
        return out


# --------------------------------------------------------------------------- baselines

@dataclass
class RandomJudge(PairwiseJudge):
    """A seeded fair coin per (seed, pair id, position): (1, 0) or (0, 1)."""

    seed: int = 0
    name: str = "random"

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed}

    def score(self, record: PairRecord, position: str) -> Outcome:
        digest = hashlib.sha256(f"{self.seed}\x00{record.id}\x00{position}".encode()).digest()
        return (1.0, 0.0) if digest[0] & 1 else (0.0, 1.0)


_WS = re.compile(r"\s+")


def normalized_length(text: str) -> int:
    """Characters after collapsing whitespace runs and stripping the ends."""
    return len(_WS.sub(" ", text).strip())


@dataclass
class LengthJudge(PairwiseJudge):
    """Prefers the candidate whose length is closest to the exemplars' mean length.

    Length is :func:`normalized_length` (characters); the score is ``-|len - mean|``.
    """

    name: str = "length"

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "rule": "closest to the exemplars' mean length in characters"}

    def score(self, record: PairRecord, position: str) -> Outcome:
        mean = sum(normalized_length(e) for e in record.exemplars) / len(record.exemplars)
        a, b = arrange(record.chosen, record.rejected, position)
        return -abs(normalized_length(a) - mean), -abs(normalized_length(b) - mean)


@dataclass
class StylometryJudge(PairwiseJudge):
    """Character n-gram profile cosine similarity to the exemplars; the more similar wins."""

    ngram: int = 3
    weighting: str = "tfidf"
    name: str = "stylometry"
    _idf: Any = field(default=None, init=False, repr=False)
    _n_docs: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.weighting not in ("tf", "tfidf"):
            raise ValueError(f"weighting must be 'tf' or 'tfidf', got {self.weighting!r}")
        if not 1 <= self.ngram <= 10:
            raise ValueError(f"ngram must be 1-10, got {self.ngram}")

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "ngram": self.ngram, "weighting": self.weighting,
                "idf_documents": self._n_docs if self.weighting == "tfidf" else None}

    def prepare(self, records: Sequence[PairRecord]) -> None:
        if self.weighting != "tfidf":
            return
        docs = sorted({e for r in records for e in r.exemplars})
        self._n_docs = len(docs)
        self._idf = idf_table(docs, self.ngram)

    def similarity(self, exemplars: Sequence[str], candidate: str) -> float:
        """:func:`openrlhf_persrm.evidence.measures.style_similarity`, weighted by the batch's idf with tfidf."""
        idf = self._idf if self.weighting == "tfidf" and self._idf else None
        return style_similarity(exemplars, candidate, n=self.ngram, idf=idf)

    def score(self, record: PairRecord, position: str) -> Outcome:
        a, b = arrange(record.chosen, record.rejected, position)
        return self.similarity(record.exemplars, a), self.similarity(record.exemplars, b)


@dataclass
class EvidenceJudge(PairwiseJudge):
    """The procedure the bootstrap (evidence) traces teach, applied exactly: content words shared with
    the exemplars plus the person's visible habits shown, minus habits they do not show
    (``data_synth.stylometry.evidence``). A trained judge that reads its own trace can at best match it."""

    name: str = "evidence"

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "rule": "shared content words + shared habits - foreign habits (evidence traces)"}

    def score(self, record: PairRecord, position: str) -> Outcome:
        from data_synth.stylometry import evidence  # deferred: data_synth is only needed by this judge

        a, b = arrange(record.chosen, record.rejected, position)
        return float(evidence(record.exemplars, a).score), float(evidence(record.exemplars, b).score)


# --------------------------------------------------------------------------- artefact judge

_CURLY = "\u201c\u201d\u2018\u2019\u201e\u00ab\u00bb"
_TERMINAL = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s*$")


def artefact_features(text: str) -> dict[str, float]:
    """Surface artefacts of one text, nothing about its words or style.

    Final character (class) and final punctuation, whether it ends like a finished sentence
    (a text cut at a token limit does not), typography (straight and curly quotes, dashes,
    ellipses, emphasis markers, non-ASCII characters), whitespace (newlines, doubled or
    edge spaces) and length (log characters and words).
    """
    n = max(1, len(text))
    stripped = text.strip()
    last = stripped[-1:] or " "
    first = stripped[:1] or " "
    per100 = 100.0 / n
    return {
        "ends_letter": float(last.isalnum()),
        "ends_period": float(last == "."),
        "ends_exclaim": float(last == "!"),
        "ends_question": float(last == "?"),
        "ends_quote": float(last in "\"'" + _CURLY),
        "ends_other": float(not last.isalnum() and last not in ".!?\"'" + _CURLY),
        "ends_sentence": float(bool(_TERMINAL.search(text))),
        "starts_lower": float(first.islower()),
        "starts_quote": float(first in "\"'" + _CURLY),
        "straight_quotes": text.count('"') * per100,
        "straight_apostrophes": text.count("'") * per100,
        "curly_quotes": sum(text.count(c) for c in _CURLY) * per100,
        "em_dashes": text.count("\u2014") * per100,
        "double_hyphens": text.count("--") * per100,
        "ellipses": (text.count("...") + text.count("\u2026")) * per100,
        "emphasis_marks": (text.count("*") + text.count("_")) * per100,
        "non_ascii": sum(ord(c) > 127 for c in text) * per100,
        "newlines": text.count("\n") * per100,
        "double_spaces": text.count("  ") * per100,
        "edge_spaces": float(text != text.strip()),
        "log_chars": math.log1p(len(text)),
        "log_words": math.log1p(len(text.split())),
    }


@dataclass
class ArtefactJudge(PairwiseJudge):
    """How far surface artefacts alone tell the real text from the negative: a shortcut detector.

    A pairwise logistic regression without intercept on the difference of
    :func:`artefact_features` (so swapping A and B flips the verdict), fitted on pairs with
    known labels, typically the train split (:meth:`fit`), then scored like any judge. On
    data without shortcuts it stays near 50%; well above that, the negatives give
    themselves away by typography, truncation or length, and a trained judge may learn that
    instead of the person.
    """

    l2: float = 1.0
    steps: int = 300
    name: str = "artefact"
    _weights: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _scale: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _n_fit: int = field(default=0, init=False, repr=False)

    def identity(self) -> dict[str, Any]:
        top = sorted(self._weights.items(), key=lambda kv: -abs(kv[1]))[:5]
        return {"name": self.name, "model": "pairwise logistic regression on surface artefacts",
                "fitted_on_pairs": self._n_fit, "top_weights": {k: round(v, 3) for k, v in top}}

    def fit(self, records: Sequence[PairRecord]) -> "ArtefactJudge":
        """Fit on labelled pairs (both orders, so the model has no position bias)."""
        import numpy as np  # deferred: only this judge needs it

        if not records:
            raise ValueError("the artefact judge needs labelled pairs to fit on (e.g. the train split)")
        names = list(artefact_features("x"))
        rows = []
        for r in records:
            fc, fr = artefact_features(r.chosen), artefact_features(r.rejected)
            rows.append([fc[k] - fr[k] for k in names])
        x = np.asarray(rows, dtype=np.float64)
        scale = x.std(axis=0)
        scale[scale == 0] = 1.0
        x = np.concatenate([x / scale, -x / scale])          # real at A, then real at B
        y = np.concatenate([np.ones(len(rows)), np.zeros(len(rows))])
        w = np.zeros(x.shape[1])
        lr = 0.5
        for _ in range(self.steps):
            p = 0.5 * (1.0 + np.tanh(0.5 * (x @ w)))  # the logistic function, without overflow
            grad = x.T @ (p - y) / len(y) + self.l2 * w / len(y)
            w -= lr * grad
        self._weights = dict(zip(names, w.tolist()))
        self._scale = dict(zip(names, scale.tolist()))
        self._n_fit = len(records)
        return self

    def logit(self, a: str, b: str) -> float:
        """Log-odds that ``a`` (rather than ``b``) is the real text."""
        if not self._weights:
            raise RuntimeError("ArtefactJudge.fit() must run before judging")
        fa, fb = artefact_features(a), artefact_features(b)
        return sum(w * (fa[k] - fb[k]) / self._scale[k] for k, w in self._weights.items())

    def score(self, record: PairRecord, position: str) -> Outcome:
        a, b = arrange(record.chosen, record.rejected, position)
        z = self.logit(a, b)
        return z / 2, -z / 2


def shortcut_report(rows: Sequence[dict[str, Any]], *, fit_split: str = "train") -> dict[str, Any]:
    """Shortcut baselines for a synth run's pairs: artefact and stylometry accuracy by split and type.

    The artefact judge is fitted on ``fit_split`` and scored on every other split (one order
    per pair, real text at A: the judge is antisymmetric, so the order does not matter).
    Returns ``{"fit_split", "fitted_on", split: {type: {"n", "artefact", "stylometry"}}}``;
    accuracies in [0, 1], ties counting one half.
    """
    from ..pairs import PairRecord as _Record

    records = [_Record.from_json(r) if isinstance(r, dict) else r for r in rows]
    train = [r for r in records if r.extra.get("split") == fit_split]
    out: dict[str, Any] = {"fit_split": fit_split, "fitted_on": len(train)}
    if not train:
        out["note"] = f"no {fit_split} pairs: the artefact judge could not be fitted"
        return out
    artefact = ArtefactJudge().fit(train)
    stylometry = StylometryJudge()
    by_split: dict[str, dict[str, list[PairRecord]]] = {}
    for r in records:
        split = str(r.extra.get("split"))
        if split != fit_split:
            by_split.setdefault(split, {}).setdefault(r.negative_type, []).append(r)
    for split, types in sorted(by_split.items()):
        stylometry.prepare([r for rs in types.values() for r in rs])
        table: dict[str, Any] = {}
        for ntype, rs in sorted(types.items()):
            acc = {}
            for label, judge in (("artefact", artefact), ("stylometry", stylometry)):
                won = 0.0
                for r in rs:
                    a, b = judge.score(r, "A")
                    won += 1.0 if a > b else 0.5 if a == b else 0.0
                acc[label] = round(won / len(rs), 4)
            table[ntype] = {"n": len(rs), **acc}
        out[split] = table
    return out


# --------------------------------------------------------------------------- evidence judges

def evidence_for(records: Sequence[PairRecord], scorer_model: str = "", *, batch_size: int = 8,
                 progress_desc: str = "evidence") -> dict[str, PairEvidence]:
    """Evidence on every record (``first`` = the real text), by pair id.

    A row's stored evidence (``persrm synth --evidence.scorer``) is used when no ``scorer_model`` is asked
    for or when it was measured by that model; the rest is measured with ``scorer_model`` (a local
    checkpoint or the built-in alias), with a progress bar. Raises when evidence is missing and no
    scorer is given."""
    from ..evidence import EvidenceInput, LocalScorer, jobs_needed, measure_pairs

    scorer = None
    wanted = ""
    if scorer_model:
        from ..models import resolve_model

        scorer = LocalScorer(model_path=resolve_model(scorer_model), batch_size=batch_size)
        wanted = scorer.identity
    out: dict[str, PairEvidence] = {}
    todo: list[PairRecord] = []
    for rec in records:
        ev = rec.evidence
        if ev is not None and (not wanted or ev.scorer == wanted):
            out[rec.id] = ev
        elif rec.id not in out:
            todo.append(rec)
    todo = list({r.id: r for r in todo}.values())
    if todo and scorer is None:
        raise ValueError(f"{len(todo)} pair(s) carry no evidence (e.g. {todo[0].id!r}): pass a scorer model "
                         "(--scorer, or --model for --judge likelihood/fluency) to measure it")
    if todo:
        from tqdm.auto import tqdm

        items = [EvidenceInput(tuple(r.exemplars), r.prompt, r.chosen, r.rejected) for r in todo]
        with tqdm(total=jobs_needed(items), desc=f"{progress_desc} ({scorer.identity})", unit="text") as bar:
            for rec, ev in zip(todo, measure_pairs(scorer, items, progress=bar)):
                out[rec.id] = ev
    return out


#: The measure judges of ``persrm eval`` and the evidence value each compares.
MEASURE_JUDGES = {"likelihood": "gain", "fluency": "fluency", "reader": "reader", "oracle": "oracle"}


@dataclass
class MeasureJudge(PairwiseJudge):
    """Judges that read the evidence (:mod:`openrlhf_persrm.evidence`); nothing is generated.

    * ``likelihood``: exemplar gain, ``mean log p(c | exemplars, prompt) - mean log p(c | prompt)`` (copied
      words left out): the text the person's own writing makes more predictable wins.
    * ``fluency``: ``mean log p(c | prompt)``, no exemplars: a type it separates tests language quality.
    * ``reader``: the fixed reader (:func:`~openrlhf_persrm.evidence.read_evidence`): fluency when the
      candidates are nearly identical, exemplar gain otherwise; what the evidence traces teach.
    * ``oracle``: for each negative type, the single measure (gain, fluency or style) that is most accurate
      on the evaluated pairs themselves: it peeks at the labels, an upper bound for any one measure.

    Evidence comes from the rows or is measured with ``scorer_model`` (see :func:`evidence_for`). All are
    position-free (each candidate is measured on its own).
    """

    kind: str = "likelihood"
    scorer_model: str = ""
    batch_size: int = 8
    name: str = ""
    _evidence: dict[str, PairEvidence] = field(default_factory=dict, init=False, repr=False)
    _best: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in MEASURE_JUDGES:
            raise ValueError(f"measure judge {self.kind!r}: choose one of {', '.join(MEASURE_JUDGES)}")
        self.name = self.name or self.kind

    def identity(self) -> dict[str, Any]:
        rules = {"likelihood": "mean log p(candidate | exemplars, prompt) - mean log p(candidate | prompt)",
                 "fluency": "mean log p(candidate | prompt), no exemplars",
                 "reader": "fluency if the candidates are nearly identical, else exemplar gain (copies lose)",
                 "oracle": "per negative type, the single most accurate measure on these pairs (uses labels)"}
        scorers = sorted({ev.scorer for ev in self._evidence.values()})
        out = {"name": self.name, "rule": rules[self.kind], "scorer": scorers[0] if len(scorers) == 1 else scorers}
        if self.kind == "oracle":
            out["best_measure_by_type"] = dict(self._best)
        return out

    def prepare(self, records: Sequence[PairRecord]) -> None:
        from ..evidence.measures import favours

        self._evidence = evidence_for(records, self.scorer_model, batch_size=self.batch_size)
        if self.kind == "oracle":
            by_type: dict[str, list[PairRecord]] = {}
            for r in {r.id: r for r in records}.values():
                by_type.setdefault(r.negative_type, []).append(r)
            for ntype, rs in by_type.items():
                def accuracy(m: str) -> float:
                    return sum({"A": 1.0, None: 0.5}.get(favours(self._evidence[r.id], m)[0], 0.0) for r in rs)
                self._best[ntype] = max(("gain", "fluency", "style"), key=accuracy)

    def score(self, record: PairRecord, position: str) -> Outcome:
        from ..evidence.measures import read_evidence, value

        ev = self._evidence[record.id].arranged(position)
        if self.kind == "reader":
            side = read_evidence(ev).preferred
            return (1.0, 0.0) if side == "A" else (0.0, 1.0) if side == "B" else (0.0, 0.0)
        measure = self._best[record.negative_type] if self.kind == "oracle" else MEASURE_JUDGES[self.kind]
        return value(ev.first, measure), value(ev.second, measure)


# --------------------------------------------------------------------------- model judge

class TextBackend(Protocol):
    """What the model judge needs from a backend (``LocalJudge``, or :class:`ChunkedProgress`
    around ``OpenAIJudge``): one output per request, in order, each the text or an exception
    instance (``contracts.JudgeError``) for a request that could not be served.
    """

    def generate(self, requests: Sequence[Any], progress: Any = None) -> list[Any]: ...


@dataclass
class ChunkedProgress:
    """Gives a backend whose ``generate(requests)`` takes no progress bar one, by chunks.

    Each chunk is ``chunk`` requests (a few times the backend's concurrency keeps it busy).
    """

    backend: Any
    chunk: int = 64

    @property
    def model(self) -> str:
        return getattr(self.backend, "model", "") or ""

    def generate(self, requests: Sequence[Any], progress: Any = None) -> list[Any]:
        out: list[Any] = []
        for start in range(0, len(requests), self.chunk):
            part = list(requests[start:start + self.chunk])
            out.extend(self.backend.generate(part))
            if progress is not None:
                progress.update(len(part))
        return out

    def close(self) -> None:
        getattr(self.backend, "close", lambda: None)()


@dataclass
class ModelJudge:
    """A PersRM checkpoint or zero-shot chat model, judged through the judge format.

    Prompts are fitted into ``max_prompt_tokens`` with :class:`ExemplarBudget` when a token
    counter is given (local models); a pair whose candidates alone do not fit is a
    ``prompt_too_long`` failure. Outputs are read with the strict parser.
    """

    backend: TextBackend
    label: str
    count_tokens: Callable[[list[dict[str, str]]], int] | None = None
    max_prompt_tokens: int = 1536
    max_new_tokens: int = 512
    name: str = "model"
    settings: dict[str, Any] = field(default_factory=dict)
    evidence: dict[str, PairEvidence] | None = None   # by pair id: an evidence-informed judge reads it
    outputs: list[str | None] = field(default_factory=list, init=False, repr=False)

    def identity(self) -> dict[str, Any]:
        label = self.label or getattr(self.backend, "model", "") or "?"
        return {"name": self.name, "model": label, "max_prompt_tokens": self.max_prompt_tokens,
                "max_new_tokens": self.max_new_tokens, "parser": "strict (reasoning required)",
                "evidence": self.evidence is not None, **self.settings}

    def judge(self, records: Sequence[PairRecord], positions: Sequence[str], *,
              progress: Any = None) -> list[Outcome]:
        from ..contracts import JudgeRequest

        if len(records) != len(positions):
            raise ValueError(f"{len(records)} records but {len(positions)} positions")
        budget = ExemplarBudget(self.max_prompt_tokens)
        outcomes: list[Outcome | None] = [None] * len(records)
        requests, slots = [], []
        for i, (rec, pos) in enumerate(zip(records, positions)):
            a, b = arrange(rec.chosen, rec.rejected, pos)
            ev = self.evidence[rec.id].arranged(pos) if self.evidence is not None else None
            if self.count_tokens is None:
                messages = build_messages(rec.exemplars, rec.prompt, a, b, evidence=ev)
            else:
                try:
                    messages = budget.fit(self.count_tokens, rec.exemplars, rec.prompt, a, b, ev).messages
                except PromptTooLong as exc:
                    logger.warning("pair %s (real at %s): %s", rec.id, pos, exc)
                    outcomes[i] = JudgeFailure("prompt_too_long", str(exc))
                    if progress is not None:
                        progress.update(1)
                    continue
            requests.append(JudgeRequest(messages, max_new_tokens=self.max_new_tokens))
            slots.append(i)
        texts = self.backend.generate(requests, progress=progress) if requests else []
        if len(texts) != len(requests):
            raise RuntimeError(f"judge backend returned {len(texts)} outputs for {len(requests)} requests")
        self.outputs = [None] * len(records)
        errors = [t for t in texts if not isinstance(t, str)]
        if errors and len(errors) == len(texts):
            # Not one request served: a setup problem (URL, key, model), not a measurement.
            raise RuntimeError(f"the judge backend served none of {len(texts)} requests; first error: {errors[0]}")
        if errors:
            logger.warning("%d of %d judge requests got no output (counted as request_error failures); "
                           "first: %s", len(errors), len(texts), errors[0])
        for i, text in zip(slots, texts):
            self.outputs[i] = text if isinstance(text, str) else None
            outcomes[i] = self.read(text)
        return [o for o in outcomes if o is not None]  # every slot is filled by now

    def close(self) -> None:
        """Release the backend (the local engine's thread, the HTTP client)."""
        getattr(self.backend, "close", lambda: None)()

    @staticmethod
    def read(text: Any) -> Outcome:
        """Scores from one backend output; a non-string (``JudgeError``, None) is a ``request_error``."""
        if not isinstance(text, str):
            return JudgeFailure("request_error", str(text) if text is not None else "no output")
        result = parse_judgment(text)
        if isinstance(result, Judgment):
            return float(result.score_a), float(result.score_b)
        return JudgeFailure(result.kind.value, result.detail)


BASELINES: dict[str, type[PairwiseJudge]] = {
    "random": RandomJudge, "length": LengthJudge, "stylometry": StylometryJudge, "artefact": ArtefactJudge,
    "evidence": EvidenceJudge,
}
