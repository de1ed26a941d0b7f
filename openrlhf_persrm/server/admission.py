"""When a request's answer is due, and how its computation is admitted, shared and bounded.

:class:`RequestClock` is the one place the deadline arithmetic lives: the clock starts when the
request arrives (before its body is read), the judging is due at ``JUDGING_SHARE`` of the reward's
``deadline_s`` (the reward cancels unfinished judgments then) and the answer leaves at
``ANSWER_SHARE`` of it, whatever is still running. :class:`Admission` runs a computation in a
worker thread, once per request body (a retry joins it or gets its answer), within the queue
bound, and each waiter, a retry included, waits by its own clock only: label preparation, a
stuck tokenizer or a judge that ignores its deadline cost the samples the failure reward, never
the answer's time.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import anyio

from ..judges.faults import JudgeUnavailable
from .config import ServeConfig
from .wire import BadRequest

logger = logging.getLogger("openrlhf_persrm.serve")


@dataclass(frozen=True)
class RequestClock:
    """A request's arrival and, when the reward has a ``deadline_s``, its due times (``time.monotonic()``)."""

    JUDGING_SHARE: ClassVar[float] = 0.95  # the reward's own deadline: judgments cancelled, samples failed
    ANSWER_SHARE: ClassVar[float] = 0.98  # the answer leaves, computed or not

    arrived: float
    deadline_s: float | None

    @staticmethod
    def deadline_of(reward: Any) -> float | None:
        """The reward's ``deadline_s`` when it has a usable one."""
        value = getattr(reward, "deadline_s", None)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        return float(value) if ok else None

    @classmethod
    def start(cls, deadline_s: float | None) -> RequestClock:
        """A clock started now, for a reward with ``deadline_s`` (from :meth:`deadline_of`)."""
        return cls(time.monotonic(), deadline_s)

    def reward_kwargs(self) -> dict[str, float]:
        """``deadline=`` for the reward's call and ``judge_pair`` (nothing when there is no deadline)."""
        return {} if self.deadline_s is None else {"deadline": self.arrived + self.deadline_s * self.JUDGING_SHARE}

    def left(self) -> float | None:
        """Seconds until the answer must leave (None: no deadline)."""
        if self.deadline_s is None:
            return None
        return self.arrived + self.deadline_s * self.ANSWER_SHARE - time.monotonic()

    def timing(self) -> dict[str, str]:
        """``Server-Timing``: milliseconds from the request's arrival to its answer, as the server saw them."""
        return {"Server-Timing": f"total;dur={(time.monotonic() - self.arrived) * 1000:.1f}"}


class RetryCache:
    """Answers by request body: a retried request joins the computation under way or gets the
    recent answer, so OpenRLHF's retries never start judgments twice. Event-loop only."""

    def __init__(self, ttl_s: float, max_entries: int = 4096):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self.running: dict[str, asyncio.Future] = {}
        self.done: collections.OrderedDict[str, tuple[float, Any]] = collections.OrderedDict()
        self.hits = 0

    def lookup(self, key: str) -> Any:
        """A finished answer, a running future, or None."""
        now = time.monotonic()
        while self.done and next(iter(self.done.values()))[0] < now:
            self.done.popitem(last=False)
        if key in self.done:
            self.hits += 1
            return self.done[key][1]
        if key in self.running:
            self.hits += 1
            return self.running[key]
        return None

    def store(self, key: str, value: Any) -> None:
        if self.ttl_s <= 0:
            return
        self.done[key] = (time.monotonic() + self.ttl_s, value)
        while len(self.done) > self.max_entries:
            self.done.popitem(last=False)


def body_key(path: str, body: bytes) -> str:
    """The retry cache's key of a request: its path and its exact body."""
    return hashlib.sha256(path.encode() + b"\0" + body).hexdigest()


@dataclass
class Admission:
    """Runs computations for requests (see the module docstring). Event-loop only.

    ``health`` (the reward's :class:`~openrlhf_persrm.rewards.judge_health.JudgeHealth`, or None)
    is told about every computation in flight, so ``/health`` sees a judge that hangs now.
    """

    cfg: ServeConfig
    health: Any = None
    queued_judgments: int = 0
    busy: int = 0  # requests refused with 429
    overdue: int = 0  # answers sent at the deadline while their computation still ran
    retries: RetryCache = field(init=False)
    _limiter: Any = field(init=False, repr=False)
    _tasks: set = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.retries = RetryCache(self.cfg.retry_cache_s)
        self._limiter = anyio.CapacityLimiter(self.cfg.workers)

    async def answer(self, key: str | None, judgments: int, compute: Callable[[], Any], clock: RequestClock,
                     overdue: Callable[[], Any]) -> Any:
        """``compute()``'s value, run in a worker thread once per ``key`` (None: never shared), or
        ``overdue()`` when it is not ready by ``clock``; 429 when the queue is full."""
        found = self.retries.lookup(key) if key is not None else None
        if found is not None and not isinstance(found, asyncio.Future):
            return found  # the answer to the same body, given a moment ago
        future = found if found is not None else self._start(key, judgments, compute)
        try:
            return await asyncio.wait_for(asyncio.shield(future), clock.left())
        except TimeoutError:
            self.overdue += 1
            if self.overdue == 1 or self.overdue % 100 == 0:
                logger.warning("persrm serve: %d answer(s) sent at the deadline with the failure reward while their "
                               "computation still ran (label preparation or a judge that ignores its deadline)",
                               self.overdue)
            return overdue()

    def _start(self, key: str | None, judgments: int, compute: Callable[[], Any]) -> asyncio.Future:
        if self.queued_judgments + judgments > self.cfg.max_queued_judgments:
            self.busy += 1
            raise BadRequest(429, f"{self.queued_judgments} judgments queued; --max_queued_judgments "
                                  f"{self.cfg.max_queued_judgments} would be exceeded: retry later")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        # retrieved here, so an outcome no waiter awaited any more (all answered overdue) logs no warning
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        if key is not None:
            self.retries.running[key] = future
        self.queued_judgments += judgments
        task = asyncio.get_running_loop().create_task(self._run(key, judgments, compute, future))
        self._tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)
        return future

    async def _run(self, key: str | None, judgments: int, compute: Callable[[], Any], future: asyncio.Future) -> None:
        call = self.health.begin() if self.health is not None else None
        try:
            value = await anyio.to_thread.run_sync(compute, limiter=self._limiter)
        except JudgeUnavailable as exc:
            future.set_exception(BadRequest(503, f"the judge is down: {exc}"))
        except Exception as exc:  # noqa: BLE001 -- handed to every waiter (a 500 for them)
            future.set_exception(exc)
        except BaseException:
            future.cancel()
            raise
        else:
            future.set_result(value)
            if key is not None:
                self.retries.store(key, value)
        finally:
            self.queued_judgments -= judgments
            if key is not None:
                self.retries.running.pop(key, None)
            if call is not None:
                self.health.end(call)
