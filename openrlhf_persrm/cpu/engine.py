"""A continuous-batching generation engine over a transformers causal LM, for CPU rollouts.

One background thread owns the model. Each step it admits waiting requests (prefilled
together as one left-padded batch, identical prompts prefilled once), decodes one token for
every running sequence in a single forward pass over a shared KV cache, samples, and retires
sequences that finished. The running batch's KV cache is preallocated (:class:`_SlabLayer`):
a decoding step writes one column in place instead of copying the whole cache, as
transformers' ``DynamicCache`` does. The cache is copied only when its shape changes: when
newcomers join (caches left-padded to a common length), when sequences finish (their rows
freed), and when it runs out of room (it grows in chunks, never past what the longest
running sequence can still need). Positions are passed explicitly and padding is masked, so a
sequence's tokens do not depend on what it was batched with (up to float rounding; the model
runs in float32).

Sampling follows vLLM (see :class:`~openrlhf_persrm.cpu.vllm_types.SamplingParams`).
Returned logprobs follow vLLM's ``logprobs_mode``: ``raw_logprobs`` (vLLM's default) is the
log-softmax of the model's logits before temperature, top-k/top-p and ``min_tokens`` masking;
``processed_logprobs`` (what OpenRLHF 0.11.2 asks for whenever it uses rollout logprobs, i.e.
``--algo.advantage.is_correction_level`` is not ``off``) is the log-softmax after them, which
with top-p = 1 and top-k off equals OpenRLHF's own ``log_softmax(logits / temperature)``.
Greedy rows have no temperature: their processed logprobs are the masked raw ones.

Limits: decoder-only models whose KV cache is transformers' plain ``DynamicCache`` (full
attention in every layer, e.g. Llama, Qwen2/3 without sliding windows); text only.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from openrlhf_persrm.cpu.vllm_types import (
    LOGPROBS_MODES,
    CompletionOutput,
    Logprob,
    SamplingParams,
    random_uuid,
)

logger = logging.getLogger(__name__)

#: vLLM's default ``max_tokens``.
DEFAULT_MAX_TOKENS = 16


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    future: concurrent.futures.Future
    outputs: list[CompletionOutput | None]
    unfinished: int
    aborted: bool = False


@dataclass
class _Row:
    """One sequence being decoded: sample ``index`` of ``request``."""

    request: _Request
    index: int
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    max_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0

    @property
    def params(self) -> SamplingParams:
        return self.request.params


@dataclass
class _Batch:
    """The running sequences and their shared, left-padded, preallocated KV cache.

    ``cache`` holds :class:`_SlabLayer` layers whose first ``length`` columns are in use;
    ``mask`` is the attention mask over all ``capacity`` columns (0 = padding or not yet
    written). ``next_tokens`` / ``next_positions`` are the last sampled token of each row and
    its position, fed at the next decoding step.
    """

    rows: list[_Row] = field(default_factory=list)
    cache: Any = None
    mask: torch.Tensor | None = None
    length: int = 0
    next_tokens: torch.Tensor | None = None
    next_positions: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.mask[:, : self.length]


class BatchedEngine:
    """Generate for concurrent requests in shared batches on one background thread.

    Args:
        model: a causal LM (put in eval mode, float32 recommended).
        tokenizer: its tokenizer (for text outputs and stop strings).
        seed: seeds the per-sequence generators of requests without ``SamplingParams.seed``.
        max_num_seqs: at most this many sequences decode together; 1 gives one-at-a-time decoding.
        max_model_len: prompt + output limit; defaults to ``config.max_position_embeddings``.
        logprobs_mode: ``raw_logprobs`` or ``processed_logprobs`` (see the module docstring).
        admission_window_s: when idle, wait this long after a request arrives so that a burst of
            concurrent requests is prefilled as one batch rather than one step apart.
        share_prefix_min_tokens: when the prompts prefilled together share a token prefix at least
            this long, it is computed once and its KV cache reused by every row (what vLLM's prefix
            caching saves within a batch). 0 (the default) turns this off. Useful for judges, whose
            prompts all start with one system prompt and one person's exemplars.
        kv_chunk_tokens: the preallocated KV cache grows by this many columns at a time (or by a
            quarter of its length, if more), and never beyond what the running sequences can
            still use: memory stays bounded by the requests in flight, and a copy of the cache
            happens once per chunk instead of once per token.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        seed: int = 0,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        logprobs_mode: str = "raw_logprobs",
        admission_window_s: float = 0.005,
        share_prefix_min_tokens: int = 0,
        kv_chunk_tokens: int = 128,
    ) -> None:
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode={logprobs_mode!r}; use one of {LOGPROBS_MODES}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if kv_chunk_tokens < 1:
            raise ValueError(f"kv_chunk_tokens must be >= 1, got {kv_chunk_tokens}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len or int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.logprobs_mode = logprobs_mode
        self.admission_window_s = admission_window_s
        self.share_prefix_min_tokens = share_prefix_min_tokens
        self.kv_chunk_tokens = kv_chunk_tokens
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        # remove_duplicate=False: a tied lm_head stays addressable under both names.
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self._check_cache_layout()
        _use_gqa_sdpa(self.model)

        self._seed_rng = random.Random(seed)
        self._cond = threading.Condition()
        self._waiting: deque[_Row] = deque()
        self._requests: dict[str, _Request] = {}
        self._batch = _Batch()
        self._paused = False
        self._stepping = False
        self._stopped = False
        # Held for each step and each weight copy, so a step never sees half-updated weights.
        self._model_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="persrm-cpu-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(
        cls,
        model_path: str,
        *,
        tokenizer_path: str | None = None,
        trust_remote_code: bool = False,
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> "BatchedEngine":
        """Load a HF checkpoint (float32 unless ``dtype`` says otherwise) with SDPA attention and wrap it."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, **kwargs)

    # ------------------------------------------------------------------ public API (thread-safe)

    def submit(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> concurrent.futures.Future:
        """Queue one request; the future resolves to its ``CompletionOutput`` list (by index)."""
        params.validate()
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("prompt_token_ids is empty")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_model_len={self.max_model_len}")
        request_id = request_id or random_uuid()
        future: concurrent.futures.Future = concurrent.futures.Future()
        request = _Request(request_id, prompt, params, future, [None] * params.n, params.n)
        stop_ids = frozenset(params.stop_token_ids or ()) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        budget = min(params.max_tokens or DEFAULT_MAX_TOKENS, self.max_model_len - len(prompt))
        with self._cond:
            if self._stopped:
                raise RuntimeError("engine is shut down")
            if request_id in self._requests:
                raise ValueError(f"duplicate request_id {request_id!r}")
            self._requests[request_id] = request
            for index in range(params.n):
                if params.is_greedy:
                    generator = None
                else:
                    seed = params.seed + index if params.seed is not None else self._seed_rng.getrandbits(63)
                    generator = torch.Generator().manual_seed(seed)
                self._waiting.append(_Row(request, index, generator, stop_ids, budget))
            self._cond.notify_all()
        return future

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[CompletionOutput]]:
        """Submit all prompts at once (so they batch) and wait for all results."""
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        futures = [self.submit(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        return [f.result() for f in futures]

    def abort(self, request_id: str) -> None:
        """Drop a request; its future is cancelled. Unknown ids are ignored (it may have finished)."""
        with self._cond:
            request = self._requests.pop(request_id, None)
            if request is None:
                return
            request.aborted = True
            self._waiting = deque(r for r in self._waiting if r.request is not request)
            request.future.cancel()

    def num_unfinished_requests(self) -> int:
        with self._cond:
            return len(self._requests)

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Stop scheduling steps (in-flight sequences keep their state); returns once no step runs."""
        with self._cond:
            self._paused = True
            self._cond.wait_for(lambda: not self._stepping)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def wait_until_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is waiting or running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._requests, timeout)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors into the parameters of the same names (cast to the model's dtype)."""
        with self._model_lock, torch.no_grad():
            for name, tensor in weights:
                param = self._params.get(name)
                if param is None:
                    raise ValueError(f"load_weights: the model has no parameter {name!r}")
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"load_weights: {name} has shape {tuple(param.shape)}, got {tuple(tensor.shape)}"
                    )
                param.copy_(tensor)

    def shutdown(self) -> None:
        """Stop the thread; unfinished requests fail with RuntimeError."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()

    # ------------------------------------------------------------------ scheduler thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stopped or (not self._paused and (self._waiting or self._batch.rows))
                )
                if self._stopped:
                    self._fail_all(RuntimeError("engine shut down"))
                    return
                idle = not self._batch.rows
            if idle and self.admission_window_s > 0:
                time.sleep(self.admission_window_s)
            with self._cond:
                if self._paused:
                    continue
                self._stepping = True
                admitted = self._admit()
            try:
                with self._model_lock, torch.inference_mode():
                    self._step(admitted)
            except Exception as exc:  # noqa: BLE001 -- fail the requests, keep serving new ones
                logger.exception("CPU engine step failed")
                with self._cond:
                    self._fail_all(exc)
            finally:
                with self._cond:
                    self._stepping = False
                    self._cond.notify_all()

    def _admit(self) -> list[_Row]:
        room = self.max_num_seqs - len(self._batch.rows)
        admitted = []
        while self._waiting and len(admitted) < room:
            admitted.append(self._waiting.popleft())
        return admitted

    def _fail_all(self, exc: BaseException) -> None:
        for request in self._requests.values():
            if not request.future.done():
                request.future.set_exception(exc)
        self._requests.clear()
        self._waiting.clear()
        self._batch = _Batch()

    def _step(self, admitted: list[_Row]) -> None:
        batch = self._batch
        logits = []
        if batch.rows:
            logits.append(self._decode(batch))
        if admitted:
            prefilled = self._prefill(admitted)
            logits.append(prefilled.pop("logits"))
            self._merge(batch, admitted, **prefilled)
        tokens, logprob_rows = self._sample(batch.rows, torch.cat(logits))
        self._advance(batch, tokens, logprob_rows)

    # ------------------------------------------------------------------ model passes

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    def _decode(self, batch: _Batch) -> torch.Tensor:
        if batch.length == batch.capacity:
            # Out of room: one copy into a bigger slab (the rows all still need a column now).
            need = _columns_needed(batch.rows)
            _relayout(batch, None, 0, batch.length + self._headroom(batch.length, need))
        batch.mask[:, batch.length] = 1
        logits = self._forward(
            batch.next_tokens[:, None], batch.mask[:, : batch.length + 1], batch.next_positions[:, None], batch.cache
        )
        batch.length += 1
        batch.next_positions = batch.next_positions + 1
        return logits

    def _headroom(self, length: int, need: int) -> int:
        """Free columns to allocate past ``length``: a chunk, at most what the rows can still use."""
        return max(0, min(need, max(self.kv_chunk_tokens, length // 4)))

    def _prefill(self, rows: list[_Row]) -> dict[str, Any]:
        """Prefill the distinct prompts of ``rows`` once, then expand to one cache row per row."""
        from transformers import DynamicCache

        distinct: dict[tuple[int, ...], int] = {}
        for row in rows:
            distinct.setdefault(tuple(row.request.prompt_token_ids), len(distinct))
        prompts = list(distinct)
        cache = DynamicCache(config=self.model.config)
        shared = self._shared_prefix(prompts)
        if shared:
            # Prefill the common prefix once, give every prompt a copy of its cache, then prefill
            # the (left-padded) suffixes after it: the mask keeps padding in the middle of a row.
            prefix = torch.tensor([prompts[0][:shared]])
            self._forward(prefix, torch.ones_like(prefix), torch.arange(shared)[None], cache)
            _select_cache_rows(cache, torch.zeros(len(prompts), dtype=torch.long))
            prompts_left = [p[shared:] for p in prompts]
        else:
            prompts_left = prompts
        width = max(len(p) for p in prompts_left)
        pad_id = 0  # masked out; any valid id works
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts_left])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_left])
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        if shared:
            mask = torch.cat([torch.ones(len(prompts), shared, dtype=mask.dtype), mask], dim=1)
        logits = self._forward(input_ids, mask, positions, cache)
        expand = torch.tensor([distinct[tuple(row.request.prompt_token_ids)] for row in rows])
        if len(prompts) != len(rows) or not torch.equal(expand, torch.arange(len(rows))):
            _select_cache_rows(cache, expand)
            logits, mask = logits[expand], mask[expand]
        next_positions = torch.tensor([len(row.request.prompt_token_ids) for row in rows])
        return {"logits": logits, "cache": cache, "attention_mask": mask, "next_positions": next_positions}

    def _shared_prefix(self, prompts: list[tuple[int, ...]]) -> int:
        """Tokens all ``prompts`` share at the start (each keeps at least one of its own), if worth it."""
        if self.share_prefix_min_tokens <= 0 or len(prompts) < 2:
            return 0
        first, limit = prompts[0], min(len(p) for p in prompts) - 1
        n = 0
        while n < limit and all(p[n] == first[n] for p in prompts):
            n += 1
        return n if n >= self.share_prefix_min_tokens else 0

    def _merge(self, batch: _Batch, rows: list[_Row], cache: Any, attention_mask, next_positions) -> None:
        """Append prefilled ``rows`` to the running batch: one new slab, both caches right-aligned
        (left-padded) to a common length, with room for the next chunk of decoding steps."""
        from transformers import DynamicCache

        old_rows, new_rows = len(batch.rows), len(rows)
        width = max(batch.length, attention_mask.shape[1])
        all_rows = batch.rows + list(rows)
        capacity = width + self._headroom(width, _columns_needed(all_rows) - 1)
        mask = attention_mask.new_zeros(old_rows + new_rows, capacity)
        if old_rows:
            mask[:old_rows, width - batch.length : width] = batch.attention_mask
        mask[old_rows:, width - attention_mask.shape[1] : width] = attention_mask
        layers = []
        old_layers = batch.cache.layers if old_rows else [None] * len(cache.layers)
        for old, new in zip(old_layers, cache.layers, strict=True):
            slabs = []
            for name in ("keys", "values"):
                fresh = getattr(new, name)
                b, h, n, d = fresh.shape
                slab = fresh.new_zeros(old_rows + new_rows, h, capacity, d)
                if old_rows:
                    slab[:old_rows, :, width - batch.length : width] = getattr(old, name)
                slab[old_rows:, :, width - n : width] = fresh
                slabs.append(slab)
            layers.append(_slab_layer_class()(*slabs, width))
        batch.cache = DynamicCache(config=self.model.config)
        batch.cache.layers = layers
        batch.mask, batch.length = mask, width
        batch.next_positions = next_positions if not old_rows else torch.cat([batch.next_positions, next_positions])
        batch.rows = all_rows

    # ------------------------------------------------------------------ sampling

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> tuple[list[int], list[torch.Tensor | None]]:
        """Pick one token per row; also return the logprob vector each row reports (or None).

        Vectorised over the batch: on small models per-row tensor calls would cost as much as
        the forward pass. Each sampled row still draws from its own generator, so its tokens do
        not depend on its neighbours.
        """
        want_logprobs = [row.params.logprobs is not None for row in rows]
        raw = F.log_softmax(logits, dim=-1) if self.logprobs_mode == "raw_logprobs" and any(want_logprobs) else None
        # min_tokens: EOS / stop ids are not allowed yet (vLLM's processor; after raw logprobs).
        for i, row in enumerate(rows):
            if len(row.token_ids) < row.params.min_tokens and row.stop_ids:
                logits[i, list(row.stop_ids)] = float("-inf")
        greedy = torch.tensor([row.params.is_greedy for row in rows])
        tokens = logits.argmax(dim=-1)
        processed = logits
        if not bool(greedy.all()):
            temperature = torch.tensor([1.0 if row.params.is_greedy else row.params.temperature for row in rows])
            top_k = torch.tensor([row.params.top_k if not row.params.is_greedy else 0 for row in rows])
            top_p = torch.tensor([row.params.top_p if not row.params.is_greedy else 1.0 for row in rows])
            processed = _top_k_top_p(logits / temperature[:, None], top_k, top_p)
            probs = torch.softmax(processed, dim=-1)
            # Inverse-CDF sampling with one uniform draw per row from that row's generator.
            uniform = torch.stack(
                [torch.rand((), generator=row.generator) if row.generator is not None else torch.zeros(()) for row in rows]
            )
            cdf = probs.cumsum(dim=-1)
            # right=True picks the first token whose CDF exceeds u: never a zero-probability one.
            drawn = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
            tokens = torch.where(greedy, tokens, drawn.clamp(max=logits.shape[-1] - 1))
        logprob_rows: list[torch.Tensor | None] = [None] * len(rows)
        if any(want_logprobs):
            reported = raw if raw is not None else F.log_softmax(processed, dim=-1)
            logprob_rows = [reported[i] if want else None for i, want in enumerate(want_logprobs)]
        return tokens.tolist(), logprob_rows

    # ------------------------------------------------------------------ bookkeeping

    def _advance(self, batch: _Batch, tokens: list[int], logprob_rows: list[torch.Tensor | None]) -> None:
        keep = []
        for i, (row, token, lp) in enumerate(zip(batch.rows, tokens, logprob_rows, strict=True)):
            row.token_ids.append(token)
            if lp is not None:
                self._record_logprobs(row, token, lp)
            done = self._finish_if_done(row, token)
            if not done and not row.request.aborted:
                keep.append(i)
        batch.next_tokens = torch.tensor(tokens)
        if len(keep) == len(batch.rows):
            return
        if not keep:
            self._batch = _Batch()
            return
        index = torch.tensor(keep)
        batch.rows = [batch.rows[i] for i in keep]
        batch.next_tokens = batch.next_tokens[index]
        batch.next_positions = batch.next_positions[index]
        # Free the finished rows; columns that are padding in every remaining row are dead weight
        # (trimmed), and so is room past what the remaining rows can still use.
        first_live = int(batch.attention_mask[index].any(dim=0).int().argmax())
        length = batch.length - first_live
        room = min(batch.capacity - batch.length, _columns_needed(batch.rows))
        _relayout(batch, index, first_live, length + room)

    def _record_logprobs(self, row: _Row, token: int, logprobs: torch.Tensor) -> None:
        value = float(logprobs[token])
        rank = int((logprobs > logprobs[token]).sum()) + 1
        entry = {token: Logprob(value, rank, self.tokenizer.decode([token]))}
        k = row.params.logprobs or 0
        if k:
            top = torch.topk(logprobs, k)
            for r, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
                entry.setdefault(t, Logprob(v, r, self.tokenizer.decode([t])))
        if row.logprobs is None:
            row.logprobs = []
        row.logprobs.append(entry)
        row.cumulative_logprob += value

    def _finish_if_done(self, row: _Row, token: int) -> bool:
        params = row.params
        finish_reason = stop_reason = None
        text = None
        n = len(row.token_ids)
        if token in row.stop_ids:
            finish_reason = "stop"
            # vLLM: stop_reason is the stop token id for stop_token_ids, None for EOS.
            stop_reason = token if token in (params.stop_token_ids or ()) else None
        elif params.stop_strings and n > params.min_tokens:
            text = self._decode_text(row.token_ids, params)
            hit = _find_stop_string(text, params.stop_strings)
            if hit is not None:
                at, stop = hit
                finish_reason, stop_reason = "stop", stop
                text = text[: at + len(stop)] if params.include_stop_str_in_output else text[:at]
        if finish_reason is None and n >= row.max_tokens:
            finish_reason, text = "length", None
        if finish_reason is None:
            return False
        if text is None:
            # The stop token itself is not detokenized unless asked (vLLM's detokenizer).
            ids = row.token_ids
            if finish_reason == "stop" and not params.include_stop_str_in_output:
                ids = ids[:-1]
            text = self._decode_text(ids, params)
        output = CompletionOutput(
            index=row.index,
            text=text,
            token_ids=list(row.token_ids),
            cumulative_logprob=row.cumulative_logprob if params.logprobs is not None else None,
            logprobs=row.logprobs if params.logprobs is not None else None,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
        )
        self._complete(row.request, output)
        return True

    def _decode_text(self, token_ids: list[int], params: SamplingParams) -> str:
        return self.tokenizer.decode(
            token_ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
            # as vLLM: no clean-up (a BPE tokenizer ignores it anyway, with a notice on every run)
            clean_up_tokenization_spaces=False,
        )

    def _complete(self, request: _Request, output: CompletionOutput) -> None:
        # Under the lock: abort() may cancel the future from another thread at any time.
        with self._cond:
            if request.aborted:
                return
            request.outputs[output.index] = output
            request.unfinished -= 1
            if request.unfinished == 0:
                self._requests.pop(request.request_id, None)
                request.future.set_result(list(request.outputs))
                self._cond.notify_all()

    def _check_cache_layout(self) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=self.model.config).layers
        odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
        if odd:
            raise ValueError(
                f"the CPU engine batches plain full-attention KV caches only; this model uses {sorted(odd)}"
            )


#: The attention implementation the engine gives SDPA models with grouped-query attention.
GQA_SDPA = "persrm_cpu_sdpa_gqa"


def _use_gqa_sdpa(model: Any) -> None:
    """Switch an SDPA model with grouped-query attention to :data:`GQA_SDPA`.

    With a padding mask (the engine always has one) transformers' SDPA path repeats every KV
    head for each query head it serves (``repeat_kv``), copying the whole cache in every layer
    at every step; torch's CPU kernel takes the grouped heads as they are (``enable_gqa``),
    with the same result bit for bit. Other models, and other implementations, are left alone.
    """
    config = model.config
    heads, kv_heads = getattr(config, "num_attention_heads", 0), getattr(config, "num_key_value_heads", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not kv_heads or heads == kv_heads:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GQA_SDPA, _sdpa_gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_SDPA, sdpa_mask)
    model.set_attn_implementation(GQA_SDPA)


def _sdpa_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' ``sdpa_attention_forward``, except that a masked grouped-query call on CPU
    passes ``enable_gqa=True`` instead of repeating the KV heads (where the mask is None,
    transformers already does that; anything unusual goes to transformers unchanged)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (
        attention_mask is None
        or groups <= 1
        or query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
        or kwargs.get("output_attentions", False)
        or key.shape[-1] != value.shape[-1]
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    # With a mask, transformers passes is_causal=False too: the mask carries causality.
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from the tokenizer and the generation config (vLLM stops on both)."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else source)
    return frozenset(ids)


def _columns_needed(rows: Sequence[_Row]) -> int:
    """KV columns the longest of ``rows`` may still write, counted from before its next decoding
    step: a row with ``t`` tokens decodes (writing one column each time) until it has
    ``max_tokens``. Stop tokens and strings may end it sooner; this is the bound."""
    return max(row.max_tokens - len(row.token_ids) for row in rows) if rows else 0


def _relayout(batch: _Batch, index: torch.Tensor | None, start: int, capacity: int) -> None:
    """Copy rows ``index`` (all if None) of the batch's cache and mask, columns ``start`` to
    ``length``, into new slabs of ``capacity`` columns (the only place the cache is copied
    besides :meth:`BatchedEngine._merge`)."""
    length = batch.length - start
    assert capacity >= length, (capacity, length)
    rows = slice(None) if index is None else index
    mask = batch.mask.new_zeros(len(batch.rows), capacity)
    mask[:, :length] = batch.mask[rows, start : batch.length]
    for layer in batch.cache.layers:
        slabs = []
        for used in (layer.keys, layer.values):
            b, h, n, d = used.shape
            slab = used.new_empty(len(batch.rows), h, capacity, d)
            slab[:, :, :length] = used[rows, :, start:]
            slabs.append(slab)
        layer.reset_slabs(*slabs, length)
    batch.mask, batch.length = mask, length


@functools.cache
def _slab_layer_class() -> type:
    """:class:`_SlabLayer`, built on first use so that importing this module stays cheap."""
    from transformers.cache_utils import DynamicLayer

    class _SlabLayer(DynamicLayer):
        """A full-attention cache layer over preallocated ``[batch, kv_heads, capacity, head_dim]``
        tensors: ``update`` writes the new columns in place and returns views of the used ones
        (``DynamicLayer`` concatenates, copying the whole cache at every step)."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
            super().__init__()
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self.reset_slabs(keys, values, length)

        def reset_slabs(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
            self.slab_keys, self.slab_values, self.length = keys, values, length
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            end = self.length + key_states.shape[-2]
            if end > self.slab_keys.shape[-2]:
                raise RuntimeError(f"KV slab overflow: {end} columns > capacity {self.slab_keys.shape[-2]}")
            self.slab_keys[:, :, self.length : end] = key_states
            self.slab_values[:, :, self.length : end] = value_states
            self.reset_slabs(self.slab_keys, self.slab_values, end)
            return self.keys, self.values

    return _SlabLayer


def _select_cache_rows(cache: Any, index: torch.Tensor) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys[index]
        layer.values = layer.values[index]


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask, per row, logits outside the top-k (k <= 0: off) and the top-p nucleus with -inf."""
    vocab = logits.shape[-1]
    use_k = (top_k > 0) & (top_k < vocab)
    use_p = top_p < 1.0
    if not bool(use_k.any() or use_p.any()):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(vocab)[None, :]
    drop = use_k[:, None] & (rank >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token once the tokens ranked before it already reach top_p (the top one always stays).
    drop |= use_p[:, None] & ((probs.cumsum(dim=-1) - probs) >= top_p[:, None])
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def _find_stop_string(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """The earliest occurrence of any stop string in ``text`` as ``(index, stop)``."""
    hits = [(text.find(s), s) for s in stops if s and s in text]
    return min(hits) if hits else None
