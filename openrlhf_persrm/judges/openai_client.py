"""An async client for OpenAI-compatible ``/chat/completions`` endpoints (``vllm serve``, hosted APIs).

Shared by the ``openai`` judge backend (:mod:`.openai_backend`) and the data pipeline's
teacher (``data_synth.teachers.OpenAITeacher``). At most ``concurrency`` requests are in
flight; each has a timeout; timeouts, connection errors, HTTP 408/409/425/429/5xx and
malformed bodies are retried with jittered exponential backoff, then reported as
:class:`EndpointError`. Authentication failures, unknown models and other 4xx answers cannot
succeed on retry and raise :class:`EndpointFatal` at once. ``stats`` counts every outcome.

httpx is imported when a client is built, not with this module.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

#: Statuses worth another attempt: the server is busy, restarting or overloaded.
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class EndpointError(RuntimeError):
    """A request failed after all its attempts (transient: trying again later may succeed).

    ``kind``: what the last attempt met: ``timeout``, ``unreachable``, ``server_error`` or
    ``malformed_body``.
    """

    def __init__(self, message: str, kind: str = "unreachable"):
        super().__init__(message)
        self.kind = kind


class EndpointFatal(RuntimeError):
    """The endpoint refuses this request outright (bad key, unknown model, bad URL or payload)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def v1_base_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a URL with a path is kept as given.

    >>> v1_base_url("http://127.0.0.1:8000"), v1_base_url("https://api.example.com/v1/")
    ('http://127.0.0.1:8000/v1', 'https://api.example.com/v1')
    """
    from urllib.parse import urlsplit

    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"endpoint {url!r} is not an http(s) URL; expected e.g. http://127.0.0.1:8000/v1")
    return url if parts.path not in ("", "/") else url + "/v1"


class ChatText(str):
    """A reply's text (a plain ``str`` to every caller) that also carries the server's ``finish_reason``
    ("stop", or "length" when the reply was cut at ``max_tokens``)."""

    finish_reason: str | None

    def __new__(cls, text: str, finish_reason: str | None = None) -> "ChatText":
        obj = super().__new__(cls, text)
        obj.finish_reason = finish_reason
        return obj


class AsyncChatClient:
    """Chat completions over HTTP with bounded concurrency, timeouts and retries.

    Use it from one event loop (httpx clients and semaphores belong to the loop that first
    uses them). ``chat`` returns the reply text.
    """

    def __init__(self, *, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 0.5, max_backoff: float = 20.0,
                 stats: Counter | None = None):
        import httpx  # deferred: only HTTP clients need it

        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency}: must be at least 1")
        if retries < 0 or timeout <= 0:
            raise ValueError(f"retries={retries}, timeout={timeout}: need retries >= 0 and timeout > 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.stats: Counter = Counter() if stats is None else stats
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._httpx = httpx
        self._client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
        self._semaphore = asyncio.Semaphore(concurrency)
        self.url = self.base_url + "/chat/completions"

    def payload(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float,
                seed: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        return body

    async def chat(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float,
                   seed: int | None = None) -> str:
        payload = self.payload(messages, max_tokens=max_tokens, temperature=temperature, seed=seed)

        def read(body: Any) -> str:
            choice = body["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
            return ChatText(text, choice.get("finish_reason"))

        return await self.post(self.url, payload, read)

    async def post(self, url: str, payload: dict[str, Any], read: Any) -> Any:
        """POST ``payload`` to ``url`` with the client's retries; ``read(json_body)`` is the result (a
        ``ValueError``, ``KeyError``, ``IndexError`` or ``TypeError`` from it counts as a malformed body)."""
        httpx = self._httpx
        last_error, kind = "no attempt", "unreachable"
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random())
                await asyncio.sleep(delay)
                self.stats["retries"] += 1
            try:
                async with self._semaphore:
                    self.stats["requests"] += 1
                    response = await self._client.post(url, json=payload)
            except httpx.TimeoutException:
                self.stats["timeouts"] += 1
                last_error, kind = "timeout", "timeout"
                continue
            except httpx.TransportError as exc:
                self.stats["connection_errors"] += 1
                last_error, kind = f"connection error: {exc!r}", "unreachable"
                continue
            status = response.status_code
            if status in (401, 403):
                raise EndpointFatal(f"{url} refused the API key (HTTP {status})", status)
            if status == 404:
                raise EndpointFatal(f"{url} answered 404 for model {self.model!r}", status)
            if status in RETRY_STATUS:
                self.stats[f"http_{status}"] += 1
                last_error, kind = f"HTTP {status}", "server_error"
                continue
            if status != 200:
                raise EndpointFatal(f"{url} answered HTTP {status}: {response.text[:200]}", status)
            try:
                result = read(response.json())
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                self.stats["malformed_bodies"] += 1
                last_error, kind = f"malformed body ({exc.__class__.__name__})", "malformed_body"
                continue
            self.stats["ok"] += 1
            return result
        raise EndpointError(f"{url}: gave up after {self.retries + 1} attempts ({last_error})", kind)

    async def list_models(self) -> list[str]:
        """Model ids the endpoint serves (``GET /models``)."""
        try:
            response = await self._client.get(self.base_url + "/models")
        except self._httpx.TimeoutException as exc:
            raise EndpointError(f"{self.base_url}/models: timeout", "timeout") from exc
        except self._httpx.HTTPError as exc:
            raise EndpointError(f"{self.base_url}/models: {exc!r}") from exc
        if response.status_code in (401, 403):
            raise EndpointFatal(f"{self.base_url}/models refused the API key (HTTP {response.status_code})",
                                response.status_code)
        if response.status_code == 404:
            raise EndpointFatal(f"{self.base_url}/models answered 404: is this an OpenAI-compatible base URL?", 404)
        if response.status_code != 200:
            raise EndpointError(f"{self.base_url}/models answered HTTP {response.status_code}", "server_error")
        try:
            return [m["id"] for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise EndpointError(f"{self.base_url}/models: malformed body ({exc.__class__.__name__})",
                                "malformed_body") from exc

    async def tokenize(self, body: dict[str, Any], timeout: float = 5.0) -> int | None:
        """Token count from vLLM's ``POST /tokenize`` (``body``: ``messages`` or ``prompt``); None where
        the server has no such endpoint; :class:`EndpointError` when it fails."""
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        try:
            response = await self._client.post(root + "/tokenize", json={"model": self.model, **body},
                                               timeout=timeout)
        except self._httpx.HTTPError as exc:
            raise EndpointError(f"{root}/tokenize: {exc!r}") from exc
        if response.status_code in (404, 405, 501):
            return None
        try:
            count = response.json().get("count") if response.status_code == 200 else None
        except (ValueError, AttributeError):
            count = None
        if not isinstance(count, int) or isinstance(count, bool):
            raise EndpointError(f"{root}/tokenize answered HTTP {response.status_code} without a count",
                                "malformed_body")
        return count

    async def aclose(self) -> None:
        await self._client.aclose()
