"""``persrm_group``: group-relative rewards from a PersRM judge, for policy RLHF (GRPO).

OpenRLHF scores samples one at a time, so a reward function never sees a GRPO group. This
trainer plugin does (NeMo-Gym ``genrm_compare`` style): in :meth:`PersRMGroup.on_rollout_step`
each policy sample is compared with other samples of its prompt group,

``strategy="circular"``
    member ``i`` against members ``i+1 .. i+k`` (cyclically): ``k`` neighbours on each side;
``strategy="all_pairs"``
    every two members,

always in both A/B orders, and its reward is its mean score margin ``(s_self - s_other) / 9``
over every readable judgment it took part in (in ``[-1, 1]``). No reference text is needed; with
``include_reference`` the label's reference joins the group as one more member (it is judged,
never rewarded).

All the judgments of a step go to the judge at once: one ``generate`` batch to the backend
(plus one per parse retry), or, with ``serve_url``, ``ceil(n / serve_batch)`` requests to
``persrm serve``'s ``/get_reward`` (each comparison is one item there: the other sample is the
"reference", and the server judges both orders). A failed or unreadable judgment is left out of
the margins and counted (``group_judge_failed``); a sample with no readable judgment at all gets
the lowest reward of its group (``failed_reward`` overrides), so a failure never makes a sample
look better than one that was judged.

Labels are the ``persrm_policy`` dataset's: ``{"exemplars": [...], "prompt": ..., "reference": ...}``.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.request
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from ..contracts import JudgeError, RewardOutput, RolloutStep, StepResult, TrainerPlugin
from ..judge_format import SCORE_MAX, SCORE_MIN, PromptTooLong

logger = logging.getLogger(__name__)

STRATEGIES = ("circular", "all_pairs")
_SPAN = SCORE_MAX - SCORE_MIN
_JUDGE_KEYS = ("endpoint", "served_model", "api_key_env", "model", "backend", "backend_config", "temperature",
               "max_new_tokens", "max_response_chars", "max_prompt_tokens", "chars_per_token", "parse_retries",
               "retry_temperature", "require_reasoning", "timeout", "seed")


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


def margins_to_rewards(n_members: int, rewardable: int, judged: Sequence[tuple[int, int, int | None, int | None]],
                       failed_reward: float | None = None) -> tuple[list[float], list[int]]:
    """Rewards of the first ``rewardable`` members from judgments ``(a, b, score_a, score_b)``
    (member ``a`` shown as A; scores None for a failed judgment), and each member's count of
    readable judgments. Pure.

    >>> margins_to_rewards(2, 2, [(0, 1, 8, 3), (1, 0, 4, 7)])
    ([0.4444444444444444, -0.4444444444444444], [2, 2])
    """
    sums = [0.0] * n_members
    counts = [0] * n_members
    for a, b, sa, sb in judged:
        if sa is None or sb is None:
            continue
        m = (sa - sb) / _SPAN
        sums[a] += m
        sums[b] -= m
        counts[a] += 1
        counts[b] += 1
    rewards = [sums[i] / counts[i] if counts[i] else math.nan for i in range(rewardable)]
    judged_rewards = [r for r in rewards if not math.isnan(r)]
    floor = failed_reward if failed_reward is not None else (min(judged_rewards) if judged_rewards else 0.0)
    return [floor if math.isnan(r) else max(-1.0, min(1.0, r)) for r in rewards], counts[:rewardable]


@dataclass
class PersRMGroup(TrainerPlugin):
    """Group-relative PersRM rewards (see the module docstring).

    Args:
        endpoint, served_model, api_key_env, model, backend, backend_config: the judge, exactly as for
            the ``persrm`` reward plugin (a served PersRM, a local checkpoint, or a judge backend).
        serve_url: a running ``persrm serve`` instead (judged through its batched ``/get_reward``).
        strategy: ``circular`` (``k`` neighbours each side) or ``all_pairs``.
        k: neighbours on each side for ``circular``.
        include_reference: let the label's ``reference`` join each group as a member.
        combine: ``replace`` the step's rewards, or ``add`` ``weight`` x the group reward to them.
        weight: scale of the group reward.
        failed_reward: reward of a sample with no readable judgment (default: its group's lowest).
        serve_batch: comparisons per ``/get_reward`` request (``persrm serve --max_batch``).
        temperature, max_new_tokens, max_response_chars, max_prompt_tokens, parse_retries, ...: judge
            settings, as for ``persrm``.
    """

    name: ClassVar[str] = "persrm_group"
    stages: ClassVar[tuple[str, ...]] = ("rl",)
    provides_rewards: ClassVar[bool] = True

    endpoint: str = ""
    served_model: str = ""
    api_key_env: str = "PERSRM_JUDGE_API_KEY"
    model: str = ""
    backend: Any = ""
    backend_config: dict = field(default_factory=dict)
    serve_url: str = ""
    strategy: str = "circular"
    k: int = 1
    include_reference: bool = False
    combine: str = "replace"
    weight: float = 1.0
    failed_reward: float | None = None
    serve_batch: int = 64
    temperature: float = 0.0
    max_new_tokens: int = 512
    max_response_chars: int = 4000
    max_prompt_tokens: int = 4096
    chars_per_token: float = 3.0
    parse_retries: int = 1
    retry_temperature: float = 0.7
    require_reasoning: bool = True
    timeout: float = 120.0
    seed: int = 0
    _reward: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"persrm_group: strategy={self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        if self.k < 1:
            raise ValueError(f"persrm_group: k={self.k}; compare each sample with at least 1 neighbour")
        if self.combine not in ("replace", "add"):
            raise ValueError(f"persrm_group: combine={self.combine!r}; use 'replace' or 'add'")
        if self.serve_batch < 1:
            raise ValueError(f"persrm_group: serve_batch={self.serve_batch}; use 1 or more")
        sources = [k for k in ("endpoint", "model", "serve_url", "backend") if getattr(self, k)]
        if len(sources) != 1:
            raise ValueError(f"persrm_group: set exactly one judge source, got {sources or 'none'}: endpoint, "
                             "model, backend (as for the persrm reward) or serve_url (a running `persrm serve`)")
        if not self.serve_url:
            self.judge_reward  # validate the judge settings now, in the wrapper, not in a Ray actor

    # ------------------------------------------------------------------ the judge
    @property
    def judge_reward(self) -> Any:
        """A :class:`~openrlhf_persrm.rewards.persrm.PersRMReward` used for its batched judging."""
        if self._reward is None:
            from ..rewards.persrm import PersRMReward

            self._reward = PersRMReward(**{k: getattr(self, k) for k in _JUDGE_KEYS})
        return self._reward

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reward"] = None
        return state

    # ------------------------------------------------------------------ the hook
    def on_rollout_step(self, *, step: RolloutStep) -> StepResult:
        from ..rewards.labels import LabelError, label_object
        from ..rewards.persrm import clean_response, truncate

        # One "job" per comparison and order: (group index, member a shown as A, member b).
        groups: list[dict[str, Any]] = []
        bad_label = 0
        for idx in step.groups():
            first = step.samples[idx[0]]
            try:
                label = label_object(first.label, "'exemplars'")
                exemplars = label.get("exemplars")
                if not isinstance(exemplars, list) or not exemplars:
                    raise LabelError("label field 'exemplars' must be a non-empty list")
            except LabelError as exc:
                logger.warning("persrm_group: prompt group without usable exemplars (%s); its rewards stay", exc)
                bad_label += len(idx)
                continue
            members = [truncate(clean_response(step.samples[i].response), self.max_response_chars)[0] for i in idx]
            reference = label.get("reference")
            if self.include_reference and isinstance(reference, str) and reference.strip():
                members.append(truncate(reference, self.max_response_chars)[0])
            shown = label.get("prompt") if isinstance(label.get("prompt"), str) else first.prompt
            groups.append({"idx": idx, "members": members, "exemplars": exemplars, "prompt": shown,
                           "pairs": comparisons(len(members), self.strategy, self.k)})

        judged = self._judge_serve(groups) if self.serve_url else self._judge_backend(groups)

        rewards = list(step.rewards)
        n_judgments = n_failed = unjudged = 0
        for g, results in zip(groups, judged):
            n_judgments += len(results)
            n_failed += sum(sa is None for _, _, sa, _ in results)
            group_rewards, counts = margins_to_rewards(len(g["members"]), len(g["idx"]), results, self.failed_reward)
            unjudged += sum(c == 0 for c in counts)
            for i, r in zip(g["idx"], group_rewards):
                rewards[i] = r * self.weight + (rewards[i] if self.combine == "add" else 0.0)
        metrics = {"group_judgments": float(n_judgments),
                   "group_judge_failed": n_failed / n_judgments if n_judgments else 0.0,
                   "group_unjudged_samples": float(unjudged),
                   "group_bad_label": float(bad_label)}
        if n_failed:
            logger.warning("persrm_group: %d of %d judgments failed this step (masked out of the margins); "
                           "%d sample(s) had none readable", n_failed, n_judgments, unjudged)
        return StepResult(rewards, metrics)

    def _judge_backend(self, groups: list[dict[str, Any]]) -> list[list[tuple[int, int, int | None, int | None]]]:
        """Every judgment of the step in one ``judge_many`` call (one backend batch per attempt)."""
        reward = self.judge_reward
        jobs: list[tuple[int, int, int]] = []
        prompts: list[list[dict[str, str]]] = []
        out: list[list[tuple[int, int, int | None, int | None]]] = [[] for _ in groups]
        for gi, g in enumerate(groups):
            for i, j in g["pairs"]:
                for a, b in ((i, j), (j, i)):
                    try:
                        messages = reward._messages(g["exemplars"], g["prompt"], g["members"][a], g["members"][b])
                    except PromptTooLong:
                        out[gi].append((a, b, None, None))
                        continue
                    jobs.append((gi, a, b))
                    prompts.append(messages)
        if prompts:
            seeds = [self.seed + n for n in range(len(prompts))]
            for (gi, a, b), res in zip(jobs, reward.judge_many(prompts, seeds)):
                out[gi].append((a, b, res.score_a, res.score_b) if res.ok else (a, b, None, None))
        return out

    def _judge_serve(self, groups: list[dict[str, Any]]) -> list[list[tuple[int, int, int | None, int | None]]]:
        """Every comparison of the step through ``persrm serve``'s batched ``/get_reward``; the server
        judges both orders of each and reports the mean scores (``sample_score``, ``reference_score``)."""
        items: list[tuple[int, int, int]] = []
        queries, labels = [], []
        for gi, g in enumerate(groups):
            for i, j in g["pairs"]:
                items.append((gi, i, j))
                queries.append(g["members"][i])
                labels.append({"exemplars": g["exemplars"], "reference": g["members"][j] or " ",
                               "prompt": g["prompt"]})
        out: list[list[tuple[int, int, int | None, int | None]]] = [[] for _ in groups]
        url = self.serve_url.split(",")[0].strip().rstrip("/")
        url = url if url.endswith("/get_reward") else url + "/get_reward"
        for start in range(0, len(items), self.serve_batch):
            chunk = slice(start, start + self.serve_batch)
            result = self._post(url, queries[chunk], labels[chunk])
            for n, (gi, i, j) in enumerate(items[chunk]):
                if isinstance(result, JudgeError) or result.extra_logs.get("judge_failed", [1.0] * (n + 1))[n]:
                    out[gi] += [(i, j, None, None), (j, i, None, None)]
                    continue
                s, r = result.extra_logs["sample_score"][n], result.extra_logs["reference_score"][n]
                # the server's mean over both orders: one margin, counted once per order
                out[gi] += [(i, j, s, r), (j, i, r, s)]
        return out

    def _post(self, url: str, queries: list[str], labels: list[dict]) -> RewardOutput | JudgeError:
        body = json.dumps({"query": queries, "prompts": [""] * len(queries), "labels": labels}).encode()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout * max(1, len(queries))) as resp:
                data = json.loads(resp.read())
            return RewardOutput(list(data["rewards"]), list(data["scores"]),
                                {k: list(v) for k, v in data.get("extra_logs", {}).items()})
        except Exception as exc:  # noqa: BLE001 -- a server that fails costs masked judgments, not the run
            logger.error("persrm_group: %s failed: %s: %s", url, type(exc).__name__, exc)
            return JudgeError(f"{type(exc).__name__}: {exc}")
