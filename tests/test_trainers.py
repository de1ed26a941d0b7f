"""Trainer plugins: the contract, the registry, the three built-ins and the step health check (no Ray)."""

import json
import math
import pickle

import pytest
from _judge_stubs import StubJudge
from conftest import make_pair, write_rows

from openrlhf_persrm.contracts import (PluginError, RolloutSample, RolloutStep, StepResult, TrainerPlugin,
                                       check_trainer_plugin)
from openrlhf_persrm.registry import instantiate, trainer_plugins
from openrlhf_persrm.trainers.group import PersRMGroup, comparisons, margins_to_rewards
from openrlhf_persrm.trainers.health import step_health
from openrlhf_persrm.trainers.hooks import HookRunner, configs_for, load_plugins
from openrlhf_persrm.trainers.order_consistency import OrderConsistency


def policy_label(i=0):
    p = make_pair(i)
    return {"exemplars": p["exemplars"], "reference": "REF SCORE=5", "prompt": p["prompt"]}


def group_step(scores_per_group, label=None):
    samples = []
    for g, scores in enumerate(scores_per_group):
        for s in scores:
            text = s if isinstance(s, str) else f"an answer SCORE={s}"
            samples.append(RolloutSample("prompt", text, label or policy_label(g), 0.0, False, g))
    return RolloutStep(1, samples, len(scores_per_group[0]), 32)


# --------------------------------------------------------------------------- contract and registry

def test_builtins_and_a_third_party_plugin_register_through_entry_points():
    names = trainer_plugins.names()
    for name in ("persrm_group", "persrm_order_consistency", "persrm_eval", "example_short_bonus"):
        assert name in names
    plugin = instantiate(trainer_plugins, "example_short_bonus", {"bonus": 1.0})
    out = HookRunner([plugin], "rl").rollout_step(group_step([["a", "bb", "ccc"]]))
    assert out.rewards == [1.0, 0.0, 0.0] and out.metrics == {"example_groups": 1.0}


def test_resolves_dotted_paths_and_files(tmp_path):
    assert trainer_plugins.resolve("openrlhf_persrm.trainers.order_consistency:OrderConsistency") is OrderConsistency
    f = tmp_path / "my_hooks.py"
    f.write_text("from openrlhf_persrm.contracts import TrainerPlugin, StepResult\n"
                 "class Doubler(TrainerPlugin):\n    name = 'doubler'\n"
                 "    def on_rollout_step(self, *, step):\n"
                 "        return StepResult([2 * r for r in step.rewards])\n")
    plugin = instantiate(trainer_plugins, str(f))
    step = RolloutStep(1, [RolloutSample("p", "r", None, 1.5)], 1)
    assert HookRunner([plugin], "rl").rollout_step(step).rewards == [3.0]



def test_a_dataclass_judge_backend_loads_from_a_file():
    from pathlib import Path

    from openrlhf_persrm.registry import judge_backends

    stub = instantiate(judge_backends, f"{Path(__file__).with_name('_judge_stubs.py')}:StubJudge", {"bias_a": 1})
    assert stub.bias_a == 1 and type(stub).__name__ == "StubJudge"


class _Misspelt(TrainerPlugin):
    def on_rollout_stpe(self, *, step):
        return None


class _Positional(TrainerPlugin):
    def on_rollout_step(self, step, extra):
        return None


class _Async(TrainerPlugin):
    async def on_evaluate(self, *, stage, global_step, generate):
        return {}


class _NeedsArg(TrainerPlugin):
    def __init__(self, judge):
        self.judge = judge


@pytest.mark.parametrize("cls, match", [
    (_Misspelt, "on_rollout_stpe is not a trainer hook"),
    (_Positional, r"on_rollout_step.*does not take the keyword arguments \(step\).*requires extra"),
    (_Async, "async def"),
    (_NeedsArg, "keyword arguments only"),
    (type("NoHooks", (), {"name": "x"}), "defines none of the hooks"),
])
def test_bad_plugins_are_rejected_at_registration_naming_plugin_and_signature(cls, match):
    with pytest.raises(PluginError, match=match) as info:
        trainer_plugins.register("bad_one", cls)
    assert "'bad_one'" in str(info.value) and "on_rollout_step(*, step)" in str(info.value)


