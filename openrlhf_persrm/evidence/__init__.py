"""Evidence for an evidence-informed PersRM judge: measured once, used everywhere.

* :mod:`.measures`: the pure measures (style, copying, how alike two candidates are), the
  :class:`PairEvidence` record stored on pair rows, and the fixed reader (:func:`read_evidence`).
* :mod:`.scorers`: mean token log-probabilities from a frozen scorer model, local (batched) or
  behind an OpenAI-compatible completions endpoint (vLLM).
* :mod:`.compute`: :func:`measure_pairs`, the one entry point every component calls.

Rendering evidence into the judge's input is :func:`openrlhf_persrm.judge_format.render_evidence`.
Importing this package is cheap: models and HTTP clients load on first use.
"""

from __future__ import annotations

from typing import Any

from .compute import EvidenceInput, jobs_needed, measure_pairs
from .measures import (EVIDENCE_VERSION, CandidateEvidence, PairEvidence, Reading, alike, copy_stats,
                       read_evidence, style_similarity)
from .scorers import LocalScorer, OpenAIScorer, Score, ScoreJob, Scorer, ScorerDeadline

__all__ = ["EVIDENCE_VERSION", "CandidateEvidence", "EvidenceInput", "LocalScorer", "OpenAIScorer", "PairEvidence",
           "Reading", "Score", "ScoreJob", "Scorer", "ScorerDeadline", "alike", "build_scorer", "copy_stats",
           "jobs_needed", "measure_pairs", "read_evidence", "style_similarity"]


def build_scorer(*, model: str | None = None, endpoint: str | None = None, served_model: str | None = None,
                 **kwargs: Any) -> Scorer:
    """A scorer from settings: a local checkpoint (``model``: a path or the built-in
    ``smollm2-135m-instruct``) or an OpenAI-compatible endpoint (``endpoint`` + ``served_model``)."""
    if bool(model) == bool(endpoint):
        raise ValueError("evidence scorer: give exactly one of a local model (scorer_model) or an endpoint "
                         f"(scorer_endpoint); got model={model!r}, endpoint={endpoint!r}")
    if endpoint:
        return OpenAIScorer(base_url=endpoint, model=served_model or "", **kwargs)
    from ..models import resolve_model

    return LocalScorer(model_path=resolve_model(model), **kwargs)
