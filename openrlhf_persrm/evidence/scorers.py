"""Scorers: mean token log-probabilities of a continuation after a context, from a frozen model.

Two backends, one contract (:class:`Scorer`):

* :class:`LocalScorer`: a transformers checkpoint in this process, batched (sorted by length,
  only the continuation's positions go through the output layer), thread-safe, with an LRU
  cache (a policy's reference text is scored once, not once per sample).
* :class:`OpenAIScorer`: an OpenAI-compatible *completions* endpoint that echoes prompt
  log-probabilities (``vllm serve``: ``echo: true, logprobs: 0, max_tokens: 0`` returns the
  log-probability of every prompt token with its character offset), so GPU users score with
  the vLLM server they already run.

Both tokenize ``context + continuation`` as one text and average over the tokens that start
inside the continuation, leaving out those inside ``skip`` (character spans of the
continuation, e.g. words copied from the exemplars). torch, transformers and httpx are imported
when a scorer is first used.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Sequence


@dataclass(frozen=True)
class ScoreJob:
    """Score ``continuation`` after ``context``, leaving out the characters in ``skip``."""

    context: str
    continuation: str
    skip: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Score:
    mean_logprob: float
    tokens: int            # continuation tokens averaged over (skipped ones excluded)


class ScorerDeadline(TimeoutError):
    """The deadline passed before every job was scored."""


class Scorer(Protocol):
    """What the evidence needs from a model: ``score(jobs)`` -> one :class:`Score` per job, in
    order. ``deadline`` (``time.monotonic()`` seconds) bounds the call (:class:`ScorerDeadline`);
    ``progress`` is a tqdm-like bar updated per job. ``identity`` names the model (recorded with
    the evidence)."""

    identity: str

    def score(self, jobs: Sequence[ScoreJob], *, deadline: float | None = None,
              progress: Any = None) -> list[Score]: ...


def _select(offsets: Sequence[tuple[int, int]], start: int, skip: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of the tokens (by character ``offsets`` in context + continuation) that start in the
    continuation (at or after ``start``) and do not lie inside a ``skip`` span (continuation
    coordinates)."""
    keep = []
    for i, (s, e) in enumerate(offsets):
        if s < start or e <= s:
            continue
        if any(a <= s - start and e - start <= b for a, b in skip):
            continue
        keep.append(i)
    return keep


def _mean(values: Sequence[float]) -> Score:
    return Score(sum(values) / len(values), len(values)) if values else Score(0.0, 0)


