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

The settings are :class:`~openrlhf_persrm.judge_settings.JudgeSettings` (shared with
``persrm_group`` and ``persrm serve``); judging itself (prompt fitting, the deadline, retries,
the probe, the stop rule) is :class:`~openrlhf_persrm.rewards.judging.JudgeRunner`. A call goes:

1. :meth:`PersRMReward.prepare`: labels parsed, responses cleaned and cut, the request stripped of
   the policy's chat template: one :class:`PreparedSample` per sample that can be judged;
2. :meth:`PersRMReward.judge_prompts`: both orders x ``votes`` judge prompts per sample;
3. the runner judges them all in one batch by the deadline;
4. :meth:`PersRMReward.aggregate`: rewards and ``extra_logs``, and the stop rule's count.

Deadline: a call returns within ``deadline_s`` (preparation included): judgments not finished by
then are cancelled in the backend and their samples get ``failure_reward``.

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

Robustness: candidate text cannot steer the verdict through the prompt or the parser: our tags
and every chat-template special token inside it (and inside exemplars and prompt) are
neutralised (:func:`~openrlhf_persrm.judge_format.defang`), the judge is shown the request
without the policy's chat template (:func:`~openrlhf_persrm.judge_format.strip_chat_template`),
and only the judge's own final answer is read (:func:`~openrlhf_persrm.judge_format.parse_judgment`).

The judge backend is built on first use (the plugin pickles: Ray ships it to workers):
``endpoint`` -> the ``openai`` backend (``vllm serve`` of a trained PersRM), ``model`` -> the
``local`` backend, or ``backend`` -> any registered judge backend with ``backend_config``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from ..contracts import RewardOutput
from ..judge_format import FailureKind, PromptTooLong, strip_chat_template
from ..judge_settings import MODES, get_reward_urls
from ..judges.faults import ERROR_KINDS, JudgeUnavailable
from .judging import JudgedPair, JudgingPlugin, judgment_value, truncate
from .labels import END_MARKERS, LabelError, clean_response, has_lone_surrogate, label_object, split_response

__all__ = ["PersRMReward", "PreparedSample", "JudgedPair", "JudgeUnavailable", "EXTRA_LOG_KEYS", "FAILURE_KINDS",
           "END_MARKERS", "MODES", "clean_response", "truncate", "judgment_value", "parse_persrm_label"]

#: Why a judgment or a sample failed: backend errors, parser failures, and per-sample causes.
FAILURE_KINDS = (*ERROR_KINDS, *(k.value for k in FailureKind), "prompt_too_long", "bad_label", "bad_input",
                 "evidence_error")

#: Logged for every sample (OpenRLHF averages each over the batch). ``judge_fail_<kind>`` counts
#: the sample's failed judgments (or 1 for a per-sample cause) by kind.
EXTRA_LOG_KEYS = ("judge_failed", "judge_errors", "judge_unparseable", "judge_retries", "candidate_truncated",
                  "bad_label", "prompt_too_long", "sample_score", "reference_score", "position_consistent",
                  *(f"judge_fail_{k}" for k in FAILURE_KINDS))


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


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


@dataclass
class PreparedSample:
    """One sample ready to be judged, exactly as the judge will be shown it: the seam where
    anything else computed at reward time (within the same deadline) starts from."""

    index: int  # the sample's position in the call
    exemplars: list[str]
    prompt: str  # the request, without the policy's chat template
    response: str  # the policy's response, cleaned and cut to the candidate limits
    reference: str  # cut to the same limits


class Ledger:
    """The outcome of one reward call, per sample: rewards (``failure_reward`` until judged),
    ``extra_logs``, and failures by kind with one detail each."""

    def __init__(self, n: int, failure_reward: float):
        self.logs = [dict.fromkeys(EXTRA_LOG_KEYS, 0.0) for _ in range(n)]
        self.rewards = [float(failure_reward)] * n
        self.kinds: Counter = Counter()
        self.details: dict[str, str] = {}

    def fail(self, i: int, kind: str, detail: str) -> None:
        """Sample ``i`` cannot be judged at all (it keeps ``failure_reward``)."""
        self.logs[i]["judge_failed"] = 1.0
        self.logs[i][f"judge_fail_{kind}"] += 1.0
        self.kinds[kind] += 1
        self.details.setdefault(kind, detail)

    def output(self) -> RewardOutput:
        scores = [(r + 1) / 2 for r in self.rewards]
        return RewardOutput(self.rewards, scores, {k: [log[k] for log in self.logs] for k in EXTRA_LOG_KEYS})