def test_hooks_have_no_op_defaults_and_take_keywords():
    check_trainer_plugin("base", TrainerPlugin)
    p = TrainerPlugin()
    assert p.on_rollout_step(step=group_step([[1, 2]])) is None
    assert p.twin_key(label={}) is None and p.on_evaluate(stage="sft", global_step=1, generate=None) is None


def test_configs_for_one_or_several_plugins():
    assert configs_for(["a"], {"a": {"x": 1}}) == [{"x": 1}]
    assert configs_for(["a"], {"x": 1}) == [{"x": 1}]
    with pytest.raises(ValueError, match="keyed by the names"):
        configs_for(["a", "b"], {"x": 1})


def test_a_plugin_in_the_wrong_stage_is_refused():
    with pytest.raises(ValueError, match="persrm_group: works in stage.*rl, not with train_sft"):
        load_plugins(["persrm_group"], {"backend": "x"}, "sft")


def test_runner_chains_plugins_and_checks_what_they_return():
    class Add(TrainerPlugin):
        name = "add"

        def on_rollout_step(self, *, step):
            return StepResult([r + 1 for r in step.rewards], {"seen": step.rewards[0]})

    class Short(TrainerPlugin):
        name = "short"

        def on_rollout_step(self, *, step):
            return StepResult([0.0])

    step = RolloutStep(1, [RolloutSample("p", "r", None, 1.0), RolloutSample("p", "s", None, 2.0)], 2)
    out = HookRunner([Add(), Add()], "rl").rollout_step(step)
    assert out.rewards == [3.0, 4.0] and out.metrics == {"seen": 2.0}  # the second saw the first's rewards
    assert step.rewards == [1.0, 2.0]  # inputs untouched
    with pytest.raises(ValueError, match="short: on_rollout_step returned 1 rewards for 2 samples"):
        HookRunner([Short()], "rl").rollout_step(step)


# --------------------------------------------------------------------------- persrm_group

def test_comparison_strategies():
    assert comparisons(5, "circular", 1) == [(0, 1), (1, 2), (2, 3), (3, 4), (0, 4)]
    assert len(comparisons(5, "circular", 2)) == 10 == len(comparisons(5, "all_pairs"))
    assert comparisons(2, "circular", 1) == [(0, 1)]


@pytest.mark.parametrize("strategy, k", [("circular", 1), ("circular", 2), ("all_pairs", 1)])
def test_group_rewards_order_samples_as_the_judge_does_in_one_batch(strategy, k):
    judge = StubJudge()  # scores a candidate by its SCORE=n marker
    plugin = PersRMGroup(backend=judge, strategy=strategy, k=k, parse_retries=0, probe_on_start=False)
    groups = [[3, 9, 6, 1], [7, 2, 5, 8]]
    out = plugin.on_rollout_step(step=group_step(groups))
    for g, scores in enumerate(groups):
        rewards = out.rewards[4 * g: 4 * g + 4]
        assert sorted(range(4), key=lambda i: rewards[i]) == sorted(range(4), key=lambda i: scores[i]), rewards
        assert all(-1 <= r <= 1 for r in rewards)
    n_pairs = len(comparisons(4, strategy, k))
    assert judge.calls["requests"] == 2 * 2 * n_pairs  # two groups, both A/B orders of every comparison
    assert judge.calls["batches"] == 1  # the whole step in one call to the backend
    assert out.metrics["group_judgments"] == 2 * 2 * n_pairs and out.metrics["group_judge_failed"] == 0


def test_the_judge_is_probed_once_before_the_first_step():
    judge = StubJudge()
    plugin = PersRMGroup(backend=judge, strategy="all_pairs", parse_retries=0)
    plugin.on_rollout_step(step=group_step([[3, 9]]))
    assert judge.calls["batches"] == 2 and judge.seen[0]["response_a"] == ["Hello."]  # the probe, then the step
    plugin.on_rollout_step(step=group_step([[3, 9]]))
    assert judge.calls["batches"] == 3  # not again
    clone = pickle.loads(pickle.dumps(plugin))  # a worker probes its own judge
    before = clone.judge.calls["batches"]
    clone.on_rollout_step(step=group_step([[3, 9]]))
    assert clone.judge.calls["batches"] == before + 2


