"""``local``: a transformers judge in this process, with continuous batching across callers.

The model runs on :class:`openrlhf_persrm.cpu.engine.BatchedEngine`: one background thread
decodes every running judgment in one forward pass per token and admits new requests as
they arrive. So requests from many threads at once (OpenRLHF scores samples in threads; the
HTTP server serves clients concurrently) are batched together without the callers doing
anything: a burst is prefilled as one batch (the engine waits ``admission_window_s`` for
it; a prefix all its prompts share, such as the system prompt and one person's exemplars, is
computed once), and late arrivals join the running batch at the next step.

CPU only (the engine's limits apply: decoder-only models with a plain full-attention KV
cache, e.g. Llama, Qwen2/3, SmolLM2). On GPUs serve the judge with vLLM and use the
``openai`` backend.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from ..contracts import JudgeError, JudgeRequest
from ..judge_format import chat_prompt_ids
from ._runtime import RebuiltAfterPickling
from .faults import JudgeDeadline, JudgeRejected, JudgeTimeout

logger = logging.getLogger(__name__)


@dataclass
class LocalJudge(RebuiltAfterPickling):
    """A Hugging Face causal LM judging on CPU, batching concurrent requests together.

    Args:
        model_path: a local checkpoint folder (``openrlhf_persrm.models.resolve_model`` resolves
            the built-in ``smollm2-135m-instruct`` alias to one).
        batch_size: at most this many judgments decode together (1: one at a time).
        timeout: seconds a ``generate`` call waits for its judgments; those not done by then are
            aborted and returned as :class:`JudgeError`.
        max_model_len: prompt + output token limit (default: the model's context length).
        admission_window_s: how long the idle engine waits after a request arrives, so that a
            burst from many threads is prefilled as one batch.
        threads: torch CPU threads (default: torch's choice).
        share_prefix_min_tokens: prompts prefilled together compute a common prefix of at least this
            many tokens once (judgments of one person share the system prompt and exemplars); 0: off.
        seed: seeds sampled judgments whose request has no seed.
        dtype: float32 (default), bfloat16, or auto (bfloat16 on a CPU that has it natively: about twice as fast
            there; greedy verdicts may differ from float32's in close calls).

    ``generate(requests, progress=bar)`` takes an optional tqdm-like ``progress`` updated as
    judgments finish. The model loads on first use; pickling drops it.
    """

    name: ClassVar[str] = "local"
    _RUNTIME: ClassVar[str] = "_engine"

    model_path: str = ""
    batch_size: int = 16
    timeout: float = 600.0
    max_model_len: int | None = None
    admission_window_s: float = 0.005
    threads: int | None = None
    share_prefix_min_tokens: int = 32
    seed: int = 0
    dtype: str = "float32"
    stats: Counter = field(default_factory=Counter, init=False, repr=False, compare=False)
    _engine: Any = field(default=None, init=False, repr=False, compare=False)
    _lock: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("local judge: model_path is empty; pass a local checkpoint folder "
                             "(or `model` in the persrm reward config)")
        if self.batch_size < 1:
            raise ValueError(f"local judge: batch_size={self.batch_size}; use 1 (one at a time) or more")
        if self.timeout <= 0:
            raise ValueError(f"local judge: timeout={self.timeout}; use a positive number of seconds")
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"local judge: dtype={self.dtype!r}; use float32, bfloat16 or auto")
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ model
    @property
    def engine(self) -> Any:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = self._load()
        return self._engine

    def _load(self) -> Any:
        import torch

        from ..cpu.engine import BatchedEngine

        if self.threads:
            torch.set_num_threads(self.threads)
        from ..models import torch_dtype

        engine = BatchedEngine.from_pretrained(self.model_path, max_num_seqs=self.batch_size, seed=self.seed,
                                               dtype=torch_dtype(self.dtype),
                                               max_model_len=self.max_model_len,
                                               admission_window_s=self.admission_window_s,
                                               share_prefix_min_tokens=self.share_prefix_min_tokens)
        tok = engine.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        logger.info("local judge: %s loaded (batch_size=%d)", self.model_path, self.batch_size)
        return engine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        """Prompt tokens of chat messages as this judge sees them (for ``ExemplarBudget``)."""
        return len(self._encode(messages))

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    # ------------------------------------------------------------------ generation
    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The tokenizer's special tokens (neutralised inside candidates before templating)."""
        tok = self.tokenizer
        extra = [t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
        return tuple(dict.fromkeys([*getattr(tok, "all_special_tokens", []), *extra]))

    def count_text_tokens(self, text: str) -> int:
        """Tokens of a bare text (a candidate) in this judge's tokenizer."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def health(self) -> dict[str, Any]:
        return {"backend": self.name, "model_path": self.model_path, "loaded": self._engine is not None,
                "stats": dict(self.stats)}

    def generate(self, requests: Sequence[JudgeRequest], progress: Any = None,
                 deadline: float | None = None) -> list[str | JudgeError]:
        """Judge outputs in request order; a request that fails or times out gets a :class:`JudgeError`.

        ``deadline`` (a ``time.monotonic()`` value) bounds the whole call, tokenising included, as
        ``timeout`` bounds the wait: judgments not done by then are aborted (requests not yet
        tokenised are never submitted) and returned as :class:`~.faults.JudgeDeadline`.
        """
        from ..cpu.vllm_standin import SamplingParams

        engine = self.engine
        out: list[str | JudgeError] = [JudgeError("not run")] * len(requests)
        pending: dict[concurrent.futures.Future, tuple[int, str]] = {}
        for i, req in enumerate(requests):
            if deadline is not None and time.monotonic() >= deadline:
                self.stats["deadline"] += 1
                out[i] = JudgeDeadline("local judge: the deadline passed before this request was tokenised")
                if progress is not None:
                    progress.update(1)
                continue
            try:
                params = SamplingParams(temperature=req.temperature, seed=req.seed, max_tokens=req.max_new_tokens)
                request_id = f"judge-{id(self):x}-{threading.get_ident():x}-{time.monotonic_ns()}-{i}"
                pending[engine.submit(self._encode(req.messages), params, request_id)] = (i, request_id)
            except ValueError as exc:  # prompt too long for the model, bad sampling settings
                self.stats["rejected"] += 1
                out[i] = JudgeRejected(f"local judge rejected the request: {exc}")
                if progress is not None:
                    progress.update(1)
        self.stats["requests"] += len(pending)

        def collect(future: concurrent.futures.Future) -> None:
            i, _ = pending.pop(future)
            try:
                completion = future.result()[0]
                out[i] = completion.text
                self.stats["ok"] += 1
                self.stats["generated_tokens"] += len(completion.token_ids)
            except Exception as exc:  # noqa: BLE001 -- one failed judgment must not sink the batch
                self.stats["errors"] += 1
                out[i] = JudgeError(f"local judge failed: {type(exc).__name__}: {exc}")
            if progress is not None:
                progress.update(1)

        wait = self.timeout
        by_deadline = deadline is not None and deadline - time.monotonic() < wait
        if by_deadline:
            wait = max(0.0, deadline - time.monotonic())
        try:
            for future in concurrent.futures.as_completed(list(pending), timeout=wait):
                collect(future)
        except concurrent.futures.TimeoutError:
            for future, (i, request_id) in list(pending.items()):
                if future.done():
                    collect(future)
                    continue
                engine.abort(request_id)
                pending.pop(future)
                self.stats["deadline" if by_deadline else "timeouts"] += 1
                out[i] = (JudgeDeadline("local judge: no output before the deadline; aborted") if by_deadline
                          else JudgeTimeout(f"local judge: no output within timeout={self.timeout}s"))
        return out

    def close(self) -> None:
        """Stop the engine thread (a later call loads the model again)."""
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
