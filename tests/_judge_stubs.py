"""Deterministic judge backends for tests: they read the judge prompt like a model would.

:class:`StubJudge` finds the exemplars and both candidates by the prompt's real delimiters
(what a judge model sees), scores each candidate by a rule, and answers in the judge format.
Options make it echo its whole input inside the reasoning (a judge that quotes the
candidates), favour position A, fail or garble some requests, or be slow.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from openrlhf_persrm.contracts import JudgeError, JudgeRequest

_WORD = re.compile(r"[a-z']+")


def blocks(user: str) -> dict[str, list[str]]:
    """Every block of the user turn, by tag, split on the real delimiters."""
    return {tag: re.findall(rf"<{tag}(?: n=\"\d+\")?>\n(.*?)\n</{tag}>", user, re.DOTALL)
            for tag in ("exemplar", "prompt", "response_a", "response_b")}


def marker_score(text: str) -> int:
    """``SCORE=7`` anywhere in the candidate -> 7; none -> 5."""
    m = re.search(r"SCORE=(\d+)", text)
    return max(1, min(10, int(m.group(1)))) if m else 5


def overlap_score(text: str, exemplars: Sequence[str]) -> int:
    """1-10 by the share of the candidate's words that the exemplars use."""
    vocab = set(_WORD.findall(" ".join(exemplars).lower()))
    words = _WORD.findall(text.lower())
    return 1 + round(9 * sum(w in vocab for w in words) / max(1, len(words)))


@dataclass
class StubJudge:
    name: ClassVar[str] = "stub"

    rule: str = "marker"            # "marker", "overlap" or "longer" (the longer candidate 7, the other 4; tie 5)
    echo: bool = False              # quote the whole prompt inside <think>
    bias_a: int = 0                 # added to A's score (position bias)
    vote_noise: bool = False        # sampled requests shift the sample scores by seed % 3 - 1
    garble_greedy: bool = False     # greedy requests get unreadable output (retries sample)
    fail_marker: str = "FAIL"       # candidates containing it get a JudgeError
    sleep: float = 0.0
    calls: Counter = field(default_factory=Counter)
    seen: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _score(self, text: str, exemplars: list[str]) -> int:
        return marker_score(text) if self.rule == "marker" else overlap_score(text, exemplars)

    def one(self, req: JudgeRequest) -> str | JudgeError:
        user = req.messages[-1]["content"]
        found = blocks(user)
        with self._lock:
            self.seen.append(found)
            self.calls["requests"] += 1
        if not found["response_a"] or not found["response_b"]:
            return "<think>I cannot find both candidates.</think>"
        a, b = found["response_a"][0], found["response_b"][0]  # a naive reader: the first block of each
        if self.fail_marker and (self.fail_marker in a or self.fail_marker in b):
            return JudgeError("stub: injected failure")
        if self.garble_greedy and req.temperature == 0:
            return "I think A is better."
        if self.rule == "longer":
            sa, sb = (7, 4) if len(a) > len(b) else (4, 7) if len(b) > len(a) else (5, 5)
        else:
            sa, sb = self._score(a, found["exemplar"]), self._score(b, found["exemplar"])
        if self.vote_noise and req.temperature > 0 and req.seed is not None:
            # sampled votes disagree: the candidate that is not the reference (marked REF) moves by -1, 0, +1
            shift = req.seed % 3 - 1
            if "REF" in b:
                sa += shift
            else:
                sb += shift
        with self._lock:
            self.seeds.append(req.seed)
        sa = max(1, min(10, sa + self.bias_a))
        sb = max(1, min(10, sb))
        reasoning = user if self.echo else f"A reads as {sa}/10, B as {sb}/10 against the exemplars."
        return f"<think>\n{reasoning}\n</think>\n<answer>[{sa}, {sb}]</answer>"

    def generate(self, requests: Sequence[JudgeRequest]) -> list[str | JudgeError]:
        with self._lock:
            self.calls["batches"] += 1
            self.calls["in_flight"] += 1
            self.calls["max_in_flight"] = max(self.calls["max_in_flight"], self.calls["in_flight"])
        try:
            if self.sleep:
                time.sleep(self.sleep)
            return [self.one(r) for r in requests]
        finally:
            with self._lock:
                self.calls["in_flight"] -= 1