def test_both_slots_cancel_position_bias():
    plugin = PersRMGroup(backend=StubJudge(bias_a=3), strategy="all_pairs", parse_retries=0)
    out = plugin.on_rollout_step(step=group_step([[5, 5, 7]]))
    assert out.rewards[0] == pytest.approx(out.rewards[1]) and out.rewards[2] > out.rewards[0]


def test_judge_failures_are_masked_counted_and_never_flatter():
    judge = StubJudge()  # candidates containing FAIL get a JudgeError
    plugin = PersRMGroup(backend=judge, strategy="all_pairs", parse_retries=0, probe_on_start=False)
    out = plugin.on_rollout_step(step=group_step([[2, "FAIL SCORE=10", 6, 4]]))
    r = out.rewards
    assert r[1] == -1.0  # no readable judgment: failure_reward, never its SCORE=10
    assert r[2] > r[3] > r[0] > -1.0  # the others are ranked from the judgments that worked
    assert out.metrics["group_judge_failed"] == pytest.approx(6 / 12)
    assert out.metrics["group_judge_fail_judge_error"] == 6
    assert out.metrics["group_unjudged_samples"] == 1
    assert margins_to_rewards(2, 2, [(0, 1, None, None)]) == ([-1.0, -1.0], [0, 0])
    assert margins_to_rewards(2, 2, [(0, 1, None, None)], failure_reward=-0.5) == ([-0.5, -0.5], [0, 0])
    snapshot = plugin.health.snapshot()  # the stop rule saw the step: 4 samples asked, 1 failed
    assert snapshot["samples"] == 4 and snapshot["failed_samples"] == 1 and snapshot["failures"] == {"judge_error": 6}


def test_a_group_with_no_readable_judgment_gets_the_failure_reward_not_zero():
    plugin = PersRMGroup(backend=StubJudge(garble_greedy=True), strategy="all_pairs", parse_retries=0,
                         probe_on_start=False, failure_reward=-0.75)
    out = plugin.on_rollout_step(step=group_step([[2, 9, 6]]))
    assert out.rewards == [-0.75] * 3
    assert out.metrics["group_judge_fail_no_reasoning"] == 6 and out.metrics["group_unjudged_samples"] == 3
    bad = group_step([[2, 9]], label={"exemplars": []})
    out = plugin.on_rollout_step(step=bad)
    assert out.rewards == [-0.75, -0.75] and out.metrics["group_bad_label"] == 2


@pytest.mark.parametrize("mode, expected", [("score_diff", [-4 / 9, 4 / 9]), ("win_rate", [-1.0, 1.0]),
                                            ("pointwise", [(3 - 5.5) / 4.5, (7 - 5.5) / 4.5])])
def test_the_mode_decides_how_a_judgment_counts(mode, expected):
    plugin = PersRMGroup(backend=StubJudge(), strategy="all_pairs", parse_retries=0, mode=mode)
    assert plugin.on_rollout_step(step=group_step([[3, 7]])).rewards == pytest.approx(expected)


def test_votes_judge_each_order_with_their_own_seeds():
    judge = StubJudge()
    plugin = PersRMGroup(backend=judge, strategy="all_pairs", votes=3, temperature=0.7, seed=10,
                         probe_on_start=False)
    out = plugin.on_rollout_step(step=group_step([[3, 7]]))
    assert sorted(judge.seeds) == [10, 10, 11, 11, 12, 12] and out.metrics["group_judgments"] == 6


