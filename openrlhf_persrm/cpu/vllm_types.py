"""vLLM's request and response types as the CPU stand-in implements them: plain data, no torch.

Shared by :mod:`openrlhf_persrm.cpu.engine` (which generates them) and
:mod:`openrlhf_persrm.cpu.vllm_standin` (which exposes them as ``vllm.SamplingParams``,
``vllm.outputs`` and so on, and re-exports them). Kept apart so that neither of those two
modules imports the other at import time: the stand-in builds an engine, the engine needs only
these types.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict

#: The only logprob modes that map onto a transformers forward pass (vLLM also has *_logits).
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


# ----------------------------------------------------------------------------------------------
# Request and response types (the shapes OpenRLHF reads; plain data, picklable for Ray)
# ----------------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """vLLM's sampling parameters, restricted to those the CPU engine honours.

    Semantics follow vLLM: ``temperature < 1e-5`` means greedy; ``top_k`` of 0 or -1 disables
    top-k; ``max_tokens=None`` means 16; ``min_tokens`` blocks EOS and ``stop_token_ids`` (and
    stop strings) until that many tokens exist; with ``seed``, sample ``i`` of ``n`` draws from its
    own generator seeded ``seed + i``. Penalties and prompt logprobs are not implemented and are
    refused when set to a non-neutral value rather than silently ignored.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple (vLLM accepts one string or a list)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for values the engine cannot honour.

        Called again at submission because OpenRLHF's agent code assigns ``max_tokens`` after
        construction.
        """
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise ValueError(
                f"SamplingParams.min_tokens must be in [0, max_tokens], got {self.min_tokens} "
                f"(max_tokens={self.max_tokens})"
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"SamplingParams.logprobs must be None or >= 0, got {self.logprobs}")
        neutral = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}
        for name, value in neutral.items():
            if getattr(self, name) != value:
                raise ValueError(
                    f"SamplingParams.{name}={getattr(self, name)} is not implemented by the CPU vLLM "
                    f"stand-in; leave it at {value}"
                )
        if self.prompt_logprobs is not None:
            raise ValueError("SamplingParams.prompt_logprobs is not implemented by the CPU vLLM stand-in")


class Logprob(NamedTuple):
    """One entry of ``CompletionOutput.logprobs[i]`` (vLLM's ``vllm.logprobs.Logprob``)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sampled sequence of a request (vLLM's ``vllm.outputs.CompletionOutput``).

    ``token_ids`` includes a terminating EOS / stop token id (as in vLLM); ``text`` leaves it out
    unless ``include_stop_str_in_output``. ``logprobs[i]`` maps token id -> :class:`Logprob` and
    always contains the sampled token ``token_ids[i]`` (plus the top ``SamplingParams.logprobs``).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result of one request (vLLM's ``vllm.outputs.RequestOutput``)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: None = None


class TokensPrompt(TypedDict, total=False):
    """A prompt given as token ids (vLLM's ``vllm.inputs.TokensPrompt``)."""

    prompt_token_ids: list[int]
    multi_modal_data: Any
    mm_processor_kwargs: Any


class TextPrompt(TypedDict, total=False):
    """A prompt given as text (vLLM's ``vllm.inputs.TextPrompt``)."""

    prompt: str
    multi_modal_data: Any


def random_uuid() -> str:
    """vLLM's ``vllm.utils.random_uuid``: a fresh hex request id."""
    return uuid.uuid4().hex
