"""``persrm_group``: group-relative rewards from a PersRM judge, for policy RLHF (GRPO).

OpenRLHF scores samples one at a time, so a reward function never sees a GRPO group. This
trainer plugin does (NeMo-Gym ``genrm_compare`` style): in :meth:`PersRMGroup.on_rollout_step`
each policy sample is compared with other samples of its prompt group,

``strategy="circular"``
    member ``i`` against members ``i+1 .. i+k`` (cyclically): ``k`` neighbours on each side;
``strategy="all_pairs"``
    every two members,

always in both A/B orders (``votes`` times each), and its reward is the mean value of every
readable judgment it took part in, by ``mode`` (``score_diff``: its margin ``(s_self - s_other) / 9``),
in ``[-1, 1]``. No reference text is needed; with ``include_reference`` the label's reference
joins the group as one more member (it is judged, never rewarded).

The judge settings, and what happens when the judge fails, are the ``persrm`` reward's
(:class:`~openrlhf_persrm.judge_settings.JudgeSettings`, judged by the same
:class:`~openrlhf_persrm.rewards.judging.JudgeRunner`):

* all the judgments of a step go to the judge at once, within ``deadline_s`` of the step's start
  (preparation included): one ``generate`` batch to the backend (plus one per parse retry), or,
  with ``serve_url``, ``ceil(n / serve_batch)`` requests to ``persrm serve``'s ``/get_reward``,
  sent together and spread over the servers listed (each comparison is one item there: the other
  sample is the "reference", and the server judges both orders); what has not come back by the
  deadline fails with kind ``deadline``;
* a failed or unreadable judgment is left out of the margins and counted by kind
  (``group_judge_failed``, ``group_judge_fail_<kind>``); a sample with no readable judgment at
  all, or in a group whose label is unusable, gets ``failure_reward`` (-1 by default: failing
  never pays more than losing);
* the stop rule counts the samples the judge failed: when it trips, or when ``persrm serve``
  answers 503 (its own stop rule: the judge is down), the step raises
  :class:`~openrlhf_persrm.judges.faults.JudgeUnavailable` with the cause and the run ends;
* with ``probe_on_start`` the judge (or each server) judges one probe pair before the first
  step's judging, and a judge that cannot answer stops the run with the cause.

Labels are the ``persrm_policy`` dataset's: ``{"exemplars": [...], "prompt": ..., "reference": ...}``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from ..contracts import JudgeError, RewardOutput, RolloutStep, StepResult, TrainerPlugin
from ..judge_settings import JudgeSettings, get_reward_urls, setting
from ..rewards.judging import JudgingPlugin

logger = logging.getLogger(__name__)

STRATEGIES = ("circular", "all_pairs")
#: /get_reward requests of one step in flight at once
_MAX_PARALLEL_REQUESTS = 32

#: A judgment: member ``a`` shown as A, member ``b`` as B, their scores (None: failed).
Judged = tuple[int, int, "int | None", "int | None"]


def comparisons(m: int, strategy: str = "circular", k: int = 1) -> list[tuple[int, int]]:
    """Unordered pairs ``(i, j)``, ``i < j``, of ``m`` group members to compare.

    >>> comparisons(4, "circular", 1)
    [(0, 1), (1, 2), (2, 3), (0, 3)]
    >>> len(comparisons(4, "all_pairs"))
    6
    """
    if strategy == "all_pairs" or (strategy == "circular" and 2 * k >= m - 1):
        return [(i, j) for i in range(m) for j in range(i + 1, m)]
    if strategy != "circular":
        raise ValueError(f"strategy={strategy!r}; use one of {STRATEGIES}")
    out: list[tuple[int, int]] = []
    for i in range(m):
        for d in range(1, k + 1):
            a, b = sorted((i, (i + d) % m))
            if a != b and (a, b) not in out:
                out.append((a, b))
    return out


def margins_to_rewards(n_members: int, rewardable: int, judged: Sequence[Judged], failure_reward: float = -1.0,
                       mode: str = "score_diff") -> tuple[list[float], list[int]]:
    """Rewards of the first ``rewardable`` members from judgments ``(a, b, score_a, score_b)``
    (member ``a`` shown as A; scores None for a failed judgment), each the mean
    :func:`~openrlhf_persrm.rewards.judging.judgment_value` of its readable judgments
    (``failure_reward`` for a member with none), and each member's count of readable judgments. Pure.

    >>> margins_to_rewards(2, 2, [(0, 1, 8, 3), (1, 0, 4, 7)])
    ([0.4444444444444444, -0.4444444444444444], [2, 2])
    >>> margins_to_rewards(2, 2, [(0, 1, None, None)])
    ([-1.0, -1.0], [0, 0])
    """
    from ..rewards.judging import judgment_value

    sums = [0.0] * n_members
    counts = [0] * n_members
    for a, b, sa, sb in judged:
        if sa is None or sb is None:
            continue
        sums[a] += judgment_value(mode, sa, sb)
        sums[b] += judgment_value(mode, sb, sa)
        counts[a] += 1
        counts[b] += 1
    rewards = [max(-1.0, min(1.0, sums[i] / counts[i])) if counts[i] else float(failure_reward)
               for i in range(rewardable)]
    return rewards, counts[:rewardable]


@dataclass
class _Group:
    """One prompt group of a step: its samples (``idx``), the texts judged (members), and outcomes."""

    idx: list[int]
    members: list[str]
    exemplars: list[str]
    prompt: str
    pairs: list[tuple[int, int]]
    judged: list[Judged] = field(default_factory=list)
    sent: Counter = field(default_factory=Counter)  # judgments that reached the judge, per member
    kinds: Counter = field(default_factory=Counter)  # failed judgments by kind
    details: dict = field(default_factory=dict)

    def fail(self, a: int, b: int, kind: str, detail: str) -> None:
        self.judged.append((a, b, None, None))
        self.kinds[kind] += 1
        self.details.setdefault(kind, detail)


@dataclass
class PersRMGroup(JudgingPlugin, TrainerPlugin):
    """Group-relative PersRM rewards (see the module docstring). Its judge settings are
    :class:`~openrlhf_persrm.judge_settings.JudgeSettings`, as for the ``persrm`` reward; its own:"""

    name: ClassVar[str] = "persrm_group"
    stages: ClassVar[tuple[str, ...]] = ("rl",)
    provides_rewards: ClassVar[bool] = True
    # With serve_url the server judges; what happens to this step's samples when it fails is decided here.
    CLIENT_SIDE: ClassVar[frozenset[str]] = JudgeSettings.CLIENT_SIDE | {
        "deadline_s", "failure_reward", "neutral_reward", "mode", "stop_failure_rate", "stop_after_steps",
        "stop_window"}

    strategy: str = setting("circular", "circular (k neighbours each side) or all_pairs")
    k: int = setting(1, "neighbours on each side for circular")
    include_reference: bool = setting(False, "let the label's reference join each group as a member (judged, "
                                           "never rewarded)")
    combine: str = setting("replace", "replace the step's rewards, or add weight x the group reward to them")
    weight: float = setting(1.0, "scale of the group reward")
    serve_batch: int = setting(64, "comparisons per /get_reward request to persrm serve (its --max_batch)")
    _probed: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"persrm_group: strategy={self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        if self.k < 1:
            raise ValueError(f"persrm_group: k={self.k}; compare each sample with at least 1 neighbour")
        if self.combine not in ("replace", "add"):
            raise ValueError(f"persrm_group: combine={self.combine!r}; use 'replace' or 'add'")
        if self.serve_batch < 1:
            raise ValueError(f"persrm_group: serve_batch={self.serve_batch}; use 1 or more")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)):
            raise ValueError(f"persrm_group: weight={self.weight!r}; use a finite number")
        super().__post_init__()  # the judge settings, checked as for the persrm reward

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_probed": False}  # a worker probes its own judge

    # ------------------------------------------------------------------ start-up
    def probe(self, timeout: float | None = None) -> None:
        """Judge one probe pair with the judge, or through each ``persrm serve``; raise
        :class:`~openrlhf_persrm.judges.faults.JudgeUnavailable` naming the cause when it cannot answer."""
        timeout = timeout if timeout is not None else max(self.deadline_s, 30.0)
        if not self.serve_url:
            self._runner.probe(timeout)
            return
        from ..judges.faults import ERROR_KINDS, JudgeUnavailable, failure_kind
        from ..rewards.judging import PROBE_PAIR

        exemplars, prompt, a, b = PROBE_PAIR
        for url in get_reward_urls(self.serve_url):
            out = _post_get_reward(url, [a], [{"exemplars": exemplars, "reference": b, "prompt": prompt}],
                                   time.monotonic() + timeout)
            if isinstance(out, JudgeError):
                raise JudgeUnavailable(f"persrm_group: persrm serve at {url} failed the start-up probe "
                                       f"({failure_kind(out)}): {out}")
            kinds = _server_kinds(out, 0)
            if out.extra_logs.get("judge_failed", [0.0])[0] and set(kinds) & set(ERROR_KINDS):
                raise JudgeUnavailable(f"persrm_group: the judge behind persrm serve at {url} failed the start-up "
                                       f"probe ({', '.join(kinds)})")
        logger.info("persrm_group: persrm serve answered the start-up probe")

    # ------------------------------------------------------------------ the hook
    def on_rollout_step(self, *, step: RolloutStep) -> StepResult:
        runner = self._runner
        runner.check_up()
        if self.probe_on_start and not self._probed:
            self.probe()
            self._probed = True
        deadline = time.monotonic() + self.deadline_s
        groups, bad_label = self._groups(step)
        if self.serve_url:
            self._judge_serve(groups, deadline)
        else:
            self._judge_backend(groups, deadline)
        return self._result(step, groups, bad_label)

    def _groups(self, step: RolloutStep) -> tuple[list[_Group], list[int]]:
        """The step's prompt groups with usable labels, and the samples of those without."""
        from ..rewards.labels import LabelError, clean_response, label_object

        groups: list[_Group] = []
        bad_label: list[int] = []
        for idx in step.groups():
            first = step.samples[idx[0]]
            try:
                label = label_object(first.label, "'exemplars'")
                exemplars = label.get("exemplars")
                if (not isinstance(exemplars, list) or not exemplars
                        or not all(isinstance(e, str) and e.strip() for e in exemplars)):
                    raise LabelError("label field 'exemplars' must be a non-empty list of non-empty strings")
            except LabelError as exc:
                logger.warning("persrm_group: prompt group without usable exemplars (%s); its samples get "
                               "failure_reward", exc)
                bad_label += idx
                continue
            members = [clean_response(step.samples[i].response) for i in idx]
            reference = label.get("reference")
            if self.include_reference and isinstance(reference, str) and reference.strip():
                members.append(reference)
            shown = label.get("prompt") if isinstance(label.get("prompt"), str) else first.prompt
            groups.append(_Group(idx, members, exemplars, shown, comparisons(len(members), self.strategy, self.k)))
        return groups, bad_label

    def _judge_backend(self, groups: list[_Group], deadline: float) -> None:
        """Every judgment of the step in one ``judge_many`` call (one backend batch per attempt)."""
        from ..judge_format import PromptTooLong

        runner = self._runner
        judge = runner.judge_or_error()
        jobs: list[tuple[_Group, int, int]] = []
        prompts: list[list[dict[str, str]]] = []
        seeds: list[int] = []
        # counting tokens (an HTTP call for a served judge) may use a quarter of the time; then estimates
        with runner.counting_within(judge, time.monotonic() + max(0.0, deadline - time.monotonic()) / 4):
            count_text = runner.text_counter(judge)
            for g in groups:
                g.members = [runner.fit_candidate(m, count_text)[0] for m in g.members]
            evidence = self._evidence(groups, deadline)
            for g in groups:
                for i, j in g.pairs:
                    for a, b in ((i, j), (j, i)):
                        if time.monotonic() >= deadline:
                            g.fail(a, b, "deadline", "the deadline passed while the judge prompts were prepared")
                            continue
                        if isinstance(evidence, tuple):
                            g.fail(a, b, *evidence)
                            continue
                        ev = evidence.get((id(g), a, b)) if evidence else None
                        try:
                            messages = runner.messages(g.exemplars, g.prompt, g.members[a], g.members[b], judge, ev)
                        except PromptTooLong as exc:
                            g.fail(a, b, "prompt_too_long", str(exc))
                            continue
                        for vote in range(self.votes):  # votes of one order differ by their seed only
                            jobs.append((g, a, b))
                            prompts.append(messages)
                            seeds.append(self.seed + vote)
        if not prompts:
            return
        for (g, a, b), res in zip(jobs, runner.judge_many(prompts, seeds, deadline)):
            g.sent.update((a, b))
            if res.ok:
                g.judged.append((a, b, res.score_a, res.score_b))
            else:
                g.fail(a, b, res.kind or res.failure or "judge_error", res.detail)

    def _evidence(self, groups: list[_Group], deadline: float) -> dict[tuple[int, int, int], Any] | tuple | None:
        """Evidence on every compared pair, both orders, by ``(id(group), a, b)``, measured in one scorer batch
        (each member's measures are computed once); None when the judge reads none; ``(kind, detail)`` when
        the scorer failed (every comparison fails with it)."""
        from ..evidence import EvidenceInput

        keys, items = [], []
        for g in groups:
            for i, j in g.pairs:
                keys.append((g, i, j))
                items.append(EvidenceInput(tuple(g.exemplars), g.prompt, g.members[i], g.members[j]))
        try:
            measured = self._runner.measure(items, deadline)
        except Exception as exc:  # noqa: BLE001 -- named in every comparison's failure
            return self._runner.evidence_failure(exc)
        if measured is None:
            return None
        out: dict[tuple[int, int, int], Any] = {}
        for (g, i, j), ev in zip(keys, measured):
            out[(id(g), i, j)], out[(id(g), j, i)] = ev, ev.swapped()
        return out

    def _judge_serve(self, groups: list[_Group], deadline: float) -> None:
        """Every comparison of the step through ``persrm serve``'s batched ``/get_reward``, the requests
        sent together (spread over the servers) and bounded as a whole by ``deadline``; the server
        judges both orders of each and reports the mean scores (``sample_score``, ``reference_score``)."""
        from ..judges.faults import JudgeDeadline, failure_kind

        items = [(g, i, j) for g in groups for i, j in g.pairs]
        queries = [g.members[i] for g, i, _ in items]
        labels = [{"exemplars": g.exemplars, "reference": g.members[j] or " ", "prompt": g.prompt}
                  for g, _, j in items]
        chunks = [range(s, min(s + self.serve_batch, len(items))) for s in range(0, len(items), self.serve_batch)]
        if not chunks:
            return
        urls = get_reward_urls(self.serve_url)
        results = _post_together([(urls[n % len(urls)], [queries[k] for k in chunk], [labels[k] for k in chunk])
                                  for n, chunk in enumerate(chunks)], deadline)
        for chunk, result in zip(chunks, results):
            if result is None:
                result = JudgeDeadline(f"persrm serve did not answer before the step's deadline "
                                       f"(deadline_s={self.deadline_s})")
            for n, k in enumerate(chunk):
                g, i, j = items[k]
                g.sent.update((i, j))
                if isinstance(result, JudgeError):
                    kind, detail = failure_kind(result), str(result)
                elif result.extra_logs.get("judge_failed", [1.0] * (n + 1))[n]:
                    kind, detail = (_server_kinds(result, n) or ["judge_error"])[0], "failed in persrm serve"
                else:
                    s, r = result.extra_logs["sample_score"][n], result.extra_logs["reference_score"][n]
                    # the server's mean over both orders: one margin, counted once per order
                    g.judged += [(i, j, s, r), (j, i, r, s)]
                    continue
                g.fail(i, j, kind, detail)
                g.fail(j, i, kind, detail)

    def _result(self, step: RolloutStep, groups: list[_Group], bad_label: list[int]) -> StepResult:
        """The step's rewards and metrics; the stop rule's count (raises when it trips)."""
        rewards = list(step.rewards)

        def put(i: int, r: float) -> None:
            rewards[i] = r * self.weight + (rewards[i] if self.combine == "add" else 0.0)

        kinds: Counter = Counter()
        details: dict[str, str] = {}
        n_judgments = n_failed = unjudged = judge_samples = judge_failed = 0
        for g in groups:
            n_judgments += len(g.judged)
            n_failed += sum(sa is None for _, _, sa, _ in g.judged)
            kinds.update(g.kinds)
            for kind, detail in g.details.items():
                details.setdefault(kind, detail)
            group_rewards, counts = margins_to_rewards(len(g.members), len(g.idx), g.judged, self.failure_reward,
                                                       self.mode)
            for m, (i, r) in enumerate(zip(g.idx, group_rewards)):
                put(i, r)
                unjudged += counts[m] == 0
                if g.sent[m]:  # the stop rule watches the judge: samples it was asked about
                    judge_samples += 1
                    judge_failed += counts[m] == 0
        for i in bad_label:
            put(i, self.failure_reward)
        metrics = {"group_judgments": float(n_judgments),
                   "group_judge_failed": n_failed / n_judgments if n_judgments else 0.0,
                   "group_unjudged_samples": float(unjudged),
                   "group_bad_label": float(len(bad_label)),
                   **{f"group_judge_fail_{k}": float(n) for k, n in kinds.items()}}
        if n_failed:
            logger.warning("persrm_group: %d of %d judgments failed this step (%s; masked out of the margins); "
                           "%d sample(s) had none readable and got failure_reward=%s", n_failed, n_judgments,
                           ", ".join(f"{k}={n}" for k, n in kinds.most_common()), unjudged, self.failure_reward)
        self._runner.record(judge_samples, judge_failed, n_judgments, kinds, details)
        return StepResult(rewards, metrics)


