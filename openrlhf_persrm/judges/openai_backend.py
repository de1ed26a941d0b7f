"""``openai``: a judge served behind an OpenAI-compatible chat-completions endpoint.

Typically ``vllm serve`` of a trained PersRM (with ``--enable-prefix-caching``: every judgment
for one person starts with the same system prompt and exemplars). ``generate`` is
synchronous and thread-safe: calls from all threads go to one event loop on a background
thread, where one :class:`~.openai_client.AsyncChatClient` keeps at most ``concurrency``
requests in flight, so concurrent reward calls share the server's batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from ..contracts import JudgeError, JudgeRequest
from ._runtime import RebuiltAfterPickling
from .openai_client import EndpointError, EndpointFatal, v1_base_url

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
        concurrency: requests in flight at once, over all threads.
        timeout: seconds per attempt.
        retries: further attempts after a timeout, connection error, HTTP 429/5xx or malformed body.
        backoff, max_backoff: exponential backoff between attempts, seconds (jittered).
    """

    name: ClassVar[str] = "openai"
    _RUNTIME: ClassVar[str] = "_runtime"

    base_url: str = ""
    model: str = ""
    api_key_env: str = ENV_API_KEY
    concurrency: int = 32
    timeout: float = 120.0
    retries: int = 2
    backoff: float = 0.5
    max_backoff: float = 10.0
    stats: Counter = field(default_factory=Counter, init=False, repr=False, compare=False)
    _runtime: Any = field(default=None, init=False, repr=False, compare=False)
    _lock: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.base_url = v1_base_url(self.base_url or os.environ.get(ENV_BASE_URL, "") or _missing_url())
        if self.concurrency < 1 or self.retries < 0 or self.timeout <= 0:
            raise ValueError(f"openai judge: concurrency={self.concurrency}, retries={self.retries}, "
                             f"timeout={self.timeout}; need concurrency >= 1, retries >= 0, timeout > 0")
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ runtime
    def _start(self) -> "_LoopThread":
        if self._runtime is None:
            with self._lock:
                if self._runtime is None:
                    self._runtime = _LoopThread(self)
        return self._runtime

    def generate(self, requests: Sequence[JudgeRequest]) -> list[str | JudgeError]:
        """Judge outputs in request order; failed requests come back as :class:`JudgeError`."""
        if not requests:
            return []
        runtime = self._start()
        return runtime.run(runtime.generate(list(requests)))

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
        self._model_lock = asyncio.Lock()
        self._fatal_logged = False

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _make_client(self) -> Any:
        from .openai_client import AsyncChatClient

        j = self.judge
        return AsyncChatClient(base_url=j.base_url, model=j.model, api_key=os.environ.get(j.api_key_env) or None,
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
            if not self._fatal_logged:  # the same refusal repeats for every request: say it once
                self._fatal_logged = True
                logger.error("openai judge: %s; every judgment will fail until this is fixed", exc)
            self.judge.stats["fatal"] += 1
            return JudgeError(str(exc))
        except EndpointError as exc:
            return JudgeError(str(exc))

    async def generate(self, requests: list[JudgeRequest]) -> list[str | JudgeError]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    def close(self) -> None:
        try:
            self.run(self.client.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


def _missing_url() -> str:
    raise ValueError(f"openai judge: no base_url; set `endpoint` in the persrm reward config (e.g. "
                     f"http://127.0.0.1:8000) or ${ENV_BASE_URL}")
