"""Evidence at reward time: the persrm reward and persrm_group measure it within the deadline and show it
to an evidence-informed judge in both A/B orders; a scorer that fails or runs out of time fails the samples,
named, like a judge that does."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import pytest
from _judge_stubs import StubJudge
from conftest import make_pair

from openrlhf_persrm.contracts import RolloutSample, RolloutStep
from openrlhf_persrm.evidence import ScorerDeadline
from openrlhf_persrm.models import write_judge_card
from openrlhf_persrm.rewards.persrm import PersRMReward
from openrlhf_persrm.trainers.group import PersRMGroup


@dataclass
class RecordingJudge(StubJudge):
    """The stub judge, also keeping every system and user turn it is shown."""

    users: list = field(default_factory=list)
    systems: list = field(default_factory=list)

    def one(self, req):
        with self._lock:
            self.users.append(req.messages[-1]["content"])
            self.systems.append(req.messages[0]["content"])
        return super().one(req)


def label(i=0):
    p = make_pair(i)
    return {"exemplars": p["exemplars"], "reference": "REF SCORE=5 She walked on.", "prompt": p["prompt"]}


def gains(user: str) -> tuple[str, str]:
    line = re.search(r"exemplar gain: A (\S+), B (\S+) ->", user)
    return line.group(1), line.group(2).rstrip(",")


def test_the_reward_measures_evidence_and_shows_it_in_both_orders(tiny_model):
    judge = RecordingJudge()
    reward = PersRMReward(backend=judge, scorer_model=tiny_model, parse_retries=0, evidence="on")
    out = reward(["q an answer SCORE=8"], ["q "], [label()])
    assert out.rewards[0] == pytest.approx((8 - 5) / 9)
    assert len(judge.users) == 2 and all('<evidence v="1">' in u for u in judge.users)
    assert all("measurements of both" in s for s in judge.systems)
    # order 0 shows the sample as A, order 1 as B: the same measures, swapped
    a0, b0 = gains(judge.users[0])
    a1, b1 = gains(judge.users[1])
    assert (a0, b0) == (b1, a1)


def test_a_plain_judge_sees_no_evidence(tiny_model):
    judge = RecordingJudge()
    PersRMReward(backend=judge, parse_retries=0)(["q an answer SCORE=8"], ["q "], [label()])
    assert judge.users and not any("<evidence" in u for u in judge.users)


def test_a_judge_card_switches_evidence_on_with_its_recorded_scorer(tiny_model, tmp_path):
    import shutil

    judge_dir = tmp_path / "judge"
    shutil.copytree(tiny_model, judge_dir)
    write_judge_card(judge_dir, {"evidence": {"version": 1, "scorer": tiny_model}})
    reward = PersRMReward(model=str(judge_dir), parse_retries=0, max_new_tokens=4, probe_on_start=False)
    assert reward.runner.scorer is not None and reward.runner.scorer.model_path == tiny_model
    write_judge_card(judge_dir, {"evidence": {"version": 7, "scorer": tiny_model}})
    with pytest.raises(ValueError, match="evidence version 7"):
        PersRMReward(model=str(judge_dir), probe_on_start=False).runner.scorer


class BrokenScorer:
    identity = "broken"

    def __init__(self, exc):
        self.exc = exc

    def score(self, jobs, *, deadline=None, progress=None):
        raise self.exc


@pytest.mark.parametrize("exc, kind", [(RuntimeError("scorer out of memory"), "evidence_error"),
                                       (ScorerDeadline("scored 0 of 4"), "deadline")])
def test_a_failing_scorer_fails_the_samples_by_name(exc, kind):
    judge = RecordingJudge()
    reward = PersRMReward(backend=judge, parse_retries=0, evidence="on", scorer_model="smollm2-135m-instruct")
    reward.runner._scorer = BrokenScorer(exc)
    out = reward(["q a SCORE=8", "q b SCORE=2"], ["q ", "q "], [label(), label()])
    assert out.rewards == [reward.failure_reward] * 2
    assert out.extra_logs[f"judge_fail_{kind}"] == [1.0, 1.0] and out.extra_logs["judge_failed"] == [1.0, 1.0]
    assert not judge.users  # nothing was judged without its evidence


def test_evidence_counts_against_the_deadline(tiny_model):
    judge = RecordingJudge()
    reward = PersRMReward(backend=judge, scorer_model=tiny_model, parse_retries=0, evidence="on")
    out = reward(["q a SCORE=8"], ["q "], [label()], deadline=time.monotonic() - 1)
    assert out.rewards == [reward.failure_reward] and out.extra_logs["judge_fail_deadline"] == [1.0]


def test_persrm_group_measures_each_comparison_once_and_shows_it(tiny_model):
    judge = RecordingJudge()
    plugin = PersRMGroup(backend=judge, scorer_model=tiny_model, evidence="on", strategy="all_pairs",
                         parse_retries=0, probe_on_start=False)
    samples = [RolloutSample("prompt", f"an answer SCORE={s}", label(), 0.0, False, 0) for s in (9, 5, 2)]
    result = plugin.on_rollout_step(step=RolloutStep(1, samples, 3, 32))
    assert len(judge.users) == 6 and all('<evidence v="1">' in u for u in judge.users)
    assert result.rewards[0] > result.rewards[1] > result.rewards[2]


def test_group_scorer_failure_fails_every_comparison_with_its_kind():
    judge = RecordingJudge()
    plugin = PersRMGroup(backend=judge, evidence="on", scorer_model="smollm2-135m-instruct", strategy="all_pairs",
                         parse_retries=0, probe_on_start=False)
    plugin.runner._scorer = BrokenScorer(RuntimeError("boom"))
    samples = [RolloutSample("prompt", f"an answer SCORE={s}", label(), 0.0, False, 0) for s in (9, 2)]
    result = plugin.on_rollout_step(step=RolloutStep(1, samples, 2, 32))
    assert result.rewards == [plugin.failure_reward] * 2 and not judge.users
    assert result.metrics.get("group_judge_fail_evidence_error", 0) > 0


def test_evidence_settings_are_checked():
    with pytest.raises(ValueError, match="evidence="):
        PersRMReward(backend=StubJudge(), evidence="maybe")
    with pytest.raises(ValueError, match="one evidence scorer"):
        PersRMReward(backend=StubJudge(), scorer_model="smollm2-135m-instruct", scorer_endpoint="http://x:1")
    with pytest.raises(ValueError, match="scorer_served_model"):
        PersRMReward(backend=StubJudge(), scorer_endpoint="http://x:1")
    with pytest.raises(ValueError, match="needs a scorer"):
        PersRMReward(backend=StubJudge(), evidence="on")
