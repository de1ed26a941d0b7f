"""Pairwise-judgment metrics: judgments in, metrics dict out. Pure (no I/O).

A *judgment* is one look at one pair with the real text shown at one position
(:class:`Judged`). Its verdict is

* ``correct``: the real text got the strictly higher score;
* ``wrong``: the negative got the strictly higher score;
* ``tie``: equal scores, counted as **not correct** (a judge that cannot separate the two
  has not found the person's text) and reported as ``tie_rate``;
* ``failure``: no readable scores (format failure, prompt too long, request error). A
  failure counts as wrong in accuracy and is counted in ``format_failure_rate``.

Accuracy is the share of correct judgments. Confidence intervals are percentile
bootstrap intervals over **pairs**: a pair judged in both orders is resampled as one unit
(its two judgments go together), because the two judgments of one pair are not
independent evidence.

Position consistency (only when pairs were judged in both orders) is the share of pairs
whose two judgments are both readable and strictly prefer the same underlying text. A
judge that always answers "A" therefore scores 0, and a judge that always ties scores 0
too (a tie is no verdict, so it cannot be the same verdict).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

VERDICTS = ("correct", "wrong", "tie", "failure")


@dataclass(frozen=True)
class Judged:
    """One judgment of one pair: the real text shown at ``real_at``, the scores as shown.

    ``scores`` is ``(score_A, score_B)`` or None when the judge produced no readable
    scores; ``failure`` then names why (e.g. ``no_answer``, ``prompt_too_long``).
    """

    pair_id: str
    author: str
    negative_type: str
    real_at: str
    scores: tuple[float, float] | None
    failure: str | None = None

    def __post_init__(self) -> None:
        if self.real_at not in ("A", "B"):
            raise ValueError(f"real_at must be 'A' or 'B', got {self.real_at!r}")
        if self.scores is None and not self.failure:
            raise ValueError(f"judgment of {self.pair_id!r} has neither scores nor a failure kind")

    @property
    def verdict(self) -> str:
        """'correct', 'wrong', 'tie' or 'failure' (see the module docstring)."""
        if self.scores is None:
            return "failure"
        a, b = self.scores
        real, other = (a, b) if self.real_at == "A" else (b, a)
        return "correct" if real > other else ("wrong" if real < other else "tie")

    @property
    def preferred_text(self) -> str | None:
        """'real' or 'negative' for a strict, readable verdict; None for a tie or failure."""
        v = self.verdict
        return "real" if v == "correct" else ("negative" if v == "wrong" else None)


def _group_by_pair(judgments: Iterable[Judged]) -> dict[str, list[Judged]]:
    by_pair: dict[str, list[Judged]] = defaultdict(list)
    for j in judgments:
        by_pair[j.pair_id].append(j)
    return dict(by_pair)


def pair_accuracy(judgments: Sequence[Judged]) -> float:
    """The share of a pair's judgments that are correct (1, 0.5 or 0 with both orders)."""
    return sum(j.verdict == "correct" for j in judgments) / len(judgments)


def consistency(by_pair: dict[str, list[Judged]]) -> dict[str, Any] | None:
    """Position consistency over the pairs judged at both positions; None if there are none.

    >>> a = Judged("p", "x", "t", "A", (9, 1)); b = Judged("p", "x", "t", "B", (9, 1))
    >>> consistency({"p": [a, b]})["rate"]  # always "A": real in one order, negative in the other
    0.0
    """
    both = {pid: js for pid, js in by_pair.items() if {j.real_at for j in js} == {"A", "B"}}
    if not both:
        return None
    consistent = real_both = 0
    for js in both.values():
        picks = {j.preferred_text for j in js}
        if len(picks) == 1 and None not in picks:
            consistent += 1
            real_both += picks == {"real"}
    n = len(both)
    return {"rate": consistent / n, "n": n, "consistent_pairs": consistent,
            "correct_in_both_orders": real_both / n}


def _seed_for(seed: int, key: str) -> int:
    # Each group gets its own stream, so adding a group never shifts another group's interval.
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "little")


