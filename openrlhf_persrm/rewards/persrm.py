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

Robustness: the policy's response (and the reference) are cut to ``max_response_chars``
before judging (counted in ``truncated``); the judge prompt is fitted to
``max_prompt_tokens`` by dropping exemplars; an unreadable judgment is asked again (with
sampling) up to ``parse_retries`` times. A sample that still lacks a readable judgment in
either order gets ``neutral_reward`` and is counted in ``judge_failed``; the plugin never
raises. Candidate text cannot steer the verdict through the prompt or the parser: our tags
inside it are defanged (:func:`~openrlhf_persrm.judge_format.defang`) and only the judge's
own final answer is read (:func:`~openrlhf_persrm.judge_format.parse_judgment`).

The judge backend is built on first use (the plugin pickles: Ray ships it to workers):
``endpoint`` -> the ``openai`` backend (``vllm serve`` of a trained PersRM), ``model`` -> the
``local`` backend, or ``backend`` -> any registered judge backend with ``backend_config``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from ..contracts import JudgeError, JudgeRequest, RewardOutput
from ..judge_format import SCORE_MAX, SCORE_MIN, ExemplarBudget, Judgment, PromptTooLong, parse_judgment
from .labels import LabelError, label_object, split_response

logger = logging.getLogger(__name__)

MODES = ("score_diff", "win_rate", "pointwise")

#: Logged for every sample (OpenRLHF averages each over the batch).
EXTRA_LOG_KEYS = ("judge_failed", "judge_errors", "judge_unparseable", "judge_retries", "truncated", "bad_label",
                  "prompt_too_long", "sample_score", "reference_score", "position_consistent")

#: End-of-turn markers OpenRLHF leaves at the end of a response (it decodes special tokens).
END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>", "<pad>",
               "<|finetune_right_pad_id|>")

_BUILD_LOCK = threading.Lock()
# OpenRLHF calls the reward once per sample: log the first failures, then every 100th.
_FAILURES = itertools.count()
_SPAN = SCORE_MAX - SCORE_MIN


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


def clean_response(text: str, markers: Sequence[str] = END_MARKERS) -> str:
    """The response without trailing end-of-turn markers and whitespace.

    >>> clean_response("Sure thing.<|im_end|><pad><pad>")
    'Sure thing.'
    """
    text = text.rstrip()
    changed = True
    while changed:
        changed = False
        for marker in markers:
            if marker and text.endswith(marker):
                text = text[: -len(marker)].rstrip()
                changed = True
    return text


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