def _server_kinds(out: RewardOutput, n: int) -> list[str]:
    """The failure kinds ``persrm serve`` counted for item ``n``, most frequent first."""
    found = [(v[n], k[len("judge_fail_"):]) for k, v in out.extra_logs.items()
             if k.startswith("judge_fail_") and len(v) > n and v[n]]
    return [k for _, k in sorted(found, reverse=True)]


def _post_together(requests: list[tuple[str, list[str], list[dict]]], deadline: float) -> list[Any]:
    """Each ``(url, queries, labels)`` sent at once (at most ``_MAX_PARALLEL_REQUESTS`` in flight), on
    daemon threads; returns by ``deadline`` with each answer (or typed failure), None where none came
    back in time (that thread is abandoned: its socket times out by the deadline, and it never holds
    up the process's exit). Raises what a request raised (``JudgeUnavailable``: a judge that is down)."""
    from ..judges.faults import JudgeDeadline

    results: list[Any] = [None] * len(requests)
    raised: list[BaseException] = []
    slots = threading.BoundedSemaphore(_MAX_PARALLEL_REQUESTS)
    finished = threading.Condition()
    count = [0]

    def send(n: int, url: str, queries: list[str], labels: list[dict]) -> None:
        try:
            if slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    result: Any = _post_get_reward(url, queries, labels, deadline)
                finally:
                    slots.release()
            else:
                result = JudgeDeadline("the step's deadline passed before the request could be sent")
        except BaseException as exc:  # noqa: BLE001 -- raised in the caller
            result = None
            raised.append(exc)
        with finished:
            results[n] = result
            count[0] += 1
            finished.notify()

    for n, request in enumerate(requests):
        threading.Thread(target=send, args=(n, *request), name="persrm-group-post", daemon=True).start()
    with finished:
        finished.wait_for(lambda: count[0] == len(requests) or raised,
                          timeout=max(0.0, deadline - time.monotonic()))
        if raised:
            raise raised[0]
        return list(results)