@dataclass
class PersRMReward(JudgingPlugin):
    """Generative reward from a PersRM judge (see the module docstring); its fields are the judge
    settings, :class:`~openrlhf_persrm.judge_settings.JudgeSettings`."""

    name: ClassVar[str] = "persrm"

    @classmethod
    def remote_reward_urls(cls, config: dict[str, Any]) -> list[str] | None:
        """Where OpenRLHF should POST for rewards instead of loading this plugin (``serve_url``)."""
        return get_reward_urls(config.get("serve_url", ""), cls.name) or None

    @property
    def _judge(self) -> Any:
        """The judge backend if already built, else None (``persrm serve``'s ``/health`` builds nothing)."""
        return self._runner.built_judge

    def judge_many(self, prompts: Sequence[list[dict[str, str]]], seeds: Sequence[int] | None = None,
                   deadline: float | None = None) -> list[JudgedPair]:
        """See :meth:`JudgeRunner.judge_many`."""
        return self._runner.judge_many(prompts, seeds, deadline)

    def judge_pair(self, exemplars: Sequence[str], prompt: str, response_a: str, response_b: str,
                   deadline: float | None = None) -> JudgedPair:
        """One judgment of (A, B) as shown, for ``POST /judge``; never raises for a judge failure."""
        return self._runner.judge_pair(exemplars, prompt, response_a, response_b, deadline)

    def probe(self, timeout: float | None = None) -> JudgedPair:
        """See :meth:`JudgeRunner.probe`."""
        return self._runner.probe(timeout)

    # ------------------------------------------------------------------ the reward
    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any],
                 **kwargs: Any) -> RewardOutput:
        runner = self._runner
        runner.check_up()
        # ``deadline`` (time.monotonic()): a caller that received the request earlier (persrm serve) says when
        # the answer is due; the judging gets what is left of it
        given = kwargs.get("deadline")
        deadline = given if isinstance(given, (int, float)) else time.monotonic() + self.deadline_s
        ledger = Ledger(len(queries), self.failure_reward)
        judge = runner.judge_or_error()
        # counting tokens (an HTTP call for a served judge) may use a quarter of the time; then estimates
        with runner.counting_within(judge, time.monotonic() + max(0.0, deadline - time.monotonic()) / 4):
            samples = self.prepare(queries, prompts, labels, judge, deadline, ledger)
            asked, judge_prompts, seeds = self.judge_prompts(samples, judge, deadline, ledger)
        judged = runner.judge_many(judge_prompts, seeds, deadline) if judge_prompts else []
        return self.aggregate(ledger, asked, judged)

    def prepare(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], judge: Any,
                deadline: float, ledger: Ledger) -> list[PreparedSample]:
        """The samples that can be judged, as the judge will see them; the others fail in ``ledger``."""
        count_text = self._runner.text_counter(judge)
        out = []
        for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
            if time.monotonic() >= deadline:
                ledger.fail(i, "deadline", "the deadline passed while the judge prompts were being prepared")
                continue
            if has_lone_surrogate(query) or has_lone_surrogate(prompt) or has_lone_surrogate(label):
                ledger.fail(i, "bad_input", "text with a lone surrogate (not UTF-8)")
                continue
            try:
                exemplars, reference, shown_prompt = parse_persrm_label(label)
            except LabelError as exc:
                ledger.logs[i]["bad_label"] = 1.0
                ledger.fail(i, "bad_label", str(exc))
                continue
            response, cut = self._runner.fit_candidate(clean_response(split_response(query, prompt)), count_text)
            reference, _ = self._runner.fit_candidate(reference, count_text)
            if cut:
                ledger.logs[i]["candidate_truncated"] = 1.0
            # the judge sees the request, never the policy's chat template
            shown = shown_prompt if shown_prompt is not None else strip_chat_template(prompt)
            out.append(PreparedSample(i, exemplars, shown, response, reference))
        return out

    def judge_prompts(self, samples: Sequence[PreparedSample], judge: Any, deadline: float,
                      ledger: Ledger) -> tuple[list[tuple[int, int]], list[list[dict[str, str]]], list[int]]:
        """``(asked, prompts, seeds)``: one judge prompt per (sample, order, vote); ``asked`` holds
        ``(sample index, order)``, order 0 showing the sample as A."""
        asked: list[tuple[int, int]] = []
        judge_prompts: list[list[dict[str, str]]] = []
        seeds: list[int] = []
        evidence = self.measure_evidence(samples, deadline, ledger)
        for k, sample in enumerate(samples):
            i = sample.index
            if time.monotonic() >= deadline:
                ledger.fail(i, "deadline", "the deadline passed while the judge prompts were being prepared")
                continue
            if evidence is False:
                continue  # failed in the ledger
            ev = evidence[k] if evidence else None
            try:
                both = [self._runner.messages(sample.exemplars, sample.prompt, sample.response, sample.reference,
                                              judge, ev),
                        self._runner.messages(sample.exemplars, sample.prompt, sample.reference, sample.response,
                                              judge, ev.swapped() if ev else None)]
            except PromptTooLong as exc:
                ledger.logs[i]["prompt_too_long"] = 1.0
                ledger.fail(i, "prompt_too_long", str(exc))
                continue
            for order, messages in enumerate(both):
                for vote in range(self.votes):  # votes of one order differ by their seed only
                    asked.append((i, order))
                    judge_prompts.append(messages)
                    seeds.append(self.seed + vote)
        return asked, judge_prompts, seeds

    def measure_evidence(self, samples: Sequence[PreparedSample], deadline: float, ledger: Ledger) -> list[Any] | None | bool:
        """Evidence on (sample, reference) for every sample, in one scorer batch within the deadline; None when
        the judge reads none; False when it could not be measured (the samples fail in ``ledger``)."""
        from ..evidence import EvidenceInput

        items = [EvidenceInput(tuple(s.exemplars), s.prompt, s.response, s.reference) for s in samples]
        try:
            return self._runner.measure(items, deadline)
        except Exception as exc:  # noqa: BLE001 -- every sample fails, named; the stop rule watches the rate
            kind, detail = self._runner.evidence_failure(exc)
            for s in samples:
                ledger.fail(s.index, kind, detail)
            return False

    def aggregate(self, ledger: Ledger, asked: list[tuple[int, int]], judged: list[JudgedPair]) -> RewardOutput:
        """Rewards from the judgments (both orders needed), the stop rule's count, the output."""
        logs = ledger.logs
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
            ledger.details.setdefault(kind, result.detail)
        judge_failures = 0
        for i, (first, second) in per_sample.items():
            if not first or not second:  # one order alone would carry the judge's position bias
                logs[i]["judge_failed"] = 1.0
                judge_failures += 1
                ledger.kinds.update(failed_kinds.get(i, {}))
                continue
            values = [sum(judgment_value(self.mode, s, r) for s, r in order) / len(order) for order in (first, second)]
            ledger.rewards[i] = max(-1.0, min(1.0, sum(values) / 2))
            both = first + second
            logs[i]["sample_score"] = sum(s for s, _ in both) / len(both)
            logs[i]["reference_score"] = sum(r for _, r in both) / len(both)
            # an order's vote is its net preference; a net-zero order prefers neither
            signs = [_sign(sum(s - r for s, r in order)) for order in (first, second)]
            logs[i]["position_consistent"] = float(signs[0] == signs[1])
        # the stop rule watches the judge: samples it was asked about, and its failures only
        self._runner.record(len(per_sample), judge_failures, len(judged), ledger.kinds, ledger.details)
        return ledger.output()