@dataclass
class JudgedPair:
    """The outcome of judging one pair: scores in the positions shown, or why there are none."""

    score_a: int | None
    score_b: int | None
    text: str
    failure: str | None  # "judge_error", a parser FailureKind value, or "prompt_too_long"
    detail: str = ""
    retries: int = 0

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
        model: a local judge checkpoint; selects the ``local`` backend (CPU, batched).
        serve_url: a running ``persrm serve`` (comma-separated for several): the launcher wrapper
            then points OpenRLHF's own HTTP reward client (``--reward.remote_url``) at its
            ``/get_reward``, and the judging happens in that server, not in the rollout actors.
        backend: a judge backend name from the registry, a dotted path or file, or an instance.
        backend_config: keyword arguments for the backend (overrides the ones derived above).
        mode: ``score_diff``, ``win_rate`` or ``pointwise``.
        votes: judgments per A/B order (test-time voting); above 1 needs ``temperature`` > 0.
        temperature: judge sampling temperature (0: greedy).
        max_new_tokens: tokens the judge may write (reasoning + answer).
        max_response_chars: the policy response and the reference are cut to this many characters.
        max_prompt_tokens: judge prompt budget; exemplars are dropped to fit.
        chars_per_token: token estimate when the backend cannot count tokens (remote judges).
        parse_retries: extra attempts, sampled at ``retry_temperature``, for unreadable judgments.
        retry_temperature: temperature of those attempts (at least ``temperature``).
        neutral_reward: reward of a sample the judge could not score (failure, bad label).
        require_reasoning: demand ``<think>...</think>`` before the answer.
        timeout: seconds per judge request (passed to the built-in backends).
        seed: base seed of the judge's sampling (vote ``i`` uses ``seed + i``).
    """

    name: ClassVar[str] = "persrm"

    endpoint: str = ""
    served_model: str = ""
    api_key_env: str = "PERSRM_JUDGE_API_KEY"
    model: str = ""
    serve_url: str = ""
    backend: Any = ""
    backend_config: dict = field(default_factory=dict)
    mode: str = "score_diff"
    votes: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 512
    max_response_chars: int = 4000
    max_prompt_tokens: int = 4096
    chars_per_token: float = 3.0
    parse_retries: int = 1
    retry_temperature: float = 0.7
    neutral_reward: float = 0.0
    require_reasoning: bool = True
    timeout: float = 120.0
    seed: int = 0
    _judge: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sources = [k for k in ("endpoint", "model", "serve_url", "backend") if getattr(self, k)]
        if len(sources) != 1:
            raise ValueError(
                f"persrm: set exactly one judge source, got {sources or 'none'}: endpoint (a served PersRM, e.g. "
                "'http://127.0.0.1:8000'), model (a local checkpoint), serve_url (a running `persrm serve`) "
                "or backend (a judge backend name)")
        if self.mode not in MODES:
            raise ValueError(f"persrm: mode={self.mode!r}; use one of {', '.join(MODES)}")
        if self.votes < 1:
            raise ValueError(f"persrm: votes={self.votes}; use 1 or more judgments per order")
        if self.votes > 1 and self.temperature <= 0:
            raise ValueError(f"persrm: votes={self.votes} with temperature={self.temperature} repeats one greedy "
                             "judgment; set temperature > 0 (e.g. 0.7) or votes=1")
        for key in ("max_new_tokens", "max_response_chars", "max_prompt_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"persrm: {key}={getattr(self, key)}; must be positive")
        if self.parse_retries < 0:
            raise ValueError(f"persrm: parse_retries={self.parse_retries}; use 0 or more")
        if not (isinstance(self.neutral_reward, (int, float)) and math.isfinite(self.neutral_reward)
                and -1 <= self.neutral_reward <= 1):
            raise ValueError(f"persrm: neutral_reward={self.neutral_reward!r}; use a number in [-1, 1]")
        if not isinstance(self.backend_config, dict):
            raise ValueError(f"persrm: backend_config must be a JSON object, got {self.backend_config!r}")
        if self.model:
            from ..models import SMOLLM2

            if self.model.lower() not in (SMOLLM2, "smollm2") and not os.path.exists(self.model):
                raise ValueError(f"persrm: model={self.model!r} is not a local checkpoint folder (nothing is "
                                 "downloaded); for a served judge set endpoint instead")
        if not isinstance(self.backend, str):
            self._judge = self.backend  # an instance given in Python

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

    def _build_judge(self) -> Any:
        if self.serve_url:
            raise ValueError("persrm: with serve_url the judging happens in `persrm serve`; run through "
                             "openrlhf_persrm.cli.train_ppo_ray, which points --reward.remote_url at it")
        if self.endpoint:
            from ..judges.openai_backend import OpenAIJudge

            config = {"base_url": self.endpoint, "model": self.served_model, "api_key_env": self.api_key_env,
                      "timeout": self.timeout, **self.backend_config}
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
        except Exception as exc:  # noqa: BLE001 -- a judge that cannot start costs neutral rewards, not the run
            logger.error("persrm: cannot start the judge backend: %s: %s", type(exc).__name__, exc)
            return exc

    def _counter(self) -> Any:
        count = getattr(self._judge_or_error(), "count_tokens", None)
        if count is not None:
            return count
        per = self.chars_per_token
        return lambda messages: int(sum(len(m["content"]) + 8 for m in messages) / per) + 1

    # ------------------------------------------------------------------ judging
    def _messages(self, exemplars: Sequence[str], prompt: str, a: str, b: str) -> list[dict[str, str]]:
        return ExemplarBudget(self.max_prompt_tokens).fit(self._counter(), exemplars, prompt, a, b).messages

    def _run(self, requests: list[JudgeRequest]) -> list[str | JudgeError]:
        if not requests:
            return []
        judge = self._judge_or_error()
        if isinstance(judge, Exception):
            return [JudgeError(f"judge backend unavailable: {type(judge).__name__}: {judge}")] * len(requests)
        try:
            outputs = list(judge.generate(requests))
            if len(outputs) != len(requests):
                raise RuntimeError(f"judge returned {len(outputs)} outputs for {len(requests)} requests")
            return outputs
        except Exception as exc:  # noqa: BLE001 -- a judge that cannot serve costs neutral rewards, not the run
            logger.error("persrm: judge backend %s failed: %s: %s", getattr(judge, "name", "?"),
                         type(exc).__name__, exc)
            return [JudgeError(f"{type(exc).__name__}: {exc}")] * len(requests)

    def judge_many(self, prompts: Sequence[list[dict[str, str]]],
                   seeds: Sequence[int] | None = None) -> list[JudgedPair]:
        """Judge chat prompts in one batch, asking again for unreadable outputs.

        ``seeds`` (default: ``seed`` for all) seed each prompt's sampling; retries shift them.
        """
        results: list[JudgedPair | None] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        seeds = list(seeds) if seeds is not None else [self.seed] * len(prompts)
        for attempt in range(self.parse_retries + 1):
            temperature = self.temperature if attempt == 0 else max(self.temperature, self.retry_temperature)
            requests = [JudgeRequest(prompts[i], max_new_tokens=self.max_new_tokens, temperature=temperature,
                                     seed=seeds[i] + 7919 * attempt) for i in todo]
            again = []
            for i, out in zip(todo, self._run(requests)):
                if isinstance(out, JudgeError):  # the backend already retried transport errors
                    results[i] = JudgedPair(None, None, "", "judge_error", str(out), attempt)
                    continue
                parsed = parse_judgment(out, require_reasoning=self.require_reasoning)
                if isinstance(parsed, Judgment):
                    results[i] = JudgedPair(parsed.score_a, parsed.score_b, out, None, "", attempt)
                else:
                    results[i] = JudgedPair(None, None, out, parsed.kind.value, parsed.detail, attempt)
                    again.append(i)
            todo = again
            if not todo:
                break
        return [r for r in results if r is not None]

    def judge_pair(self, exemplars: Sequence[str], prompt: str, response_a: str, response_b: str) -> JudgedPair:
        """One judgment of (A, B) as shown, for ``POST /judge``; never raises for a judge failure."""
        try:
            messages = self._messages(exemplars, prompt, response_a, response_b)
        except PromptTooLong as exc:
            return JudgedPair(None, None, "", "prompt_too_long", str(exc))
        return self.judge_many([messages])[0]

    # ------------------------------------------------------------------ the reward
    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any],
                 **kwargs: Any) -> RewardOutput:
        n = len(queries)
        logs = [dict.fromkeys(EXTRA_LOG_KEYS, 0.0) for _ in range(n)]
        rewards = [float(self.neutral_reward)] * n
        # (sample index, order) for every judgment asked; order 0: sample shown as A.
        asked: list[tuple[int, int]] = []
        judge_prompts: list[list[dict[str, str]]] = []
        seeds: list[int] = []
        for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
            try:
                exemplars, reference, shown_prompt = parse_persrm_label(label)
            except LabelError as exc:
                logger.debug("persrm: bad label, giving the neutral reward: %s", exc)
                logs[i]["bad_label"] = logs[i]["judge_failed"] = 1.0
                continue
            response = clean_response(split_response(query, prompt))
            response, cut = truncate(response, self.max_response_chars)
            reference, _ = truncate(reference, self.max_response_chars)
            if cut:
                logs[i]["truncated"] = 1.0
                logger.debug("persrm: response of sample %d truncated to %d chars", i, self.max_response_chars)
            shown = shown_prompt if shown_prompt is not None else prompt
            try:
                both = [self._messages(exemplars, shown, response, reference),
                        self._messages(exemplars, shown, reference, response)]
            except PromptTooLong as exc:
                logger.debug("persrm: %s; giving the neutral reward", exc)
                logs[i]["prompt_too_long"] = logs[i]["judge_failed"] = 1.0
                continue
            for order, messages in enumerate(both):
                for vote in range(self.votes):  # votes of one order differ by their seed only
                    asked.append((i, order))
                    judge_prompts.append(messages)
                    seeds.append(self.seed + vote)
        judged = self.judge_many(judge_prompts, seeds)

        per_sample: dict[int, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {}
        for (i, order), result in zip(asked, judged):
            pairs = per_sample.setdefault(i, ([], []))
            logs[i]["judge_retries"] += result.retries
            if result.failure == "judge_error":
                logs[i]["judge_errors"] += 1
            elif not result.ok:
                logs[i]["judge_unparseable"] += 1
            else:
                sample, ref = (result.score_a, result.score_b) if order == 0 else (result.score_b, result.score_a)
                pairs[order].append((sample, ref))
        for i, (first, second) in per_sample.items():
            if not first or not second:  # one order alone would carry the judge's position bias
                logs[i]["judge_failed"] = 1.0
                continue
            values = [sum(judgment_value(self.mode, s, r) for s, r in order) / len(order) for order in (first, second)]
            rewards[i] = max(-1.0, min(1.0, sum(values) / 2))
            both = first + second
            logs[i]["sample_score"] = sum(s for s, _ in both) / len(both)
            logs[i]["reference_score"] = sum(r for _, r in both) / len(both)
            signs = [math.copysign(1, sum(s - r for s, r in order)) if any(s != r for s, r in order) else 0
                     for order in (first, second)]
            logs[i]["position_consistent"] = float(signs[0] == signs[1])
        failed = sum(log["judge_failed"] for log in logs)
        if failed:
            seen = next(_FAILURES)
            if seen < 5 or seen % 100 == 0:
                logger.warning("persrm: %d of %d sample(s) got the neutral reward %s (judge failure or bad label; "
                               "see the judge_* and bad_label logs); %d such calls so far", int(failed), n,
                               self.neutral_reward, seen + 1)
        scores = [(r + 1) / 2 for r in rewards]
        return RewardOutput(rewards, scores, {k: [log[k] for log in logs] for k in EXTRA_LOG_KEYS})
