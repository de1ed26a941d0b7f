"""How the judge is doing: failures by kind, the recent failure rate, the calls in flight, and the
stop rule with its circuit breaker.

One :class:`JudgeHealth` lives in each ``persrm`` reward (so in each rollout actor, or in
``persrm serve``). Samples are counted in *windows* of ``window`` judged samples (about one
training step's share; OpenRLHF calls the reward per sample, so the plugin cannot see steps):
when ``steps`` windows in a row fail more than ``threshold`` of their samples, the judge is
declared down and every later call raises :class:`~openrlhf_persrm.judges.faults.JudgeUnavailable`
with the cause. Each failure kind is logged once when first seen (with its detail), then in a
summary with counts at most once a minute. Thread-safe.

What the state says *now* (``snapshot``): the failure rate of the last ``window`` samples
(sliding, the open window included), and the calls in flight (``begin``/``end``, which
``persrm serve`` reports): a call running longer than ``hang_after_s`` with no judgment come back
since it began means the judge hangs now, before any of those calls fails.

The stop rule is a circuit breaker: *closed* (serving); *open* once the rule trips (``stopped``
holds the cause, callers refuse work); after ``cooldown_s`` the next caller that asks
(:meth:`recover`, which ``persrm serve`` runs in the background while down) makes it *half-open*
and judges a start-up-style probe: it *closes* when the probe answers (the windows start afresh),
or opens again with the cooldown doubled (up to ``max_cooldown_s``). Every transition is logged.
So a dead judge stays down and ends the runs that use it, and a judge that comes back serves again.
In the rollout actors nothing probes: there, down is final and the run ends.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

logger = logging.getLogger("openrlhf_persrm.rewards.persrm")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class JudgeHealth:
    """Failure counts, the stop rule and its breaker (see the module docstring).

    Args:
        threshold: a window fails when more than this share of its samples got no judgment.
        steps: this many failed windows in a row stop the judge (0: never stop).
        window: judged samples per window (and in the sliding recent failure rate).
        summary_every_s: seconds between summary log lines of the failure counts.
        cooldown_s: seconds after the stop before the first recovery probe; doubled after each
            failed probe, up to ``max_cooldown_s``.
        hang_after_s: a call in flight this long with no judgment back since it began: hanging.
    """

    threshold: float = 0.5
    steps: int = 3
    window: int = 64
    summary_every_s: float = 60.0
    cooldown_s: float = 5.0
    max_cooldown_s: float = 60.0
    hang_after_s: float = 30.0
    kinds: Counter = field(default_factory=Counter)
    details: dict = field(default_factory=dict)
    samples: int = 0
    failed_samples: int = 0
    judgments: int = 0
    stopped: str | None = None
    breaker: str = CLOSED
    recoveries: int = 0
    failed_probes: int = 0
    _win: list = field(default_factory=lambda: [0, 0])  # samples, failed samples in the open window
    _recent: deque = field(default_factory=deque)  # (samples, failed) of the latest calls, about `window` samples
    _recent_sums: list = field(default_factory=lambda: [0, 0])
    _bad_windows: int = 0
    _last_summary: float = field(default_factory=time.monotonic)
    _last_success: float | None = None  # when a judgment last came back
    _in_flight: dict = field(default_factory=dict)  # call id -> start (time.monotonic())
    _ids: Any = field(default_factory=itertools.count, repr=False)
    _cooldown: float = 0.0
    _stopped_at: float = 0.0
    _probe_at: float = 0.0
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    def __getstate__(self) -> dict[str, Any]:  # ships fresh to a Ray worker
        return {"threshold": self.threshold, "steps": self.steps, "window": self.window,
                "summary_every_s": self.summary_every_s, "cooldown_s": self.cooldown_s,
                "max_cooldown_s": self.max_cooldown_s, "hang_after_s": self.hang_after_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    # ------------------------------------------------------------------ outcomes
    def record(self, samples: int, failed_samples: int, judgments: int, kinds: Mapping[str, int],
               details: Mapping[str, str]) -> str | None:
        """Count one call's outcome; returns the stop cause if this call tripped the rule."""
        new_kinds, tripped, summary = [], None, None
        with self._lock:
            now = time.monotonic()
            self.samples += samples
            self.failed_samples += failed_samples
            self.judgments += judgments
            if samples > failed_samples:
                self._last_success = now
            for kind, n in kinds.items():
                if n and kind not in self.kinds:
                    new_kinds.append(kind)
                    self.details[kind] = details.get(kind, "")
                elif n and details.get(kind):
                    self.details[kind] = details[kind]
                self.kinds[kind] += n
            self._slide(samples, failed_samples)
            self._win[0] += samples
            self._win[1] += failed_samples
            while self._win[0] >= self.window:
                rate = self._win[1] / self._win[0]
                self._win = [0, 0]
                self._bad_windows = self._bad_windows + 1 if rate > self.threshold else 0
                if self.steps and self._bad_windows >= self.steps and self.stopped is None:
                    self.stopped = tripped = self._cause(rate)
                    self.breaker, self._stopped_at, self._cooldown = OPEN, now, self.cooldown_s
                    self._probe_at = now + self._cooldown
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

    def _slide(self, samples: int, failed: int) -> None:
        if not samples:
            return
        self._recent.append((samples, failed))
        self._recent_sums[0] += samples
        self._recent_sums[1] += failed
        while len(self._recent) > 1 and self._recent_sums[0] - self._recent[0][0] >= self.window:
            old_samples, old_failed = self._recent.popleft()
            self._recent_sums[0] -= old_samples
            self._recent_sums[1] -= old_failed

    def _counts(self) -> str:
        return ", ".join(f"{k}={n}" for k, n in self.kinds.most_common())

    def _cause(self, rate: float) -> str:
        last = max(self.kinds, key=lambda k: self.kinds[k]) if self.kinds else "?"
        return (f"the judge failed {rate:.0%} of the samples in {self.steps} windows of {self.window} in a row "
                f"(stop_failure_rate={self.threshold}, stop_after_steps={self.steps}); failures: {self._counts()}; "
                f"most frequent '{last}': {self.details.get(last, '')}")

    @property
    def recent_failure_rate(self) -> float | None:
        """Failure share of the latest ``window`` samples (None before any)."""
        with self._lock:
            samples, failed = self._recent_sums
            return failed / samples if samples else None

    # ------------------------------------------------------------------ calls in flight
    def begin(self) -> int:
        """A call to the judge starts; hand the id to :meth:`end` when it is over."""
        with self._lock:
            call = next(self._ids)
            self._in_flight[call] = time.monotonic()
            return call

    def end(self, call: int) -> None:
        with self._lock:
            self._in_flight.pop(call, None)

    def _hanging(self, now: float, hang_after_s: float) -> tuple[int, float]:
        """(calls in flight, age of the oldest) when the judge hangs now, else (calls, 0.0)."""
        if not self._in_flight:
            return 0, 0.0
        oldest = min(self._in_flight.values())
        stuck = now - oldest > hang_after_s and (self._last_success is None or self._last_success < oldest)
        return len(self._in_flight), (now - oldest if stuck else 0.0)

    # ------------------------------------------------------------------ the breaker
    @property
    def probe_due(self) -> bool:
        """Down, no probe running, and the cooldown is over: :meth:`recover` would probe now."""
        with self._lock:
            return self.breaker == OPEN and time.monotonic() >= self._probe_at

    def recover(self, probe: Callable[[], Any]) -> bool:
        """While down and due, run ``probe`` (a start-up-style judgment that raises when the judge
        cannot answer) half-open: True when it answered and the breaker closed."""
        with self._lock:
            if self.breaker != OPEN or time.monotonic() < self._probe_at:
                return False
            self.breaker = HALF_OPEN
        logger.warning("persrm: judge down for %.0f s; probing whether it is back", time.monotonic() - self._stopped_at)
        try:
            probe()
        except Exception as exc:  # noqa: BLE001 -- any failure keeps the breaker open
            with self._lock:
                self.failed_probes += 1
                self.breaker = OPEN
                wait = self._cooldown = min(self._cooldown * 2, self.max_cooldown_s)
                self._probe_at = time.monotonic() + wait
            logger.warning("persrm: judge still down, the probe failed (%s: %s); next probe in %.0f s",
                           type(exc).__name__, exc, wait)
            return False
        with self._lock:
            cause, down_for = self.stopped, time.monotonic() - self._stopped_at
            self.breaker, self.stopped = CLOSED, None
            self.recoveries += 1
            self._bad_windows, self._win = 0, [0, 0]
            self._recent.clear()
            self._recent_sums = [0, 0]
        logger.warning("persrm: judge recovered after %.0f s down: the probe answered; serving again "
                       "(it was stopped because %s)", down_for, cause)
        return True

    # ------------------------------------------------------------------ the view
    def snapshot(self, hang_after_s: float | None = None) -> dict[str, Any]:
        """The state now: ``ok``, ``degraded`` (recent failures above the threshold, or hanging) or
        ``down``, with the evidence. ``hang_after_s`` overrides the field (a server with a short
        deadline wants a shorter one)."""
        rate = self.recent_failure_rate
        with self._lock:
            now = time.monotonic()
            in_flight, hanging_s = self._hanging(now, self.hang_after_s if hang_after_s is None else hang_after_s)
            state = ("down" if self.stopped else
                     "degraded" if hanging_s or (rate is not None and rate > self.threshold) else "ok")
            return {"state": state, "recent_failure_rate": rate, "samples": self.samples,
                    "failed_samples": self.failed_samples, "judgments": self.judgments,
                    "failures": dict(self.kinds), "stopped": self.stopped,
                    "in_flight": in_flight, "hanging_for_s": round(hanging_s, 1) if hanging_s else None,
                    "breaker": {"state": self.breaker, "recoveries": self.recoveries,
                                "failed_probes": self.failed_probes,
                                "next_probe_in_s": (round(max(0.0, self._probe_at - now), 1)
                                                    if self.breaker == OPEN else None)},
                    "stop_rule": {"stop_failure_rate": self.threshold, "stop_after_steps": self.steps,
                                  "window": self.window}}
