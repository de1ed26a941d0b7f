"""Judging pairs with a judge backend under a deadline: what the ``persrm`` reward and the
``persrm_group`` trainer plugin share.

A :class:`JudgeRunner` belongs to one holder of :class:`~openrlhf_persrm.judge_settings.JudgeSettings`
(the reward or the group plugin). It builds the backend on first use (the holder pickles: Ray
ships it to workers), fits judge prompts into the token budget with the judge tokenizer's
special tokens neutralised, judges a batch within a deadline (asking again for unreadable
answers while time is left), probes the judge at start-up, and keeps the judge's health (the
stop rule). Errors it recovers from (a tokenizer that fails, a backend that raises or cannot be
cancelled) are counted in :attr:`JudgeRunner.handled` and logged at WARNING the first time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from ..contracts import JudgeError, JudgeRequest, accepts_keyword
from ..judge_format import (SCORE_MAX, SCORE_MIN, ExemplarBudget, Judgment, PromptTooLong, estimate_tokens,
                            estimated_counter, parse_judgment, truncate_to_tokens)
from ..judge_settings import JudgeSettings
from ..judges.faults import JudgeDeadline, JudgeUnavailable, JudgeUnreachable, failure_kind
from .judge_health import JudgeHealth

logger = logging.getLogger("openrlhf_persrm.rewards.persrm")

_SPAN = SCORE_MAX - SCORE_MIN
_BUILD_LOCK = threading.Lock()
# The probe: one small judgment the judge can always take.
PROBE_PAIR = (["I write short plain sentences."], "Say hello.", "Hello.", "Hi there, friend!")


def truncate(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to at most ``limit`` characters (at a word boundary when one is near)."""
    if len(text) <= limit:
        return text, False
    cut = text[:limit]
    space = cut.rfind(" ")
    if space >= limit * 0.8:
        cut = cut[:space]
    return cut, True


def judgment_value(mode: str, sample: int, reference: int) -> float:
    """One judgment's contribution to the reward, in [-1, 1].

    >>> judgment_value("score_diff", 10, 1), judgment_value("win_rate", 4, 6), judgment_value("pointwise", 10, 3)
    (1.0, -1.0, 1.0)
    """
    if mode == "score_diff":
        return (sample - reference) / _SPAN
    if mode == "win_rate":
        return float((sample > reference) - (sample < reference))
    if mode == "pointwise":
        return (sample - (SCORE_MIN + SCORE_MAX) / 2) / (_SPAN / 2)
    raise ValueError(f"mode={mode!r}; use score_diff, win_rate or pointwise")


@dataclass
class JudgedPair:
    """The outcome of judging one pair: scores in the positions shown, or why there are none."""

    score_a: int | None
    score_b: int | None
    text: str
    failure: str | None  # "judge_error", a parser FailureKind value, or "prompt_too_long"
    detail: str = ""
    retries: int = 0
    kind: str | None = None  # the failure's kind: a judges.faults kind or the parser's FailureKind value

    @property
    def ok(self) -> bool:
        return self.failure is None

    @classmethod
    def failed(cls, kind: str, detail: str) -> "JudgedPair":
        """A judgment that was never asked (``prompt_too_long``, ``deadline``, ...)."""
        return cls(None, None, "", kind, detail, kind=kind)


