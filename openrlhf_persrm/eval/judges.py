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


def char_ngrams(text: str, n: int = 3) -> Counter:
    """Counts of lower-cased character n-grams, whitespace collapsed to single spaces."""
    t = _WS.sub(" ", text.lower()).strip()
    return Counter(t[i:i + n] for i in range(max(0, len(t) - n + 1)))


def cosine(a: dict[str, float], b: dict[str, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    dot = sum(v * b.get(k, 0.0) for k, v in a.items())
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0


@dataclass
class StylometryJudge(PairwiseJudge):
    """Character n-gram profile cosine similarity to the exemplars; the more similar wins."""

    ngram: int = 3
    weighting: str = "tfidf"
    name: str = "stylometry"
    _idf: dict[str, float] = field(default_factory=dict, init=False, repr=False)
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
        docs = {e for r in records for e in r.exemplars}
        df: Counter = Counter()
        for d in docs:
            df.update(char_ngrams(d, self.ngram).keys())
        self._n_docs = len(docs)
        self._idf = {g: math.log((1 + self._n_docs) / (1 + c)) + 1.0 for g, c in df.items()}

    def _weight(self, counts: Counter) -> dict[str, float]:
        if self.weighting == "tf":
            return dict(counts)
        # n-grams unseen in any exemplar get the largest idf; they cannot raise a cosine
        # with the exemplar profile anyway, only lengthen the candidate's vector.
        unseen = math.log(1 + self._n_docs) + 1.0
        return {g: c * self._idf.get(g, unseen) for g, c in counts.items()}

    def similarity(self, exemplars: Sequence[str], candidate: str) -> float:
        profile = self._weight(char_ngrams("\n".join(exemplars), self.ngram))
        return cosine(self._weight(char_ngrams(candidate, self.ngram)), profile)

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


# --------------------------------------------------------------------------- likelihood judges

@dataclass
class LikelihoodJudge(PairwiseJudge):
    """What a language model already knows, read from its likelihoods; nothing is generated.

    ``mode="gain"`` (judge ``likelihood``): each candidate is scored by how much the exemplars
    raise its mean token log-probability,
    ``mean log p(c | exemplars, prompt) - mean log p(c | prompt)``; the text the person's own
    writing makes more predictable wins. ``mode="fluency"`` (judge ``fluency``): plain mean
    log-probability given the prompt alone, no exemplars: a type that fluency separates tests
    language quality, not the person. Both are position-free (each candidate is scored on its
    own), so their position consistency is 100% by construction.
    """

    model_path: str = ""
    mode: str = "gain"
    batch_size: int = 8
    max_context_tokens: int = 768
    name: str = "likelihood"
    _scores: dict[tuple[str, str], float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("gain", "fluency"):
            raise ValueError(f"mode must be 'gain' or 'fluency', got {self.mode!r}")
        if self.mode == "fluency" and self.name == "likelihood":
            self.name = "fluency"

    def identity(self) -> dict[str, Any]:
        rule = ("mean log p(candidate | exemplars, prompt) - mean log p(candidate | prompt)" if self.mode == "gain"
                else "mean log p(candidate | prompt), no exemplars")
        return {"name": self.name, "model": self.model_path, "rule": rule}

    @staticmethod
    def contexts(record: PairRecord) -> tuple[str, str]:
        """``(with exemplars, without)``: the texts each candidate is scored after."""
        plain = record.prompt.strip() + "\n\n"
        return "\n\n".join(e.strip() for e in record.exemplars) + "\n\n" + plain, plain

    def prepare(self, records: Sequence[PairRecord]) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model_path)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).eval()
        jobs: list[tuple[tuple[str, str], str, list[int], list[int]]] = []
        seen: set[tuple[str, str]] = set()
        for r in records:
            with_ex, plain = self.contexts(r)
            for which, text in (("chosen", r.chosen), ("rejected", r.rejected)):
                if (r.id, which) in seen:
                    continue
                seen.add((r.id, which))
                cand = tok(" " + text.strip(), add_special_tokens=False)["input_ids"]
                for cond, ctx in (("with", with_ex), ("without", plain)):
                    if cond == "with" and self.mode == "fluency":
                        continue
                    ids = tok(ctx, add_special_tokens=False)["input_ids"][-self.max_context_tokens:]
                    jobs.append(((r.id, which), cond, ids, cand))
        means: dict[tuple[tuple[str, str], str], float] = {}
        jobs.sort(key=lambda j: len(j[2]) + len(j[3]))
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        with torch.no_grad():
            for start in range(0, len(jobs), self.batch_size):
                batch = jobs[start:start + self.batch_size]
                width = max(len(c) + len(x) for _, _, c, x in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, (_, _, ctx, cand) in enumerate(batch):
                    seq = ctx + cand
                    ids[i, :len(seq)] = torch.tensor(seq)
                    mask[i, :len(seq)] = 1
                logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
                for i, (key, cond, ctx, cand) in enumerate(batch):
                    n0 = len(ctx)
                    steps = logp[i, n0 - 1:n0 - 1 + len(cand)]
                    token_lp = steps.gather(1, torch.tensor(cand).unsqueeze(1)).squeeze(1)
                    means[(key, cond)] = float(token_lp.mean())
        for key in seen:
            plain = means[(key, "without")]
            self._scores[key] = plain if self.mode == "fluency" else means[(key, "with")] - plain

    def score(self, record: PairRecord, position: str) -> Outcome:
        real, fake = self._scores[(record.id, "chosen")], self._scores[(record.id, "rejected")]
        return (real, fake) if position == "A" else (fake, real)


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
    outputs: list[str | None] = field(default_factory=list, init=False, repr=False)

    def identity(self) -> dict[str, Any]:
        label = self.label or getattr(self.backend, "model", "") or "?"
        return {"name": self.name, "model": label, "max_prompt_tokens": self.max_prompt_tokens,
                "max_new_tokens": self.max_new_tokens, "parser": "strict (reasoning required)",
                **self.settings}

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
            if self.count_tokens is None:
                messages = build_messages(rec.exemplars, rec.prompt, a, b)
            else:
                try:
                    messages = budget.fit(self.count_tokens, rec.exemplars, rec.prompt, a, b).messages
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