def test_reference_may_join_the_group_and_add_combines():
    plugin = PersRMGroup(backend=StubJudge(), strategy="all_pairs", include_reference=True, combine="add",
                         parse_retries=0, probe_on_start=False)
    step = group_step([[9, 1]])
    step = RolloutStep(1, [RolloutSample(s.prompt, s.response, s.label, 10.0, False, 0) for s in step.samples], 2)
    out = plugin.on_rollout_step(step=step)
    assert out.rewards[0] > 10.0 > out.rewards[1]  # added to the existing rewards
    assert any("REF SCORE=5" in seen["response_a"][0] or "REF SCORE=5" in seen["response_b"][0]
               for seen in plugin.judge.seen)


def test_group_through_persrm_serve_batches_requests():
    from openrlhf_persrm.rewards.persrm import PersRMReward
    from openrlhf_persrm.serve import make_app, running_server

    judge = StubJudge()
    with running_server(make_app(PersRMReward(backend=judge, parse_retries=0))) as url:
        plugin = PersRMGroup(serve_url=url, strategy="all_pairs", serve_batch=5)
        out = plugin.on_rollout_step(step=group_step([[3, 9, 6, 1], [7, 2, 5, 8]]))
    assert sorted(range(4), key=lambda i: out.rewards[i]) == [3, 0, 2, 1]
    assert sorted(range(4), key=lambda i: out.rewards[4 + i]) == [1, 2, 0, 3]
    # the probe (one item, both orders), then both orders of every comparison, judged in the server
    assert judge.calls["requests"] == 2 + 2 * 2 * 6
    assert judge.calls["batches"] == 1 + math.ceil(12 / 5)  # one backend batch per /get_reward request


def test_group_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="exactly one judge source"):
        PersRMGroup()
    with pytest.raises(ValueError, match="strategy='ring'"):
        PersRMGroup(backend="x", strategy="ring")
    with pytest.raises(ValueError, match="persrm_group: backend='local' without a checkpoint; set model=PATH"):
        PersRMGroup(backend="local")
    with pytest.raises(ValueError, match=r"persrm_group: with serve_url .* votes=3.*--reward.votes"):
        PersRMGroup(serve_url="http://127.0.0.1:9", votes=3, temperature=0.7)
    # what the group decides itself, with the judging in the server
    plugin = PersRMGroup(serve_url="http://127.0.0.1:9", deadline_s=5, failure_reward=-0.5, stop_after_steps=1)
    assert plugin.deadline_s == 5 and plugin.failure_reward == -0.5


# --------------------------------------------------------------------------- order consistency

def _answer(a, b):
    return f"<think>x</think><answer>[{a}, {b}]</answer>"


def test_order_consistency_shapes_rewards_and_logs_consistency():
    lab = lambda pos: {"chosen_position": pos, "pair_id": "p1"}  # noqa: E731
    samples = [  # real at A: prefers real twice; real at B: prefers real once, negative once
        RolloutSample("p", _answer(8, 3), lab("A"), 1.0, False, 0),
        RolloutSample("p", _answer(9, 2), lab("A"), 1.0, False, 0),
        RolloutSample("p", _answer(3, 8), lab("B"), 1.0, False, 1),
        RolloutSample("p", _answer(8, 3), lab("B"), 0.0, False, 1),
        RolloutSample("p", "garbled", {"chosen_position": "A", "pair_id": "solo"}, 0.0, False, 2),
    ]
    step = RolloutStep(1, samples, 2)
    out = OrderConsistency(bonus=1.0, penalty=0.5).on_rollout_step(step=step)
    assert out.rewards[:4] == [1.0 + 0.5 - 0.25, 1.0 + 0.5 - 0.25, 1.0 + 1.0, 0.0 - 0.5 * 1.0]
    assert out.rewards[4] == 0.0  # no twin in the step: unchanged
    assert out.metrics["position_consistency"] == pytest.approx(2 / 4)
    assert out.metrics["twins_in_step"] == pytest.approx(4 / 5)
    plugin = OrderConsistency()
    assert plugin.twin_key(label={"pair_id": "p1", "chosen_position": "A"}) == plugin.twin_key(
        label=json.dumps({"pair_id": "p1", "chosen_position": "B"}))
    assert plugin.twin_key(label="A") is None