class HandledErrors:
    """Errors recovered from, counted by kind; the first of each kind is logged at WARNING with its
    detail, so none is silent and none floods the log. Thread-safe."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def note(self, kind: str, message: str) -> None:
        with self._lock:
            self.counts[kind] += 1
            first = self.counts[kind] == 1
        if first:
            logger.warning("persrm: %s (logged once; later ones are counted as '%s')", message, kind)


_DEADLINE_AWARE: dict[type, bool] = {}


def _takes_deadline(judge: Any) -> bool:
    kind = type(judge)
    if kind not in _DEADLINE_AWARE:
        _DEADLINE_AWARE[kind] = accepts_keyword(judge.generate, "deadline")
    return _DEADLINE_AWARE[kind]


class JudgeRunner:
    """Judges pairs for one holder of judge settings (see the module docstring)."""

    def __init__(self, settings: Any):
        self.settings = settings
        # an instance given in Python is used as it is; a name is resolved on first use (in the worker)
        self._judge: Any = None if isinstance(settings.backend, str) else settings.backend
        self._special: tuple[Any, tuple[str, ...]] | None = None  # (judge, its special tokens)
        self._scorer: Any = None  # the evidence scorer, or False once it is known there is none
        self.health = JudgeHealth(settings.stop_failure_rate, settings.stop_after_steps, settings.stop_window)
        self.handled = HandledErrors()

    @property
    def built_judge(self) -> Any:
        """The backend if it has been built, else None (builds nothing)."""
        return self._judge

    # ------------------------------------------------------------------ the judge
    @property
    def judge(self) -> Any:
        """The judge backend, built on first use."""
        if self._judge is None:
            with _BUILD_LOCK:
                if self._judge is None:
                    self._judge = self._build_judge()
        return self._judge

    def _build_judge(self) -> Any:
        s = self.settings
        if s.serve_url:
            raise ValueError(f"{s.name}: with serve_url the judging happens in `persrm serve`; there is no judge "
                             "backend here")
        if s.endpoint:
            from ..judges.openai_backend import OpenAIJudge

            return OpenAIJudge(**{"base_url": s.endpoint, "model": s.served_model, "api_key_env": s.api_key_env,
                                  "api_key_file": s.api_key_file, "timeout": s.timeout,
                                  "chars_per_token": s.chars_per_token, **s.backend_config})
        if s.model:
            from ..judges.local import LocalJudge
            from ..models import resolve_model

            return LocalJudge(**{"model_path": resolve_model(s.model), "timeout": s.timeout, **s.backend_config})
        from ..registry import instantiate, judge_backends

        return instantiate(judge_backends, s.backend, s.backend_config)

    # ------------------------------------------------------------------ evidence
    @property
    def scorer(self) -> Any:
        """The evidence scorer (built on first use), or None when this judge reads no evidence."""
        if self._scorer is None:
            with _BUILD_LOCK:
                if self._scorer is None:
                    self._scorer = self._build_scorer() or False
        return self._scorer or None

    def _build_scorer(self) -> Any:
        s = self.settings
        if s.evidence == "off" or s.serve_url:
            return None
        model = s.scorer_model
        if not (model or s.scorer_endpoint):
            from ..models import evidence_scorer_of, resolve_model

            recorded = evidence_scorer_of(resolve_model(s.model)) if s.model else None
            if recorded is None:
                if s.evidence == "on":
                    raise ValueError(f"{s.name}: evidence='on' but the judge records no scorer (no persrm_judge.json "
                                     "with evidence in its checkpoint); set scorer_model or scorer_endpoint")
                return None
            model = recorded
        from ..evidence import build_scorer

        if s.scorer_endpoint:
            return build_scorer(endpoint=s.scorer_endpoint, served_model=s.scorer_served_model,
                                api_key_env=s.api_key_env, timeout=s.timeout)
        return build_scorer(model=model, batch_size=s.scorer_batch_size)

    def measure(self, items: Sequence[Any], deadline: float) -> list[Any] | None:
        """Evidence on each item's two candidates (``EvidenceInput``), measured by ``deadline``; None when this
        judge reads no evidence. Raises :class:`~openrlhf_persrm.evidence.ScorerDeadline` when time runs out."""
        scorer = self.scorer
        if scorer is None or not items:
            return None
        from ..evidence import measure_pairs

        return measure_pairs(scorer, items, deadline=deadline)

    def judge_or_error(self) -> Any:
        """The judge, or the exception building it raised (logged; the next call tries again)."""
        try:
            return self.judge
        except Exception as exc:  # noqa: BLE001 -- a judge that cannot start fails its samples, then the rule
            logger.error("persrm: cannot start the judge backend: %s: %s", type(exc).__name__, exc)
            return exc

    def check_up(self) -> None:
        """Raise :class:`JudgeUnavailable` once the stop rule has declared the judge down."""
        if self.health.stopped:
            raise JudgeUnavailable(self.health.stopped)

    def record(self, samples: int, failed_samples: int, judgments: int, kinds: Any, details: Any) -> None:
        """Feed the stop rule; raise :class:`JudgeUnavailable` when this call trips it."""
        tripped = self.health.record(samples, failed_samples, judgments, kinds, details)
        if tripped:
            raise JudgeUnavailable(tripped)

    # ------------------------------------------------------------------ prompts
    def special_tokens(self, judge: Any) -> tuple[str, ...]:
        """The judge tokenizer's special tokens, neutralised inside every text the judge is shown (the
        injection defence). A judge whose tokens cannot be read cannot be defended: it is stopped."""
        cached = self._special
        if cached is not None and cached[0] is judge:
            return cached[1]
        try:
            tokens = tuple(getattr(judge, "special_tokens", ()) or ())
        except Exception as exc:  # noqa: BLE001 -- named in the error that stops the judge
            raise JudgeUnavailable(
                f"persrm: cannot read the judge tokenizer's special tokens ({type(exc).__name__}: {exc}); they are "
                "neutralised inside candidates so that a policy cannot inject them, so this judge cannot be used "
                "until its tokenizer loads") from None
        self._special = (judge, tokens)
        return tokens

    def messages(self, exemplars: Sequence[str], prompt: str, a: str, b: str,
                 judge: Any = None, evidence: Any = None) -> list[dict[str, str]]:
        """The judge prompt for (A, B), fitted to ``max_prompt_tokens`` (raises :class:`PromptTooLong`);
        ``evidence``: the measures on A and B, in that order, for an evidence-informed judge."""
        judge = self.judge_or_error() if judge is None else judge
        budget = ExemplarBudget(self.settings.max_prompt_tokens, special_tokens=self.special_tokens(judge))
        count = getattr(judge, "count_tokens", None)
        return budget.fit(count or estimated_counter(self.settings.chars_per_token), exemplars, prompt, a, b,
                          evidence).messages

    def text_counter(self, judge: Any) -> Callable[[str], int]:
        count = getattr(judge, "count_text_tokens", None)
        return count if count is not None else self.estimate

    def estimate(self, text: str) -> int:
        return estimate_tokens(text, self.settings.chars_per_token)

    def fit_candidate(self, text: str, count_text: Callable[[str], int]) -> tuple[str, bool]:
        """``text`` cut to ``max_response_chars`` characters and ``max_response_tokens`` judge tokens."""
        s = self.settings
        text, cut = truncate(text, s.max_response_chars)
        try:
            text, cut_tokens = truncate_to_tokens(text, s.max_response_tokens, count_text)
        except Exception as exc:  # noqa: BLE001 -- a tokenizer error: the estimate never undercounts
            self.handled.note("token_count_fallback", f"the judge tokenizer failed to count a candidate "
                              f"({type(exc).__name__}: {exc}); cutting candidates by the token estimate instead")
            text, cut_tokens = truncate_to_tokens(text, s.max_response_tokens, self.estimate)
        return text, cut or cut_tokens

    @contextlib.contextmanager
    def counting_within(self, judge: Any, deadline: float) -> Iterator[None]:
        """Bound the time a backend that counts tokens remotely spends counting (this thread only)."""
        set_deadline = getattr(judge, "counting_deadline", None)
        if not callable(set_deadline):
            yield
            return
        set_deadline(deadline)
        try:
            yield
        finally:
            set_deadline(None)

    # ------------------------------------------------------------------ judging
    def run(self, requests: list[JudgeRequest], deadline: float | None) -> list[str | JudgeError]:
        """The backend's outputs for ``requests``, by ``deadline``; never raises for a backend failure."""
        if not requests:
            return []
        judge = self.judge_or_error()
        if isinstance(judge, Exception):
            return [JudgeUnreachable(f"judge backend unavailable: {type(judge).__name__}: {judge}")] * len(requests)
        try:
            outputs = self._generate_by(judge, requests, deadline)
            if len(outputs) != len(requests):
                raise RuntimeError(f"judge returned {len(outputs)} outputs for {len(requests)} requests")
            return outputs
        except Exception as exc:  # noqa: BLE001 -- a judge that cannot serve fails its samples, not the call
            self.handled.note("backend_raised", f"judge backend {getattr(judge, 'name', '?')} raised "
                              f"{type(exc).__name__}: {exc}; its judgments fail")
            return [JudgeError(f"{type(exc).__name__}: {exc}")] * len(requests)

    def _generate_by(self, judge: Any, requests: list[JudgeRequest], deadline: float | None) -> list[Any]:
        """``judge.generate(requests)`` returning by ``deadline``: a backend that takes ``deadline``
        cancels its own unfinished judgments; any other runs on a helper thread that is abandoned
        (it cannot be cancelled) when the deadline passes."""
        if deadline is None:
            return list(judge.generate(requests))
        if _takes_deadline(judge):
            return list(judge.generate(requests, deadline=deadline))
        box: list[Any] = []

        def call() -> None:
            try:
                box.append(list(judge.generate(requests)))
            except BaseException as exc:  # noqa: BLE001 -- handed to the caller
                box.append(exc)

        worker = threading.Thread(target=call, name="persrm-judge-call", daemon=True)
        worker.start()
        worker.join(max(0.0, deadline - time.monotonic()))
        if not box:
            self.handled.note("backend_abandoned", f"judge backend {getattr(judge, 'name', '?')} takes no deadline "
                              "and missed one; its call is left running on a helper thread")
            return [JudgeDeadline("no judgment before the deadline (the backend cannot be cancelled)")] * len(requests)
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def judge_many(self, prompts: Sequence[list[dict[str, str]]], seeds: Sequence[int] | None = None,
                   deadline: float | None = None) -> list[JudgedPair]:
        """Judge chat prompts in one batch, asking again for unreadable outputs while time is left.

        ``seeds`` (default: ``seed`` for all) seed each prompt's sampling; retries shift them.
        ``deadline`` (``time.monotonic()``; default: ``deadline_s`` from now): judgments not done by
        then are cancelled and fail with kind ``deadline``.
        """
        s = self.settings
        deadline = time.monotonic() + s.deadline_s if deadline is None else deadline
        results: list[JudgedPair | None] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        seeds = list(seeds) if seeds is not None else [s.seed] * len(prompts)
        for attempt in range(s.parse_retries + 1):
            if attempt and time.monotonic() >= deadline:
                break  # the unreadable first answers stand
            temperature = s.temperature if attempt == 0 else max(s.temperature, s.retry_temperature)
            requests = [JudgeRequest(prompts[i], max_new_tokens=s.max_new_tokens, temperature=temperature,
                                     seed=seeds[i] + 7919 * attempt) for i in todo]
            again = []
            for i, out in zip(todo, self.run(requests, deadline)):
                if isinstance(out, JudgeError):  # the backend already retried transport errors
                    results[i] = JudgedPair(None, None, "", "judge_error", str(out), attempt, failure_kind(out))
                    continue
                parsed = parse_judgment(out, require_reasoning=s.require_reasoning)
                if isinstance(parsed, Judgment):
                    results[i] = JudgedPair(parsed.score_a, parsed.score_b, out, None, "", attempt)
                else:
                    results[i] = JudgedPair(None, None, out, parsed.kind.value, parsed.detail, attempt,
                                            parsed.kind.value)
                    again.append(i)
            todo = again
            if not todo:
                break
        return [r for r in results if r is not None]

    def judge_pair(self, exemplars: Sequence[str], prompt: str, response_a: str, response_b: str,
                   deadline: float | None = None) -> JudgedPair:
        """One judgment of (A, B) as shown; never raises for a judge failure (the stop rule aside)."""
        self.check_up()
        deadline = time.monotonic() + self.settings.deadline_s if deadline is None else deadline
        judge = self.judge_or_error()
        try:
            evidence = self.measure([_evidence_input(exemplars, prompt, response_a, response_b)], deadline)
        except Exception as exc:  # noqa: BLE001 -- the scorer's failure fails this judgment, named
            return JudgedPair.failed(*self.evidence_failure(exc))
        try:
            with self.counting_within(judge, time.monotonic() + max(0.0, deadline - time.monotonic()) / 4):
                messages = self.messages(exemplars, prompt, response_a, response_b, judge,
                                         evidence[0] if evidence else None)
        except PromptTooLong as exc:
            return JudgedPair.failed("prompt_too_long", str(exc))
        result = self.judge_many([messages], deadline=deadline)[0]
        failed = int(not result.ok)
        self.record(1, failed, 1, {result.kind: 1} if failed else {}, {result.kind: result.detail} if failed else {})
        return result

    def evidence_failure(self, exc: Exception) -> tuple[str, str]:
        """``(kind, detail)`` of a judgment that could not get its evidence (counted and logged once)."""
        from ..evidence import ScorerDeadline

        if isinstance(exc, ScorerDeadline):
            return "deadline", f"the evidence was not measured before the deadline ({exc})"
        self.handled.note("evidence_error", f"the evidence scorer failed ({type(exc).__name__}: {exc}); the samples "
                          "it was measuring score failure_reward")
        return "evidence_error", f"{type(exc).__name__}: {exc}"

    def probe(self, timeout: float | None = None) -> JudgedPair:
        """Judge one small pair now; raise :class:`JudgeUnavailable` naming the cause when the judge
        cannot answer (cannot start, refuses the key, is unreachable, hangs, has unreadable special
        tokens). An answer the parser cannot read passes (the judge is up) and is logged."""
        s = self.settings
        deadline = time.monotonic() + (timeout if timeout is not None else max(s.deadline_s, 30.0))
        judge = self.judge_or_error()
        if isinstance(judge, Exception):
            raise JudgeUnavailable(f"persrm: the judge backend cannot start: {type(judge).__name__}: {judge}")
        try:
            evidence = self.measure([_evidence_input(*PROBE_PAIR)], deadline)
        except Exception as exc:  # noqa: BLE001 -- named in the error that stops the run
            raise JudgeUnavailable(f"persrm: the evidence scorer failed its start-up probe: {type(exc).__name__}: "
                                   f"{exc}") from None
        try:
            with self.counting_within(judge, deadline):
                messages = self.messages(*PROBE_PAIR, judge=judge, evidence=evidence[0] if evidence else None)
        except PromptTooLong as exc:
            raise JudgeUnavailable(f"persrm: max_prompt_tokens={s.max_prompt_tokens} cannot hold even a "
                                   f"tiny judgment: {exc}") from None
        request = JudgeRequest(messages, max_new_tokens=min(s.max_new_tokens, 16), temperature=0.0, seed=s.seed)
        [out] = self.run([request], deadline)
        if isinstance(out, JudgeError):
            raise JudgeUnavailable(f"persrm: the judge ({getattr(judge, 'name', '?')}) failed its start-up probe "
                                   f"({failure_kind(out)}): {out}")
        logger.info("persrm: judge %s answered the start-up probe", getattr(judge, "name", "?"))
        return JudgedPair(None, None, out, None)


def _evidence_input(exemplars: Sequence[str], prompt: str, first: str, second: str) -> Any:
    from ..evidence import EvidenceInput

    return EvidenceInput(tuple(exemplars), prompt, first, second)


@dataclass
class JudgingPlugin(JudgeSettings):
    """Judge settings plus this process's :class:`JudgeRunner`: what the ``persrm`` reward and
    ``persrm_group`` are built on. Pickles without the runner (Ray ships the plugin; a worker
    builds its own backend from a name, and keeps its own health)."""

    _runner: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._runner = JudgeRunner(self)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runner"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._runner = JudgeRunner(self)

    @property
    def runner(self) -> JudgeRunner:
        return self._runner

    @property
    def judge(self) -> Any:
        """The judge backend, built on first use (none with ``serve_url``)."""
        return self._runner.judge

    @property
    def health(self) -> JudgeHealth:
        """Failure counts, recent failure rate and the stop rule's state."""
        return self._runner.health
