"""``persrm``: a trained PersRM as the generative reward of policy RLHF.

Each prompt's label carries the user's exemplars and a reference response (the user's own
text, or an SFT policy's answer)::

    {"exemplars": ["...", "..."], "reference": "...", "prompt": "the request shown to the judge"}

(``prompt`` is optional; without it the judge sees OpenRLHF's prompt text.) For each policy
sample PersRM judges (sample, reference) in both A/B orders, ``votes`` times per order, and
the reward is, in ``[-1, 1]``:

``score_diff``
    the mean of ``(s - r) / 9`` (``s``, ``r``: the sample's and the reference's 1-10 scores);
``win_rate``
    the mean of +1 (the sample scores higher), 0 (tie), -1 (lower);
``pointwise``
    the mean of ``(s - 5.5) / 4.5``: the sample's own score, the reference only as an anchor.

Each order is averaged first and the two orders weigh the same, so the judge's position bias
cancels. ``scores`` (OpenRLHF's dynamic filtering) are ``(reward + 1) / 2``.

Deadline: a call returns within ``deadline_s`` (default 90 s, well inside OpenRLHF's 180 s HTTP
client timeout): judgments not finished by then are cancelled in the backend and their samples
get ``failure_reward``. Retries of unreadable judgments only use the time left.

Failures never pay: a sample without a readable judgment in both orders (judge error, timeout,
unreadable output, bad label or input, a prompt that cannot fit) gets ``failure_reward``,
by default -1.0, the worst judged score, so a policy cannot earn more by breaking the judge
than by an honest loss. Each failure is counted by kind in ``extra_logs`` (``judge_fail_<kind>``)
and logged once per kind with counts.

Stop rule: when more than ``stop_failure_rate`` of the samples fail for ``stop_after_steps``
windows of ``stop_window`` samples in a row, the judge is declared down and every later call
raises :class:`~openrlhf_persrm.judges.faults.JudgeUnavailable` naming the cause (OpenRLHF then
stops the run; ``persrm serve`` answers 503). :meth:`PersRMReward.probe` contacts the judge
once and raises the same error when it cannot serve; ``persrm serve`` and the entry file call
it at start-up (``probe_on_start``).

Robustness: the policy's response (and the reference) are cut to ``max_response_chars``
characters and ``max_response_tokens`` judge tokens before judging (counted in
``candidate_truncated``); the judge prompt is fitted to ``max_prompt_tokens`` (counted with the
judge's tokenizer when the backend can, else an estimate that does not undercount) by dropping
exemplars; an unreadable judgment is asked again (with sampling) up to ``parse_retries`` times.
Candidate text cannot steer the verdict through the prompt or the parser: our tags and every
chat-template special token inside it (and inside exemplars and prompt) are neutralised
(:func:`~openrlhf_persrm.judge_format.defang`), the judge is shown the request without the
policy's chat template (:func:`~openrlhf_persrm.judge_format.strip_chat_template`), and only the
judge's own final answer is read (:func:`~openrlhf_persrm.judge_format.parse_judgment`).

The judge backend is built on first use (the plugin pickles: Ray ships it to workers):
``endpoint`` -> the ``openai`` backend (``vllm serve`` of a trained PersRM), ``model`` -> the
``local`` backend, or ``backend`` -> any registered judge backend with ``backend_config``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

from ..contracts import JudgeError, JudgeRequest, RewardOutput
from ..judge_format import (SCORE_MAX, SCORE_MIN, ExemplarBudget, FailureKind, Judgment, PromptTooLong,
                            estimate_tokens, estimated_counter, parse_judgment, strip_chat_template,
                            truncate_to_tokens)
from ..judges.faults import ERROR_KINDS, JudgeDeadline, JudgeUnavailable, failure_kind
from .judge_health import JudgeHealth
from .labels import END_MARKERS, LabelError, clean_response, has_lone_surrogate, label_object, split_response

__all__ = ["PersRMReward", "JudgedPair", "JudgeUnavailable", "EXTRA_LOG_KEYS", "FAILURE_KINDS", "END_MARKERS",
           "clean_response", "truncate", "judgment_value", "parse_persrm_label"]

logger = logging.getLogger(__name__)

MODES = ("score_diff", "win_rate", "pointwise")

#: Why a judgment or a sample failed: backend errors, parser failures, and per-sample causes.
FAILURE_KINDS = (*ERROR_KINDS, *(k.value for k in FailureKind), "prompt_too_long", "bad_label", "bad_input")

#: Logged for every sample (OpenRLHF averages each over the batch). ``judge_fail_<kind>`` counts
#: the sample's failed judgments (or 1 for a per-sample cause) by kind.
EXTRA_LOG_KEYS = ("judge_failed", "judge_errors", "judge_unparseable", "judge_retries", "candidate_truncated",
                  "bad_label", "prompt_too_long", "sample_score", "reference_score", "position_consistent",
                  *(f"judge_fail_{k}" for k in FAILURE_KINDS))

_BUILD_LOCK = threading.Lock()
_SPAN = SCORE_MAX - SCORE_MIN
# Settings that only the server's own reward uses: with serve_url they would be silently ignored here.
_CLIENT_SIDE = {"serve_url", "probe_on_start"}
# The probe: one small judgment the judge can always take.
_PROBE = (["I write short plain sentences."], "Say hello.", "Hello.", "Hi there, friend!")


def parse_persrm_label(label: Any) -> tuple[list[str], str, str | None]:
    """``(exemplars, reference, prompt or None)`` from a label dict or its JSON text.

    >>> parse_persrm_label({"exemplars": ["I write tersely."], "reference": "Fine."})
    (['I write tersely.'], 'Fine.', None)
    """
    label = label_object(label, "'exemplars' and 'reference'")
    exemplars = label.get("exemplars")
    if (not isinstance(exemplars, list) or not exemplars
            or not all(isinstance(e, str) and e.strip() for e in exemplars)):
        raise LabelError("label field 'exemplars' must be a non-empty list of non-empty strings")
    reference = label.get("reference")
    if not isinstance(reference, str) or not reference.strip():
        raise LabelError("label field 'reference' must be a non-empty string")
    prompt = label.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise LabelError(f"label field 'prompt' must be a string, got {type(prompt).__name__}")
    return exemplars, reference, prompt


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
    raise ValueError(f"mode={mode!r}; use one of {MODES}")


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


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


@dataclass
class PersRMReward:
    """Generative reward from a PersRM judge (see the module docstring).

    Args:
        endpoint: URL of an OpenAI-compatible server with the judge (``vllm serve``), e.g.
            ``http://127.0.0.1:8000``; selects the ``openai`` backend.
        served_model: the model name on that server (default: the first it lists).
        api_key_env: environment variable with the server's API key, if it needs one.
        api_key_file: a file with that key instead (never put keys in configs or argv).
        model: a local judge checkpoint; selects the ``local`` backend (CPU, batched).
        serve_url: a running ``persrm serve`` (comma-separated for several): the launcher wrapper
            then points OpenRLHF's own HTTP reward client (``--reward.remote_url``) at its
            ``/get_reward``, and the judging happens in that server, not in the rollout actors.
            Judging settings (``mode``, ``votes``, ...) then belong to the server and are refused here.
        backend: a judge backend name from the registry, a dotted path or file, or an instance.
        backend_config: keyword arguments for the backend (overrides the ones derived above).
        mode: ``score_diff``, ``win_rate`` or ``pointwise``.
        votes: judgments per A/B order (test-time voting); above 1 needs ``temperature`` > 0.
        temperature: judge sampling temperature (0: greedy).
        max_new_tokens: tokens the judge may write (reasoning + answer).
        max_response_chars: the policy response and the reference are cut to this many characters.
        max_response_tokens: ... and to this many tokens of the judge (emoji and rare scripts take
            several tokens a character).
        max_prompt_tokens: judge prompt budget; exemplars are dropped to fit.
        chars_per_token: ASCII characters per token where the backend cannot count tokens (other
            characters count one token per UTF-8 byte, never fewer than a real tokenizer needs).
        parse_retries: extra attempts, sampled at ``retry_temperature``, for unreadable judgments.
        retry_temperature: temperature of those attempts (at least ``temperature``).
        failure_reward: reward of a sample the judge could not score (failure, bad label or input);
            default -1.0, the worst judged reward, so failing never pays more than losing.
        neutral_reward: the former name of ``failure_reward`` (still accepted).
        require_reasoning: demand ``<think>...</think>`` before the answer.
        deadline_s: a reward call returns within this many seconds; unfinished judgments are
            cancelled and their samples get ``failure_reward`` (keep it under OpenRLHF's 180 s).
        timeout: seconds per judge request attempt (passed to the built-in backends).
        stop_failure_rate, stop_after_steps, stop_window: the stop rule: more than
            ``stop_failure_rate`` of the samples failing in ``stop_after_steps`` consecutive windows
            of ``stop_window`` samples declares the judge down (0 steps: never).
        probe_on_start: ``persrm serve`` and the entry file judge one probe pair before training and
            stop when the judge cannot answer.
        seed: base seed of the judge's sampling (vote ``i`` uses ``seed + i``).
    """

    name: ClassVar[str] = "persrm"

    endpoint: str = ""
    served_model: str = ""
    api_key_env: str = "PERSRM_JUDGE_API_KEY"
    api_key_file: str = ""
    model: str = ""
    serve_url: str = ""
    backend: Any = ""
    backend_config: dict = field(default_factory=dict)
    mode: str = "score_diff"
    votes: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 512
    max_response_chars: int = 4000
    max_response_tokens: int = 1024
    max_prompt_tokens: int = 4096
    chars_per_token: float = 3.0
    parse_retries: int = 1
    retry_temperature: float = 0.7
    failure_reward: float = -1.0
    neutral_reward: float | None = None
    require_reasoning: bool = True
    deadline_s: float = 90.0
    timeout: float = 60.0
    stop_failure_rate: float = 0.5
    stop_after_steps: int = 3
    stop_window: int = 64
    probe_on_start: bool = True
    seed: int = 0
    _judge: Any = field(default=None, init=False, repr=False, compare=False)
    _health: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sources = [k for k in ("endpoint", "model", "serve_url", "backend") if getattr(self, k)]
        if len(sources) != 1:
            raise ValueError(
                f"persrm: set exactly one judge source, got {sources or 'none'}: endpoint (a served PersRM, e.g. "
                "'http://127.0.0.1:8000'), model (a local checkpoint), serve_url (a running `persrm serve`) "
                "or backend (a judge backend name)")
        if self.serve_url:
            self._refuse_server_side_settings()
        if self.mode not in MODES:
            raise ValueError(f"persrm: mode={self.mode!r}; use one of {', '.join(MODES)}")
        if self.votes < 1:
            raise ValueError(f"persrm: votes={self.votes}; use 1 or more judgments per order")
        if self.votes > 1 and self.temperature <= 0:
            raise ValueError(f"persrm: votes={self.votes} with temperature={self.temperature} repeats one greedy "
                             "judgment; set temperature > 0 (e.g. 0.7) or votes=1")
        for key in ("max_new_tokens", "max_response_chars", "max_response_tokens", "max_prompt_tokens",
                    "stop_window"):
            if getattr(self, key) < 1:
                raise ValueError(f"persrm: {key}={getattr(self, key)}; must be positive")
        if self.parse_retries < 0 or self.stop_after_steps < 0:
            raise ValueError(f"persrm: parse_retries={self.parse_retries}, stop_after_steps={self.stop_after_steps}; "
                             "use 0 or more")
        for key in ("deadline_s", "timeout", "chars_per_token"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"persrm: {key}={value!r}; use a positive number")
        if not 0 <= self.stop_failure_rate < 1:
            raise ValueError(f"persrm: stop_failure_rate={self.stop_failure_rate}; use a share in [0, 1)")
        if self.neutral_reward is not None:
            self._check_reward("neutral_reward", self.neutral_reward)
            self.failure_reward = self.neutral_reward
        self._check_reward("failure_reward", self.failure_reward)
        self.neutral_reward = self.failure_reward  # the former name reads the same value
        if not isinstance(self.backend_config, dict):
            raise ValueError(f"persrm: backend_config must be a JSON object, got {self.backend_config!r}")
        if self.model:
            from ..models import SMOLLM2

            if self.model.lower() not in (SMOLLM2, "smollm2") and not os.path.exists(self.model):
                raise ValueError(f"persrm: model={self.model!r} is not a local checkpoint folder (nothing is "
                                 "downloaded); for a served judge set endpoint instead")
        if not isinstance(self.backend, str):
            self._judge = self.backend  # an instance given in Python
        self._health = JudgeHealth(self.stop_failure_rate, self.stop_after_steps, self.stop_window)

    @staticmethod
    def _check_reward(key: str, value: Any) -> None:
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and -1 <= value <= 1):
            raise ValueError(f"persrm: {key}={value!r}; use a number in [-1, 1] (-1, the worst judged reward, "
                             "keeps failures from paying more than an honest loss)")

    def _refuse_server_side_settings(self) -> None:
        ignored = [f.name for f in dataclasses.fields(self)
                   if f.init and f.name not in _CLIENT_SIDE
                   and getattr(self, f.name) != (f.default_factory() if f.default_factory is not dataclasses.MISSING
                                                 else f.default)]
        if ignored:
            shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in ignored)
            flags = " ".join(f"--reward.{k} ..." for k in ignored)
            raise ValueError(f"persrm: with serve_url the judging happens in `persrm serve`, which would ignore "
                             f"{shown} set here; give them to the server instead (persrm serve {flags}) and keep "
                             "only serve_url in this config")

    @classmethod
    def remote_reward_urls(cls, config: dict[str, Any]) -> list[str] | None:
        """Where OpenRLHF should POST for rewards instead of loading this plugin (``serve_url``)."""
        urls = [u.strip().rstrip("/") for u in str(config.get("serve_url", "")).split(",") if u.strip()]
        return [u if u.endswith("/get_reward") else u + "/get_reward" for u in urls] or None

    # ------------------------------------------------------------------ pickling (Ray)
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if isinstance(self.backend, str):
            state["_judge"] = None  # rebuilt on first use in the worker
        return state

    # ------------------------------------------------------------------ the judge
    @property
    def judge(self) -> Any:
        """The judge backend, built on first use."""
        if self._judge is None:
            with _BUILD_LOCK:
                if self._judge is None:
                    self._judge = self._build_judge()
        return self._judge

    @property
    def health(self) -> JudgeHealth:
        """Failure counts, recent failure rate and the stop rule's state."""
        return self._health

    def _build_judge(self) -> Any:
        if self.serve_url:
            raise ValueError("persrm: with serve_url the judging happens in `persrm serve`; run through "
                             "openrlhf_persrm.cli.train_ppo_ray, which points --reward.remote_url at it")
        if self.endpoint:
            from ..judges.openai_backend import OpenAIJudge

            config = {"base_url": self.endpoint, "model": self.served_model, "api_key_env": self.api_key_env,
                      "api_key_file": self.api_key_file, "timeout": self.timeout,
                      "chars_per_token": self.chars_per_token, **self.backend_config}
            return OpenAIJudge(**config)
        if self.model:
            from ..judges.local import LocalJudge
            from ..models import resolve_model

            return LocalJudge(**{"model_path": resolve_model(self.model), "timeout": self.timeout,
                                 **self.backend_config})
        from ..registry import instantiate, judge_backends

        return instantiate(judge_backends, self.backend, self.backend_config)

    def _judge_or_error(self) -> Any:
        """The judge, or the exception building it raised (logged; the next call tries again)."""
        try:
            return self.judge
        except Exception as exc:  # noqa: BLE001 -- a judge that cannot start fails its samples, then the rule
            logger.error("persrm: cannot start the judge backend: %s: %s", type(exc).__name__, exc)
            return exc

    def _counter(self, judge: Any) -> Any:
        count = getattr(judge, "count_tokens", None)
        return count if count is not None else estimated_counter(self.chars_per_token)

    def _text_counter(self, judge: Any) -> Any:
        count = getattr(judge, "count_text_tokens", None)
        return count if count is not None else (lambda text: estimate_tokens(text, self.chars_per_token))

    @staticmethod
    def _special_tokens(judge: Any) -> tuple[str, ...]:
        try:
            return tuple(getattr(judge, "special_tokens", ()) or ())
        except Exception:  # noqa: BLE001 -- the common chat markers are neutralised anyway
            return ()

    # ------------------------------------------------------------------ judging
    def _messages(self, exemplars: Sequence[str], prompt: str, a: str, b: str,
                  judge: Any = None) -> list[dict[str, str]]:
        judge = self._judge_or_error() if judge is None else judge
        budget = ExemplarBudget(self.max_prompt_tokens, special_tokens=self._special_tokens(judge))
        return budget.fit(self._counter(judge), exemplars, prompt, a, b).messages

    def _run(self, requests: list[JudgeRequest], deadline: float | None) -> list[str | JudgeError]:
        if not requests:
            return []
        judge = self._judge_or_error()
        if isinstance(judge, Exception):
            from ..judges.faults import JudgeUnreachable

            return [JudgeUnreachable(f"judge backend unavailable: {type(judge).__name__}: {judge}")] * len(requests)
        try:
            outputs = _generate_by(judge, requests, deadline)
            if len(outputs) != len(requests):
                raise RuntimeError(f"judge returned {len(outputs)} outputs for {len(requests)} requests")
            return outputs
        except Exception as exc:  # noqa: BLE001 -- a judge that cannot serve fails its samples, not the call
            logger.debug("persrm: judge backend %s failed: %s: %s", getattr(judge, "name", "?"),
                         type(exc).__name__, exc)
            return [JudgeError(f"{type(exc).__name__}: {exc}")] * len(requests)

    def judge_many(self, prompts: Sequence[list[dict[str, str]]], seeds: Sequence[int] | None = None,
                   deadline: float | None = None) -> list[JudgedPair]:
        """Judge chat prompts in one batch, asking again for unreadable outputs while time is left.

        ``seeds`` (default: ``seed`` for all) seed each prompt's sampling; retries shift them.
        ``deadline`` (``time.monotonic()``; default: ``deadline_s`` from now): judgments not done by
        then are cancelled and fail with kind ``deadline``.
        """
        deadline = time.monotonic() + self.deadline_s if deadline is None else deadline
        results: list[JudgedPair | None] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        seeds = list(seeds) if seeds is not None else [self.seed] * len(prompts)
        for attempt in range(self.parse_retries + 1):
            if attempt and time.monotonic() >= deadline:
                break  # the unreadable first answers stand
            temperature = self.temperature if attempt == 0 else max(self.temperature, self.retry_temperature)
            requests = [JudgeRequest(prompts[i], max_new_tokens=self.max_new_tokens, temperature=temperature,
                                     seed=seeds[i] + 7919 * attempt) for i in todo]
            again = []
            for i, out in zip(todo, self._run(requests, deadline)):
                if isinstance(out, JudgeError):  # the backend already retried transport errors
                    results[i] = JudgedPair(None, None, "", "judge_error", str(out), attempt, failure_kind(out))
                    continue
                parsed = parse_judgment(out, require_reasoning=self.require_reasoning)
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
        """One judgment of (A, B) as shown, for ``POST /judge``; never raises for a judge failure."""
        if self._health.stopped:
            raise JudgeUnavailable(self._health.stopped)
        deadline = time.monotonic() + self.deadline_s if deadline is None else deadline
        judge = self._judge_or_error()
        try:
            with _counting_within(judge, time.monotonic() + self.deadline_s / 4):
                messages = self._messages(exemplars, prompt, response_a, response_b, judge)
        except PromptTooLong as exc:
            return JudgedPair(None, None, "", "prompt_too_long", str(exc), kind="prompt_too_long")
        result = self.judge_many([messages], deadline=deadline)[0]
        failed = int(not result.ok)
        self._health.record(1, failed, 1, {result.kind: 1} if failed else {}, {result.kind: result.detail}
                            if failed else {})
        return result

    def probe(self, timeout: float | None = None) -> JudgedPair:
        """Judge one small pair now; raise :class:`JudgeUnavailable` naming the cause when the judge
        cannot answer (cannot start, refuses the key, is unreachable, hangs). An answer the parser
        cannot read passes (the judge is up) and is logged."""
        deadline = time.monotonic() + (timeout if timeout is not None else max(self.deadline_s, 30.0))
        judge = self._judge_or_error()
        if isinstance(judge, Exception):
            raise JudgeUnavailable(f"persrm: the judge backend cannot start: {type(judge).__name__}: {judge}")
        try:
            with _counting_within(judge, deadline):
                messages = self._messages(*_PROBE, judge=judge)
        except PromptTooLong as exc:
            raise JudgeUnavailable(f"persrm: max_prompt_tokens={self.max_prompt_tokens} cannot hold even a "
                                   f"tiny judgment: {exc}") from None
        request = JudgeRequest(messages, max_new_tokens=min(self.max_new_tokens, 16), temperature=0.0, seed=self.seed)
        [out] = self._run([request], deadline)
        if isinstance(out, JudgeError):
            raise JudgeUnavailable(f"persrm: the judge ({getattr(judge, 'name', '?')}) failed its start-up probe "
                                   f"({failure_kind(out)}): {out}")
        logger.info("persrm: judge %s answered the start-up probe", getattr(judge, "name", "?"))
        return JudgedPair(None, None, out, None)

    # ------------------------------------------------------------------ the reward
    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any],
                 **kwargs: Any) -> RewardOutput:
        if self._health.stopped:
            raise JudgeUnavailable(self._health.stopped)
        # ``deadline`` (time.monotonic()): a caller that received the request earlier (persrm serve) says when
        # the answer is due; the judging gets what is left of it
        given = kwargs.get("deadline")
        deadline = given if isinstance(given, (int, float)) else time.monotonic() + self.deadline_s
        n = len(queries)
        logs = [dict.fromkeys(EXTRA_LOG_KEYS, 0.0) for _ in range(n)]
        rewards = [float(self.failure_reward)] * n
        kinds: Counter = Counter()
        details: dict[str, str] = {}

        def fail(i: int, kind: str, detail: str) -> None:
            logs[i]["judge_failed"] = 1.0
            logs[i][f"judge_fail_{kind}"] += 1.0
            kinds[kind] += 1
            details.setdefault(kind, detail)

        judge = self._judge_or_error()
        # counting tokens (an HTTP call for a served judge) may use a quarter of the time; then estimates
        with _counting_within(judge, time.monotonic() + max(0.0, deadline - time.monotonic()) / 4):
            asked, judge_prompts, seeds = self._prepare(queries, prompts, labels, judge, logs, fail)
        judged = self.judge_many(judge_prompts, seeds, deadline) if judge_prompts else []
        return self._aggregate(n, asked, judged, logs, rewards, kinds, details)

    def _prepare(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], judge: Any,
                 logs: list[dict[str, float]], fail: Any) -> tuple[list, list, list]:
        """The judgments to ask for: (sample, order) pairs, their chat prompts and seeds."""
        count_text = self._text_counter(judge)
        # (sample index, order) for every judgment asked; order 0: sample shown as A.
        asked: list[tuple[int, int]] = []
        judge_prompts: list[list[dict[str, str]]] = []
        seeds: list[int] = []
        for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
            if has_lone_surrogate(query) or has_lone_surrogate(prompt) or has_lone_surrogate(label):
                fail(i, "bad_input", "text with a lone surrogate (not UTF-8)")
                continue
            try:
                exemplars, reference, shown_prompt = parse_persrm_label(label)
            except LabelError as exc:
                logs[i]["bad_label"] = 1.0
                fail(i, "bad_label", str(exc))
                continue
            response, cut = self._fit_candidate(clean_response(split_response(query, prompt)), count_text)
            reference, _ = self._fit_candidate(reference, count_text)
            if cut:
                logs[i]["candidate_truncated"] = 1.0
            # the judge sees the request, never the policy's chat template
            shown = shown_prompt if shown_prompt is not None else strip_chat_template(prompt)
            try:
                both = [self._messages(exemplars, shown, response, reference, judge),
                        self._messages(exemplars, shown, reference, response, judge)]
            except PromptTooLong as exc:
                logs[i]["prompt_too_long"] = 1.0
                fail(i, "prompt_too_long", str(exc))
                continue
            for order, messages in enumerate(both):
                for vote in range(self.votes):  # votes of one order differ by their seed only
                    asked.append((i, order))
                    judge_prompts.append(messages)
                    seeds.append(self.seed + vote)
        return asked, judge_prompts, seeds

    def _aggregate(self, n: int, asked: list, judged: list, logs: list[dict[str, float]], rewards: list[float],
                   kinds: Counter, details: dict[str, str]) -> RewardOutput:
        per_sample: dict[int, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {}
        failed_kinds: dict[int, Counter] = {}
        for (i, order), result in zip(asked, judged):
            pairs = per_sample.setdefault(i, ([], []))
            logs[i]["judge_retries"] += result.retries
            if result.ok:
                sample, ref = (result.score_a, result.score_b) if order == 0 else (result.score_b, result.score_a)
                pairs[order].append((sample, ref))
                continue
            kind = result.kind or result.failure or "judge_error"
            logs[i]["judge_errors" if result.failure == "judge_error" else "judge_unparseable"] += 1
            logs[i][f"judge_fail_{kind}"] += 1
            failed_kinds.setdefault(i, Counter())[kind] += 1
            details.setdefault(kind, result.detail)
        judge_failures = 0
        for i, (first, second) in per_sample.items():
            if not first or not second:  # one order alone would carry the judge's position bias
                logs[i]["judge_failed"] = 1.0
                judge_failures += 1
                kinds.update(failed_kinds.get(i, {}))
                continue
            values = [sum(judgment_value(self.mode, s, r) for s, r in order) / len(order) for order in (first, second)]
            rewards[i] = max(-1.0, min(1.0, sum(values) / 2))
            both = first + second
            logs[i]["sample_score"] = sum(s for s, _ in both) / len(both)
            logs[i]["reference_score"] = sum(r for _, r in both) / len(both)
            # an order's vote is its net preference; a net-zero order prefers neither
            signs = [_sign(sum(s - r for s, r in order)) for order in (first, second)]
            logs[i]["position_consistent"] = float(signs[0] == signs[1])
        # the stop rule watches the judge: samples it was asked about, and its failures only
        tripped = self._health.record(len(per_sample), judge_failures, len(judged), kinds, details)
        if tripped:
            raise JudgeUnavailable(tripped)
        scores = [(r + 1) / 2 for r in rewards]
        return RewardOutput(rewards, scores, {k: [log[k] for log in logs] for k in EXTRA_LOG_KEYS})

    def _fit_candidate(self, text: str, count_text: Any) -> tuple[str, bool]:
        text, cut = truncate(text, self.max_response_chars)
        try:
            text, cut_tokens = truncate_to_tokens(text, self.max_response_tokens, count_text)
        except Exception:  # noqa: BLE001 -- a tokenizer error: fall back to the estimate
            text, cut_tokens = truncate_to_tokens(text, self.max_response_tokens,
                                                  lambda t: estimate_tokens(t, self.chars_per_token))
        return text, cut or cut_tokens


@contextlib.contextmanager
def _counting_within(judge: Any, deadline: float) -> Iterator[None]:
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


_DEADLINE_AWARE: dict[type, bool] = {}


def _accepts_deadline(judge: Any) -> bool:
    kind = type(judge)
    if kind not in _DEADLINE_AWARE:
        try:
            params = inspect.signature(judge.generate).parameters
            _DEADLINE_AWARE[kind] = "deadline" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            _DEADLINE_AWARE[kind] = False
    return _DEADLINE_AWARE[kind]


def _generate_by(judge: Any, requests: list[JudgeRequest], deadline: float | None) -> list[Any]:
    """``judge.generate(requests)`` returning by ``deadline``: a backend that takes ``deadline``
    cancels its own unfinished judgments; any other runs on a helper thread that is abandoned
    (it cannot be cancelled) when the deadline passes."""
    if deadline is None:
        return list(judge.generate(requests))
    if _accepts_deadline(judge):
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
        logger.debug("persrm: backend %s missed the deadline; its call is abandoned",
                     getattr(judge, "name", "?"))
        return [JudgeDeadline("no judgment before the deadline (the backend cannot be cancelled)")] * len(requests)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]