def test_twin_sampler_keeps_twins_in_one_batch():
    from openrlhf_persrm.compat import TwinSampler

    keys = [f"p{i // 2}" for i in range(10)] + [None, None, "p9", "p9", None]
    sampler = TwinSampler(keys, batch_size=4, seed=3)
    for epoch in range(3):
        order = list(sampler)
        assert sorted(order) == list(range(len(keys)))
        batches = [order[i:i + 4] for i in range(0, len(order), 4)]
        where = {i: b for b, batch in enumerate(batches) for i in batch}
        for i, key in enumerate(keys):
            for j, other in enumerate(keys):
                if key is not None and key == other:
                    assert where[i] == where[j]
    assert sampler.order(0) != sampler.order(1)  # reshuffled each epoch


# --------------------------------------------------------------------------- step health

def test_step_health_names_the_cause():
    ok = RolloutStep(3, [RolloutSample("p", "r", None, r, i == 0, g) for i, (r, g) in
                         enumerate([(1.0, 0), (1.0, 0), (0.0, 1), (1.0, 1)])], 2, 64)
    assert step_health(ok) == []  # one group has spread; one rollout was not cut
    truncated = RolloutStep(3, [RolloutSample("p", "r", None, float(i), True, 0) for i in range(2)], 2, 64)
    [warning] = step_health(truncated)
    assert "every rollout hit --rollout.max_new_tokens (64)" in warning and "raise --rollout.max_new_tokens" in warning
    flat = RolloutStep(3, [RolloutSample("p", "r", None, -1.0, False, g) for g in (0, 0, 1, 1)], 2, 64)
    [warning] = step_health(flat)
    assert "identical rewards" in warning and "-1.0" in warning and "advantages are all zero" in warning
    single = RolloutStep(3, [RolloutSample("p", "r", None, -1.0, False, g) for g in (0, 1)], 1, 64)
    assert step_health(single) == []  # one sample per prompt: no groups to compare


# --------------------------------------------------------------------------- persrm_eval

def test_eval_metrics_and_best_tracking(tmp_path):
    from openrlhf_persrm.trainers.evaluation import PersRMEval

    pairs = write_rows(tmp_path / "val.jsonl", [make_pair(i, id=f"v{i}") for i in range(3)])
    plugin = instantiate(trainer_plugins, "persrm_eval", {"pairs": str(pairs), "eval_steps": 2, "limit": 2,
                                                          "max_new_tokens": 7, "batch_size": 3})
    asked = []

    def always_a(prompts, *, max_new_tokens, batch_size):
        asked.append((len(prompts), max_new_tokens, batch_size))
        return [_answer(8, 3)] * len(prompts)

    def reads_the_real_text(prompts, *, max_new_tokens, batch_size):
        chosen = make_pair(0)["chosen"]
        return [_answer(8, 3) if p[-1]["content"].index(chosen) < p[-1]["content"].index("<response_b>")
                else _answer(3, 8) for p in prompts]

    runner = HookRunner([plugin], "sft")
    assert runner.eval_due(1) == [] and runner.evaluate(1, always_a) == {}
    m = runner.evaluate(2, always_a)
    assert asked == [(4, 7, 3)]  # 2 pairs x both orders, greedy settings passed through
    assert m == {"eval_persrm_accuracy": 0.5, "eval_persrm_position_consistency": 0.0,
                 "eval_persrm_format_failure_rate": 0.0, "eval_persrm_tie_rate": 0.0}
    assert runner.is_new_best(2, m)
    good = runner.evaluate(4, reads_the_real_text)
    assert good["eval_persrm_accuracy"] == 1.0 and good["eval_persrm_position_consistency"] == 1.0
    assert runner.is_new_best(4, good)
    bad = runner.evaluate(6, lambda p, **kw: ["no answer"] * len(p))
    assert bad["eval_persrm_format_failure_rate"] == 1.0 and not runner.is_new_best(6, bad)
    assert runner.best_step == 4 and runner.best_metric == "eval_persrm_accuracy"
    with pytest.raises(ValueError, match="not a file"):
        PersRMEval(pairs=str(tmp_path / "missing.jsonl"))