def bootstrap_ci(values: Sequence[float], *, n_resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95, key: str = "") -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per pair).

    Deterministic for a given ``seed`` and ``key``. An empty input gives ``(nan, nan)``.

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0)
    """
    import numpy as np

    if not len(values):
        return float("nan"), float("nan")
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(_seed_for(seed, key))
    means = np.empty(n_resamples)
    # Chunked so a large file never allocates an n_resamples x n matrix at once.
    chunk = max(1, 2_000_000 // len(x))
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, len(x), size=(stop - start, len(x)))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _summary(by_pair: dict[str, list[Judged]], *, key: str, n_resamples: int, seed: int,
             confidence: float) -> dict[str, Any]:
    judgments = [j for js in by_pair.values() for j in js]
    n_j = len(judgments)
    counts = Counter(j.verdict for j in judgments)
    per_pair = [pair_accuracy(js) for js in by_pair.values()]
    accuracy = counts["correct"] / n_j if n_j else float("nan")
    lo, hi = bootstrap_ci(per_pair, n_resamples=n_resamples, seed=seed, confidence=confidence, key=key)
    out: dict[str, Any] = {
        "accuracy": accuracy, "ci95": [lo, hi], "n": len(by_pair), "n_judgments": n_j,
        "format_failure_rate": counts["failure"] / n_j if n_j else float("nan"),
        "tie_rate": counts["tie"] / n_j if n_j else float("nan"),
        "verdicts": {v: counts[v] for v in VERDICTS},
    }
    cons = consistency(by_pair)
    if cons is not None:
        out["consistency"] = cons["rate"]
    return out


def compute_metrics(judgments: Iterable[Judged], *, n_resamples: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> dict[str, Any]:
    """All metrics of one evaluation run, as a JSON-ready dict.

    Keys: ``overall`` (``accuracy``, ``ci95`` [lo, hi], ``n`` pairs, ``n_judgments``,
    ``format_failure_rate``, ``tie_rate``, ``verdicts``), ``by_type`` and ``by_author``
    (the same per group), ``consistency`` (None unless pairs were judged in both orders),
    ``format_failure_rate``, ``failure_kinds`` and ``bootstrap`` (how the intervals were made).

    ``ci95`` keeps its name whatever ``confidence`` is; ``bootstrap.confidence`` says which.
    """
    judgments = list(judgments)
    if not judgments:
        raise ValueError("no judgments to score: the pair file (after filters) is empty")
    opts = {"n_resamples": n_resamples, "seed": seed, "confidence": confidence}
    by_pair = _group_by_pair(judgments)

    def grouped(attr: str) -> dict[str, Any]:
        groups: dict[str, dict[str, list[Judged]]] = defaultdict(dict)
        for pid, js in by_pair.items():
            groups[getattr(js[0], attr)][pid] = js
        return {name: _summary(groups[name], key=f"{attr}={name}", **opts) for name in sorted(groups)}

    overall = _summary(by_pair, key="overall", **opts)
    return {
        "overall": overall,
        "by_type": grouped("negative_type"),
        "by_author": grouped("author"),
        "consistency": consistency(by_pair),
        "format_failure_rate": overall["format_failure_rate"],
        "failure_kinds": dict(Counter(j.failure for j in judgments if j.scores is None).most_common()),
        "bootstrap": {"unit": "pair", "method": "percentile", **opts},
    }


def versus_measure(judged: Sequence[Judged], preferred_by_measure: dict[tuple[str, str], str | None],
                   measure: str = "gain") -> dict[str, Any]:
    """Where a judge's verdict disagrees with a measure's, and who was right, by negative type.

    ``preferred_by_measure[(pair_id, real_at)]`` is the side ('A', 'B' or None) the measure favours in that
    judgment. Counted over judgments where both take a side and the sides differ: ``judge_right`` (the
    judge picked the real text against the measure) and ``measure_right``."""
    rows: dict[str, Counter] = defaultdict(Counter)
    for j in judged:
        side = preferred_by_measure.get((j.pair_id, j.real_at))
        rows[j.negative_type]["judgments"] += 1
        if j.scores is None or side is None or j.scores[0] == j.scores[1]:
            continue
        mine = "A" if j.scores[0] > j.scores[1] else "B"
        if mine == side:
            rows[j.negative_type]["agree"] += 1
            continue
        rows[j.negative_type]["disagree"] += 1
        rows[j.negative_type]["judge_right" if mine == j.real_at else "measure_right"] += 1
    total: Counter = Counter()
    for c in rows.values():
        total.update(c)
    return {"measure": measure, "overall": dict(total), "by_type": {t: dict(c) for t, c in sorted(rows.items())}}


def trace_agreement(judged: Sequence[Judged], traced: Sequence[str | None]) -> dict[str, Any]:
    """Does the verdict follow the reasoning? ``traced[i]`` is the side judgment ``i``'s own reasoning
    concludes for (:func:`~openrlhf_persrm.judge_format.traced_side`). Over judgments with both a traced side
    and a verdict that is not a tie: ``traced_right`` (the traced side is the real text) and ``follows``
    (the answer scores the traced side higher), as counts and rates."""
    n = right = follows = 0
    for j, side in zip(judged, traced):
        if side is None or j.scores is None or j.scores[0] == j.scores[1]:
            continue
        n += 1
        right += side == j.real_at
        follows += side == ("A" if j.scores[0] > j.scores[1] else "B")
    return {"judgments": n, "traced_right": right, "follows": follows,
            "traced_right_rate": right / n if n else None, "follows_rate": follows / n if n else None}