@dataclass
class LocalScorer:
    """A local causal LM scoring on this machine (CPU or one GPU).

    Args:
        model_path: a checkpoint folder (``openrlhf_persrm.models.resolve_model`` resolves the
            built-in ``smollm2-135m-instruct``).
        batch_size: sequences per forward pass.
        max_context_tokens: contexts are cut from the left to this many tokens.
        dtype: ``float32`` (default: exact and reproducible), ``bfloat16``, or ``auto`` (bfloat16 on a
            GPU or a CPU with native bf16, else float32).
        device: ``cpu`` or ``cuda``.
        cache_size: scores kept in an LRU cache (0: no cache).
    """

    name: ClassVar[str] = "local"

    model_path: str = ""
    batch_size: int = 8
    max_context_tokens: int = 768
    dtype: str = "float32"
    device: str = "cpu"
    cache_size: int = 4096
    stats: dict[str, int] = field(default_factory=lambda: {"jobs": 0, "cached": 0, "tokens": 0},
                                  init=False, repr=False)
    _model: Any = field(default=None, init=False, repr=False)
    _tok: Any = field(default=None, init=False, repr=False)
    _lock: Any = field(default_factory=threading.Lock, init=False, repr=False)
    _cache: Any = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("evidence scorer: model_path is empty; pass a local checkpoint (the model the judge "
                             "was trained from, by default)")
        if self.batch_size < 1 or self.max_context_tokens < 16:
            raise ValueError(f"evidence scorer: batch_size={self.batch_size}, max_context_tokens="
                             f"{self.max_context_tokens}; need batch_size >= 1 and max_context_tokens >= 16")
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"evidence scorer: dtype={self.dtype!r}; use float32, bfloat16 or auto")

    @property
    def identity(self) -> str:
        import os

        return os.path.basename(os.path.normpath(self.model_path)) or self.model_path

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_model=None, _tok=None, _lock=None, _cache=OrderedDict())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..models import torch_dtype

        dtype = torch_dtype(self.dtype, self.device)
        self._tok = AutoTokenizer.from_pretrained(self.model_path)
        self._model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(self.device).eval()

    def score(self, jobs: Sequence[ScoreJob], *, deadline: float | None = None,
              progress: Any = None) -> list[Score]:
        out: list[Score | None] = [None] * len(jobs)
        with self._lock:
            if self._model is None:
                self._load()
            todo: list[int] = []
            for i, job in enumerate(jobs):
                hit = self._cache.get(job) if self.cache_size else None
                if hit is not None:
                    self._cache.move_to_end(job)
                    out[i] = hit
                    self.stats["cached"] += 1
                else:
                    todo.append(i)
            if progress is not None and len(todo) < len(jobs):
                progress.update(len(jobs) - len(todo))
            # Jobs after one context (a pair's two candidates after the person's exemplars) share its
            # forward pass: the context runs once, its KV cache serves every continuation.
            groups: dict[tuple[int, ...], list[tuple[int, list[int], list[int]]]] = {}
            for i in todo:
                ctx, cont, keep = self._encode(jobs[i])
                groups.setdefault(ctx, []).append((i, cont, keep))
            order = sorted(groups, key=lambda c: len(c) + max(len(x[1]) for x in groups[c]))
            batch: list[tuple[int, ...]] = []
            rows = 0
            for ctx in order + [None]:  # type: ignore[list-item]
                if ctx is not None and rows + len(groups[ctx]) <= max(self.batch_size, len(groups[ctx])):
                    batch.append(ctx)
                    rows += len(groups[ctx])
                    continue
                if batch:
                    if deadline is not None and time.monotonic() > deadline:
                        raise ScorerDeadline(f"scored {sum(s is not None for s in out)} of {len(jobs)} jobs "
                                             "before the deadline")
                    members = [(c, groups[c]) for c in batch]
                    for (i, _, _), score in zip([m for _, ms in members for m in ms], self._forward(members)):
                        out[i] = score
                        if self.cache_size:
                            self._cache[jobs[i]] = score
                            if len(self._cache) > self.cache_size:
                                self._cache.popitem(last=False)
                    if progress is not None:
                        progress.update(rows)
                if ctx is not None:
                    batch, rows = [ctx], len(groups[ctx])
            self.stats["jobs"] += len(jobs)
        return [s for s in out if s is not None]

    def _encode(self, job: ScoreJob) -> tuple[tuple[int, ...], list[int], list[int]]:
        """``(context ids cut from the left, continuation ids, continuation positions to score)``.

        ``context + continuation`` is tokenized as one text (as a server tokenizes a prompt); tokens
        that start inside the continuation are its tokens."""
        enc = self._tok(job.context + job.continuation, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        first = next((i for i, (s, _) in enumerate(offsets) if s >= len(job.context)), len(ids))
        keep = [i - first for i in _select(offsets, len(job.context), job.skip)]
        ctx = tuple(ids[max(0, first - self.max_context_tokens):first])
        if not ctx:  # nothing predicts the first token
            keep = [j for j in keep if j >= 1]
        return ctx, ids[first:], keep

    def _forward(self, members: list[tuple[tuple[int, ...], list[tuple[int, list[int], list[int]]]]]) -> list[Score]:
        """Scores for every continuation of ``members`` (context ids, its jobs), in that order."""
        import torch

        model, dev = self._model, self.device
        pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else (self._tok.eos_token_id or 0)
        decoder = model.get_decoder()
        # 1. Contexts, left-padded so that every one ends in the last column.
        lc = max(len(c) for c, _ in members)
        ctx_ids = torch.full((len(members), lc), pad, dtype=torch.long)
        ctx_mask = torch.zeros((len(members), lc), dtype=torch.long)
        for g, (c, _) in enumerate(members):
            if c:
                ctx_ids[g, lc - len(c):] = torch.tensor(c)
                ctx_mask[g, lc - len(c):] = 1
        ctx_pos = (ctx_mask.cumsum(1) - 1).clamp(min=0)
        # 2. Continuations, right-padded, after their context's cache.
        owner = [g for g, (_, js) in enumerate(members) for _ in js]
        conts = [cont for _, js in members for _, cont, _ in js]
        keeps = [keep for _, js in members for _, _, keep in js]
        lk = max(1, max(len(c) for c in conts))
        cont_ids = torch.full((len(conts), lk), pad, dtype=torch.long)
        cont_mask = torch.zeros((len(conts), lk), dtype=torch.long)
        for r, c in enumerate(conts):
            if c:
                cont_ids[r, :len(c)] = torch.tensor(c)
                cont_mask[r, :len(c)] = 1
        idx = torch.tensor(owner, dtype=torch.long)
        ctx_len = ctx_mask.sum(1)
        with torch.no_grad():
            first = decoder(input_ids=ctx_ids.to(dev), attention_mask=ctx_mask.to(dev),
                            position_ids=ctx_pos.to(dev), use_cache=True)
            cache = first.past_key_values
            cache.reorder_cache(idx.to(dev))
            mask = torch.cat([ctx_mask[idx], cont_mask], dim=1)
            pos = ctx_len[idx].unsqueeze(1) + torch.arange(lk).unsqueeze(0)
            hidden = decoder(input_ids=cont_ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                             past_key_values=cache, use_cache=True).last_hidden_state
            # Token j of a continuation is predicted by the hidden state before it: the context's last
            # for j = 0, the continuation's own (j - 1) after that.
            before = torch.cat([first.last_hidden_state[idx, -1:].to(hidden.dtype), hidden[:, :-1]], dim=1)
            rows = [r for r, keep in enumerate(keeps) for _ in keep]
            cols = [j for keep in keeps for j in keep]
            targets = [conts[r][j] for r, keep in enumerate(keeps) for j in keep]
            if not rows:
                return [Score(0.0, 0) for _ in conts]
            logits = model.lm_head(before[rows, cols])
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = logp[torch.arange(len(targets)), torch.tensor(targets, device=logp.device)].tolist()
        self.stats["tokens"] += int(ctx_mask.sum()) + int(cont_mask.sum())
        out, k = [], 0
        for keep in keeps:
            out.append(_mean(picked[k:k + len(keep)]))
            k += len(keep)
        return out


@dataclass
class OpenAIScorer:
    """Prompt log-probabilities from an OpenAI-compatible completions endpoint (``vllm serve``).

    Each job is one ``POST /v1/completions`` with ``echo: true, logprobs: 0, max_tokens: 0``: the
    server returns every prompt token's log-probability and character offset. ``concurrency``
    requests are in flight; ``timeout`` bounds each, ``retries`` as for the judge client.
    """

    name: ClassVar[str] = "openai"

    base_url: str = ""
    model: str = ""
    api_key_env: str = "PERSRM_JUDGE_API_KEY"
    concurrency: int = 16
    timeout: float = 30.0
    retries: int = 2

    def __post_init__(self) -> None:
        from ..judges.openai_client import v1_base_url

        if not self.base_url or not self.model:
            raise ValueError("evidence scorer (openai): base_url and model are required, e.g. "
                             "{'scorer_endpoint': 'http://scorer:8000', 'scorer_model': 'SmolLM2-135M-Instruct'}")
        self.base_url = v1_base_url(self.base_url)

    @property
    def identity(self) -> str:
        return self.model

    def score(self, jobs: Sequence[ScoreJob], *, deadline: float | None = None,
              progress: Any = None) -> list[Score]:
        import asyncio
        import os

        from ..judges.openai_client import AsyncChatClient

        async def run() -> list[Score]:
            client = AsyncChatClient(base_url=self.base_url, model=self.model,
                                     api_key=os.environ.get(self.api_key_env) or None,
                                     concurrency=self.concurrency, timeout=self.timeout, retries=self.retries)
            try:
                async def one(job: ScoreJob) -> Score:
                    payload = {"model": self.model, "prompt": job.context + job.continuation, "max_tokens": 0,
                               "echo": True, "logprobs": 0, "temperature": 0.0}
                    score = await client.post(self.base_url + "/completions", payload,
                                              lambda body: _read_echo(body, len(job.context), job.skip))
                    if progress is not None:
                        progress.update(1)
                    return score

                tasks = asyncio.gather(*(one(j) for j in jobs))
                if deadline is None:
                    return await tasks
                try:
                    return await asyncio.wait_for(tasks, max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise ScorerDeadline(f"{len(jobs)} scoring requests did not finish before the deadline") from None
            finally:
                await client.aclose()

        return asyncio.run(run())


def _read_echo(body: Any, start: int, skip: Sequence[tuple[int, int]]) -> Score:
    """The mean log-probability of the continuation's tokens in an echoed completions body."""
    lp = body["choices"][0]["logprobs"]
    token_lp, offsets, tokens = lp["token_logprobs"], lp["text_offset"], lp["tokens"]
    if not (len(token_lp) == len(offsets) == len(tokens)):
        raise ValueError("logprobs arrays of different lengths")
    spans = [(o, o + len(t)) for o, t in zip(offsets, tokens)]
    keep = [i for i in _select(spans, start, skip) if token_lp[i] is not None]
    values = [float(token_lp[i]) for i in keep]
    if any(math.isnan(v) for v in values):
        raise ValueError("NaN log-probability")
    return _mean(values)
