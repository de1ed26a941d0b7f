"""How the judge is doing: failures by kind, the recent failure rate, and the stop rule.

One :class:`JudgeHealth` lives in each ``persrm`` reward (so in each rollout actor, or in
``persrm serve``). Samples are counted in *windows* of ``window`` judged samples (about one
training step's share; OpenRLHF calls the reward per sample, so the plugin cannot see steps):
when ``steps`` windows in a row fail more than ``threshold`` of their samples, the judge is
declared down and every later call raises :class:`~openrlhf_persrm.judges.faults.JudgeUnavailable`
with the cause. Each failure kind is logged once when first seen (with its detail), then in a
summary with counts at most once a minute. Thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Mapping

logger = logging.getLogger("openrlhf_persrm.rewards.persrm")


@dataclass
class JudgeHealth:
    """Failure counts and the stop rule (see the module docstring).

    Args:
        threshold: a window fails when more than this share of its samples got no judgment.
        steps: this many failed windows in a row stop the judge (0: never stop).
        window: judged samples per window.
        summary_every_s: seconds between summary log lines of the failure counts.
    """

    threshold: float = 0.5
    steps: int = 3
    window: int = 64
    summary_every_s: float = 60.0
    kinds: Counter = field(default_factory=Counter)
    details: dict = field(default_factory=dict)
    samples: int = 0
    failed_samples: int = 0
    judgments: int = 0
    stopped: str | None = None
    _win: list = field(default_factory=lambda: [0, 0])  # samples, failed samples in the open window
    _rates: deque = field(default_factory=lambda: deque(maxlen=16))  # rates of the last closed windows
    _bad_windows: int = 0
    _last_summary: float = field(default_factory=time.monotonic)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    def __getstate__(self) -> dict[str, Any]:  # ships fresh to a Ray worker
        return {"threshold": self.threshold, "steps": self.steps, "window": self.window,
                "summary_every_s": self.summary_every_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def record(self, samples: int, failed_samples: int, judgments: int, kinds: Mapping[str, int],
               details: Mapping[str, str]) -> str | None:
        """Count one call's outcome; returns the stop cause if this call tripped the rule."""
        new_kinds, tripped, summary = [], None, None
        with self._lock:
            self.samples += samples
            self.failed_samples += failed_samples
            self.judgments += judgments
            for kind, n in kinds.items():
                if n and kind not in self.kinds:
                    new_kinds.append(kind)
                    self.details[kind] = details.get(kind, "")
                elif n and details.get(kind):
                    self.details[kind] = details[kind]
                self.kinds[kind] += n
            self._win[0] += samples
            self._win[1] += failed_samples
            while self._win[0] >= self.window:
                rate = self._win[1] / self._win[0]
                self._rates.append(rate)
                self._win = [0, 0]
                self._bad_windows = self._bad_windows + 1 if rate > self.threshold else 0
                if self.steps and self._bad_windows >= self.steps and self.stopped is None:
                    self.stopped = tripped = self._cause(rate)
            now = time.monotonic()
            if self.kinds and now - self._last_summary >= self.summary_every_s:
                self._last_summary = now
                summary = self._counts()
        for kind in new_kinds:
            logger.warning("persrm: judge failure '%s' first seen: %s", kind, details.get(kind, "") or "-")
        if summary:
            logger.warning("persrm: judge failures so far: %s (%d of %d samples failed)", summary,
                           self.failed_samples, self.samples)
        if tripped:
            logger.error("persrm: %s", tripped)
        return tripped

    def _counts(self) -> str:
        return ", ".join(f"{k}={n}" for k, n in self.kinds.most_common())

    def _cause(self, rate: float) -> str:
        last = max(self.kinds, key=lambda k: self.kinds[k]) if self.kinds else "?"
        return (f"the judge failed {rate:.0%} of the samples in {self.steps} windows of {self.window} in a row "
                f"(stop_failure_rate={self.threshold}, stop_after_steps={self.steps}); failures: {self._counts()}; "
                f"most frequent '{last}': {self.details.get(last, '')}")

    @property
    def recent_failure_rate(self) -> float | None:
        """Failure share of the last closed window, or of the open one when none has closed."""
        with self._lock:
            if self._rates:
                return self._rates[-1]
            return self._win[1] / self._win[0] if self._win[0] else None

    def snapshot(self) -> dict[str, Any]:
        rate = self.recent_failure_rate
        with self._lock:
            state = ("down" if self.stopped else "degraded" if rate is not None and rate > self.threshold
                     else "ok")
            return {"state": state, "recent_failure_rate": rate, "samples": self.samples,
                    "failed_samples": self.failed_samples, "judgments": self.judgments,
                    "failures": dict(self.kinds), "stopped": self.stopped,
                    "stop_rule": {"stop_failure_rate": self.threshold, "stop_after_steps": self.steps,
                                  "window": self.window}}
