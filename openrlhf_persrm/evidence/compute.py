"""Evidence for pairs of candidates: the scorer's log-probabilities plus the pure measures.

``measure_pairs(scorer, items)`` is the one entry point data synthesis, ``persrm eval``, the
``persrm`` reward, ``persrm_group`` and ``persrm serve`` use. Each item is the person's exemplars,
the prompt and two candidates; each candidate is scored twice (after the exemplars and the prompt,
and after the prompt alone), words it copies from the exemplars left out of both (copying cannot
buy gain). Jobs that repeat (a reference text judged against many samples) are scored once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .measures import CandidateEvidence, PairEvidence, alike, copied_char_spans, copy_stats, style_similarity
from .scorers import Score, ScoreJob, Scorer


@dataclass(frozen=True)
class EvidenceInput:
    exemplars: tuple[str, ...]
    prompt: str
    first: str
    second: str


def contexts(exemplars: Sequence[str], prompt: str) -> tuple[str, str]:
    """``(with exemplars, without)``: the texts a candidate is scored after."""
    plain = prompt.strip() + "\n\n"
    return "\n\n".join(e.strip() for e in exemplars) + "\n\n" + plain, plain


def candidate_jobs(exemplars: Sequence[str], prompt: str, text: str) -> tuple[ScoreJob, ScoreJob]:
    """The two scoring jobs of one candidate: after the exemplars and prompt, and after the prompt."""
    with_ex, plain = contexts(exemplars, prompt)
    cand = text.strip()
    skip = tuple(copied_char_spans(exemplars, cand))
    return ScoreJob(with_ex, cand, skip), ScoreJob(plain, cand, skip)


def candidate_evidence(exemplars: Sequence[str], text: str, with_ex: Score, without: Score,
                       idf: Any = None) -> CandidateEvidence:
    copied, longest = copy_stats(exemplars, text)
    return CandidateEvidence(with_ex.mean_logprob, without.mean_logprob,
                             round(style_similarity(exemplars, text, idf=idf), 5), copied, longest,
                             min(with_ex.tokens, without.tokens))


def measure_pairs(scorer: Scorer, items: Sequence[EvidenceInput], *, deadline: float | None = None,
                  progress: Any = None) -> list[PairEvidence]:
    """Evidence for every item, ``first`` and ``second`` in the order given.

    ``progress`` (a tqdm-like bar) counts scoring jobs (four per item, fewer when texts repeat);
    ``deadline`` (``time.monotonic()`` seconds) bounds the scorer's work
    (:class:`~openrlhf_persrm.evidence.scorers.ScorerDeadline`).
    """
    jobs: list[ScoreJob] = []
    index: dict[ScoreJob, int] = {}
    slots: list[tuple[int, int, int, int]] = []
    for item in items:
        ids = []
        for text in (item.first, item.second):
            for job in candidate_jobs(item.exemplars, item.prompt, text):
                if job not in index:
                    index[job] = len(jobs)
                    jobs.append(job)
                ids.append(index[job])
        slots.append(tuple(ids))  # type: ignore[arg-type]
    if progress is not None and hasattr(progress, "total") and progress.total is None:
        progress.total = len(jobs)
    scores = scorer.score(jobs, deadline=deadline, progress=progress)
    out = []
    for item, (w1, p1, w2, p2) in zip(items, slots):
        first = candidate_evidence(item.exemplars, item.first, scores[w1], scores[p1])
        second = candidate_evidence(item.exemplars, item.second, scores[w2], scores[p2])
        out.append(PairEvidence(first, second, alike(item.first, item.second), scorer.identity))
    return out


def jobs_needed(items: Sequence[EvidenceInput]) -> int:
    """How many scoring jobs :func:`measure_pairs` will run for ``items`` (for progress bars)."""
    seen = set()
    for item in items:
        for text in (item.first, item.second):
            seen.update(candidate_jobs(item.exemplars, item.prompt, text))
    return len(seen)
