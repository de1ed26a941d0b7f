"""``openai``: a judge served behind an OpenAI-compatible chat-completions endpoint.

Typically ``vllm serve`` of a trained PersRM (with ``--enable-prefix-caching``: every judgment
for one person starts with the same system prompt and exemplars). ``generate`` is
synchronous and thread-safe: calls from all threads go to one event loop on a background
thread, where one :class:`~.openai_client.AsyncChatClient` keeps at most ``concurrency``
requests in flight, so concurrent reward calls share the server's batch.

``generate(requests, deadline=t)`` returns by ``time.monotonic() == t``: the judgments not
finished then are cancelled (their HTTP requests closed, which makes vLLM abort them) and come
back as :class:`~.faults.JudgeDeadline`. Failures come back typed (:mod:`.faults`): a refused
key or unknown model is :class:`~.faults.JudgeFatal`, logged once. ``count_tokens`` asks the
server's tokenizer (vLLM's ``POST /tokenize``) and falls back to a conservative estimate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from ..contracts import JudgeError, JudgeRequest
from ..judge_format import estimate_tokens, estimated_counter
from ._runtime import RebuiltAfterPickling
from .faults import (JudgeDeadline, JudgeFatal, JudgeMalformed, JudgeRejected, JudgeServerError, JudgeTimeout,
                     JudgeUnreachable)
from .openai_client import EndpointError, EndpointFatal, v1_base_url

#: Allowance per chat message (and the generation prompt) for the template's own tokens; real
#: templates (ChatML, Llama 3, Gemma, Mistral) spend 3-6.
_TEMPLATE_TOKENS = 8
_MAX_PIECES = 64


def _pieces(text: str) -> list[str]:
    """``text`` split at line breaks into at most ``_MAX_PIECES`` runs of lines (cache keys)."""
    lines = text.split("\n")
    if len(lines) <= _MAX_PIECES:
        return lines
    step = -(-len(lines) // _MAX_PIECES)
    return ["\n".join(lines[i:i + step]) for i in range(0, len(lines), step)]


_TRANSIENT = {"timeout": JudgeTimeout, "unreachable": JudgeUnreachable, "server_error": JudgeServerError,
              "malformed_body": JudgeMalformed}

logger = logging.getLogger(__name__)

ENV_BASE_URL = "PERSRM_JUDGE_BASE_URL"
ENV_API_KEY = "PERSRM_JUDGE_API_KEY"


@dataclass
class OpenAIJudge(RebuiltAfterPickling):
    """A served judge model, reached over HTTP.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000`` (``/v1`` is added when the URL has no
            path); default: ``$PERSRM_JUDGE_BASE_URL``.
        model: the served model name; empty: the first model the server lists (``GET /v1/models``).
        api_key_env: environment variable holding the API key (keys never sit in configs or logs);
            none set: no ``Authorization`` header.
        api_key_file: a file holding the API key (read on first use; preferred over the variable:
            a file reaches Ray workers without sitting in Ray's visible ``runtime_env``).
        concurrency: requests in flight at once, over all threads.
        timeout: seconds per attempt.
        retries: further attempts after a timeout, connection error, HTTP 429/5xx or malformed body.
        backoff, max_backoff: exponential backoff between attempts, seconds (jittered).
        chars_per_token: for the token estimate where the server cannot count (no ``/tokenize``).
    """

    name: ClassVar[str] = "openai"
    _RUNTIME: ClassVar[str] = "_runtime"

    base_url: str = ""
    model: str = ""
    api_key_env: str = ENV_API_KEY
    api_key_file: str = ""
    concurrency: int = 32
    timeout: float = 120.0
    retries: int = 2
    backoff: float = 0.5
    max_backoff: float = 10.0
    chars_per_token: float = 3.0
    stats: Counter = field(default_factory=Counter, init=False, repr=False, compare=False)
    _runtime: Any = field(default=None, init=False, repr=False, compare=False)
    _lock: Any = field(default=None, init=False, repr=False, compare=False)
    _tokenize_retry_at: float = field(default=0.0, init=False, repr=False, compare=False)
    _counts: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _local: Any = field(default_factory=threading.local, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.base_url = v1_base_url(self.base_url or os.environ.get(ENV_BASE_URL, "") or _missing_url())
        if self.concurrency < 1 or self.retries < 0 or self.timeout <= 0:
            raise ValueError(f"openai judge: concurrency={self.concurrency}, retries={self.retries}, "
                             f"timeout={self.timeout}; need concurrency >= 1, retries >= 0, timeout > 0")
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({"_local": None, "_counts": {}, "_tokenize_retry_at": 0.0})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._local = threading.local()

    # ------------------------------------------------------------------ runtime
    def _start(self) -> "_LoopThread":
        if self._runtime is None:
            with self._lock:
                if self._runtime is None:
                    self._runtime = _LoopThread(self)
        return self._runtime

    def generate(self, requests: Sequence[JudgeRequest], deadline: float | None = None) -> list[str | JudgeError]:
        """Judge outputs in request order; failed requests come back as :class:`JudgeError`.

        ``deadline`` (a ``time.monotonic()`` value): judgments not done by then are cancelled and
        returned as :class:`~.faults.JudgeDeadline`.
        """
        if not requests:
            return []
        runtime = self._start()
        return runtime.run(runtime.generate(list(requests), deadline))

    # ------------------------------------------------------------------ tokens
    special_tokens: ClassVar[tuple[str, ...]] = ()  # unknown over HTTP: the common chat markers are used

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        """Prompt tokens as the served model counts them (vLLM ``/tokenize``), else an estimate that
        does not undercount (:func:`~openrlhf_persrm.judge_format.estimate_tokens`).

        Counted per line and cached (exemplars, the system prompt and a candidate shown in both
        orders are tokenized once), plus a conservative allowance per line break and per message
        for the chat template: splitting text never lets a tokenizer merge more, so the sum does
        not undercount the whole.
        """
        counts = self._count_texts([m["content"] for m in messages])
        if counts is None:
            return estimated_counter(self.chars_per_token)(messages)
        return sum(counts) + _TEMPLATE_TOKENS * (len(messages) + 1)

    def count_text_tokens(self, text: str) -> int:
        """Tokens of a bare text (a candidate), as :meth:`count_tokens` counts."""
        counts = self._count_texts([text])
        return counts[0] if counts is not None else estimate_tokens(text, self.chars_per_token)

    def counting_deadline(self, deadline: float | None) -> None:
        """Token counts asked by this thread wait for ``/tokenize`` until ``deadline`` at most
        (``time.monotonic()``), then fall back to the estimate; None: no bound but the timeout."""
        self._local.deadline = deadline

    def _count_texts(self, texts: list[str]) -> list[int] | None:
        pieces = [_pieces(t) for t in texts]
        missing = list(dict.fromkeys(p for ps in pieces for p in ps if p not in self._counts))
        if missing:
            got = self._tokenize_many(missing)
            if got is None:
                return None
            if len(self._counts) > 200_000:
                self._counts.clear()
            self._counts.update(zip(missing, got))
        return [sum(self._counts[p] for p in ps) + len(ps) - 1 for ps in pieces]

    def _tokenize_many(self, pieces: list[str]) -> list[int] | None:
        now = time.monotonic()
        if self.stats.get("tokenize_unavailable") or now < self._tokenize_retry_at:
            return None
        deadline = getattr(self._local, "deadline", None)
        budget = min(5.0, self.timeout) if deadline is None else min(5.0, self.timeout, deadline - now)
        if budget <= 0:
            return None
        runtime = self._start()
        try:
            counts = runtime.run(runtime.tokenize_many(pieces, budget))
        except Exception as exc:  # noqa: BLE001 -- counting falls back to the estimate for a while
            if deadline is None or time.monotonic() < deadline:  # a failure, not our own time budget
                self._tokenize_retry_at = time.monotonic() + 60.0
                logger.warning("openai judge: /tokenize failed (%s); estimating token counts for a minute",
                               type(exc).__name__)
            return None
        if counts is None:
            self.stats["tokenize_unavailable"] = 1
            logger.info("openai judge: %s has no /tokenize; estimating token counts", self.base_url)
        return counts

    def health(self) -> dict[str, Any]:
        """The backend's own view: endpoint, model, the last fatal refusal (if any), counters."""
        runtime = self._runtime
        return {"backend": self.name, "base_url": self.base_url, "model": self.model,
                "fatal": getattr(runtime, "fatal", None), "stats": dict(self.stats)}

    def close(self) -> None:
        with self._lock:
            runtime, self._runtime = self._runtime, None
        if runtime is not None:
            runtime.close()


class _LoopThread:
    """An event loop on a daemon thread owning the HTTP client (built on the loop)."""

    def __init__(self, judge: OpenAIJudge):
        self.judge = judge
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="persrm-openai-judge", daemon=True)
        self.thread.start()
        self.client = self.run(self._make_client())
        self.tokenizer = self.run(self._make_client())  # its own connections: a hung judgment never blocks counting
        self._model_lock = asyncio.Lock()
        self.fatal: str | None = None  # the last refusal that no retry can fix (logged once)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _make_client(self) -> Any:
        from .openai_client import AsyncChatClient

        quiet = logging.getLogger("httpx")
        if quiet.level == logging.NOTSET:  # one "HTTP Request:" INFO line per judgment is noise, not news
            quiet.setLevel(logging.WARNING)

        j = self.judge
        return AsyncChatClient(base_url=j.base_url, model=j.model, api_key=_api_key(j),
                               concurrency=j.concurrency, timeout=j.timeout, retries=j.retries, backoff=j.backoff,
                               max_backoff=j.max_backoff, stats=j.stats)

    async def _ensure_model(self) -> None:
        async with self._model_lock:
            if self.client.model:
                return
            models = await self.client.list_models()
            if not models:
                raise EndpointFatal(f"{self.judge.base_url}/models lists no model")
            self.client.model = self.judge.model = models[0]
            logger.info("openai judge: %s serves %s", self.judge.base_url, models[0])

    async def _one(self, req: JudgeRequest) -> str | JudgeError:
        try:
            await self._ensure_model()
            return await self.client.chat(req.messages, max_tokens=req.max_new_tokens,
                                          temperature=req.temperature, seed=req.seed)
        except EndpointFatal as exc:
            if exc.status in (400, 413, 422):  # this request only (e.g. over the context length)
                self.judge.stats["rejected"] += 1
                return JudgeRejected(str(exc))
            if self.fatal is None:  # the same refusal repeats for every request: say it once
                logger.error("openai judge: %s; every judgment will fail until this is fixed", exc)
            self.fatal = str(exc)
            self.judge.stats["fatal"] += 1
            return JudgeFatal(str(exc))
        except EndpointError as exc:
            return _TRANSIENT.get(getattr(exc, "kind", ""), JudgeUnreachable)(str(exc))

    async def generate(self, requests: list[JudgeRequest], deadline: float | None = None) -> list[str | JudgeError]:
        tasks = [asyncio.ensure_future(self._one(r)) for r in requests]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:  # cancelling closes the HTTP request; vLLM aborts a request whose client left
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            self.judge.stats["cancelled"] += len(pending)
        return [task.result() if task in done else JudgeDeadline("no judgment before the deadline; cancelled")
                for task in tasks]

    async def tokenize_many(self, pieces: list[str], budget: float) -> list[int] | None:
        """Token counts of bare texts, concurrently, within ``budget`` seconds; None: no ``/tokenize``."""
        async def count() -> list[int] | None:
            await self._ensure_model()
            counts = await asyncio.gather(*(self.tokenizer.tokenize({"prompt": p, "add_special_tokens": False},
                                                                    timeout=budget) for p in pieces))
            return None if any(c is None for c in counts) else list(counts)

        return await asyncio.wait_for(count(), timeout=budget)

    def close(self) -> None:
        try:
            self.run(self.client.aclose())
            self.run(self.tokenizer.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


def _api_key(judge: OpenAIJudge) -> str | None:
    """The API key from ``api_key_file`` (if set) or ``$api_key_env``; never from argv or a config."""
    if judge.api_key_file:
        try:
            with open(judge.api_key_file, encoding="utf-8") as fh:
                return fh.read().strip() or None
        except OSError as exc:
            raise ValueError(f"openai judge: cannot read api_key_file {judge.api_key_file!r}: {exc}") from None
    return os.environ.get(judge.api_key_env) or None


def _missing_url() -> str:
    raise ValueError(f"openai judge: no base_url; set `endpoint` in the persrm reward config (e.g. "
                     f"http://127.0.0.1:8000) or ${ENV_BASE_URL}")