def _post_get_reward(url: str, queries: list[str], labels: list[dict], deadline: float) -> RewardOutput | JudgeError:
    """One ``/get_reward`` request answered by ``deadline``: its output, or the typed failure; raises
    :class:`~openrlhf_persrm.judges.faults.JudgeUnavailable` when the server says its judge is down (503)."""
    from ..judges.faults import (JudgeDeadline, JudgeFatal, JudgeMalformed, JudgeRejected, JudgeServerError,
                                 JudgeUnavailable, JudgeUnreachable)

    left = deadline - time.monotonic()
    if left <= 0:
        return JudgeDeadline("the step's deadline passed before the request was sent")
    body = json.dumps({"query": queries, "prompts": [""] * len(queries), "labels": labels}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=left) as resp:
            data = json.loads(resp.read())
        return RewardOutput(list(data["rewards"]), list(data["scores"]),
                            {k: list(v) for k, v in data.get("extra_logs", {}).items()})
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", "")
        except Exception:  # noqa: BLE001 -- the status alone says enough
            detail = ""
        if exc.code == 503:
            raise JudgeUnavailable(f"persrm_group: persrm serve at {url} answered 503, the judge is down: "
                                   f"{detail}") from None
        kind = (JudgeFatal if exc.code in (401, 403, 404) else JudgeRejected if exc.code in (400, 408, 413, 422)
                else JudgeServerError)
        return kind(f"{url}: HTTP {exc.code}: {detail}")
    except TimeoutError:
        return JudgeDeadline(f"{url}: no answer before the step's deadline")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            return JudgeDeadline(f"{url}: no answer before the step's deadline")
        return JudgeUnreachable(f"{url}: connection error: {type(reason).__name__}: {reason}")
    except (ValueError, KeyError, TypeError) as exc:
        return JudgeMalformed(f"{url}: not a /get_reward answer: {type(exc).__name__}: {exc}")
