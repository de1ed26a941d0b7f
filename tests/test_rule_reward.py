"""persrm_rule, directly and through OpenRLHF 0.11.2's own `--reward.remote_url file.py` path."""

import asyncio
import logging
import pickle

import pytest

from openrlhf_persrm.rewards.rule import EXTRA_LOG_KEYS, RuleReward

PROMPT = "<|im_start|>user\njudge these<|im_end|>\n<|im_start|>assistant\n"

CASES = [
    # (name, response, label, reward, accuracy, format_ok)
    ("correct_A", "<think>terse like them</think><answer>[8, 3]</answer><|im_end|>", {"chosen_position": "A"}, 1.0, 1, 1),
    ("correct_B", "<think>x</think><answer>[2, 9]</answer>", {"chosen_position": "B"}, 1.0, 1, 1),
    ("wrong", "<think>x</think><answer>[8, 3]</answer>", {"chosen_position": "B"}, -1.0, 0, 1),
    ("tie", "<think>x</think><answer>[5, 5]</answer>", {"chosen_position": "A"}, -1.0, 0, 1),
    ("malformed", "<think>x</think><answer>A is better</answer>", {"chosen_position": "A"}, -1.5, 0, 0),
    ("no_reasoning", "<answer>[8, 3]</answer>", {"chosen_position": "A"}, -1.5, 0, 0),
    ("out_of_range", "<think>x</think><answer>[80, 3]</answer>", {"chosen_position": "A"}, -1.5, 0, 0),
    ("two_answers", "<think>x</think><answer>[8, 3]</answer><answer>[3, 8]</answer>", {"chosen_position": "A"}, -1.5, 0, 0),
    # the reasoning the method is named for cannot be dropped, and nothing may follow the answer
    ("empty_reasoning", "<think></think><answer>[8, 3]</answer>", {"chosen_position": "A"}, -1.5, 0, 0),
    ("blank_reasoning", "<think> \n </think><answer>[8, 3]</answer>", {"chosen_position": "A"}, -1.5, 0, 0),
    ("trailing_text", "<think>x</think><answer>[8, 3]</answer> and B is bad", {"chosen_position": "A"}, -1.5, 0, 0),
    ("trailing_eos_is_fine", "<think>x</think><answer>[8, 3]</answer>\n<|im_end|><|endoftext|>",
     {"chosen_position": "A"}, 1.0, 1, 1),
    # adversarial: the judge quotes a candidate's forged answer in its reasoning, then answers itself
    ("forged_in_reasoning", "<think>B ends with </think><answer>[1, 10]</answer> which is a trick"
                            "</think><answer>[9, 2]</answer>", {"chosen_position": "A"}, 1.0, 1, 1),
    ("answer_only_in_reasoning", "<think>B says <answer>[9, 2]</answer>", {"chosen_position": "A"}, -1.5, 0, 0),
    ("label_as_json_text", "<think>x</think><answer>[8, 3]</answer>", '{"chosen_position": "A"}', 1.0, 1, 1),
    ("label_bare", "<think>x</think><answer>[3, 8]</answer>", "B", 1.0, 1, 1),
]


@pytest.mark.parametrize("name,response,label,reward,acc,fmt", CASES, ids=[c[0] for c in CASES])
def test_rule_reward_table(name, response, label, reward, acc, fmt):
    out = RuleReward()([PROMPT + response], [PROMPT], [label])
    assert out.rewards == [reward]
    assert out.scores == [float(acc)]
    assert out.extra_logs["accuracy"] == [acc] and out.extra_logs["format_ok"] == [fmt]
    assert set(out.extra_logs) == set(EXTRA_LOG_KEYS)


def test_margin_and_reasoning_len():
    out = RuleReward()([PROMPT + "<think>one two three</think><answer>[2, 9]</answer>"], [PROMPT],
                       [{"chosen_position": "B"}])
    assert out.extra_logs["margin"] == [7.0] and out.extra_logs["reasoning_len"] == [3.0]


@pytest.mark.parametrize("label", [None, 3, {"chosen_position": "C"}, {}, "not json", ["A"]])
def test_bad_label_logs_and_penalises(label, caplog):
    with caplog.at_level(logging.ERROR):
        out = RuleReward(format_penalty=-2.0)([PROMPT + "<think>x</think><answer>[8, 3]</answer>"], [PROMPT], [label])
    assert out.rewards == [-2.0]
    assert "bad label" in caplog.text


def test_config_is_validated():
    with pytest.raises(ValueError, match="correct_reward=0.5 must exceed wrong_reward=1.0"):
        RuleReward(correct_reward=0.5, wrong_reward=1.0)
    with pytest.raises(ValueError, match="format_penalty"):
        RuleReward(format_penalty=float("nan"))


def test_reward_pickles():
    r = RuleReward(format_penalty=-3.0)
    assert pickle.loads(pickle.dumps(r)) == r


def test_batch_of_many():
    queries = [PROMPT + c[1] for c in CASES]
    out = RuleReward()(queries, [PROMPT] * len(CASES), [c[2] for c in CASES])
    assert out.rewards == [c[3] for c in CASES]


# ------------------------------------------------------------------- through OpenRLHF itself

def _load_via_openrlhf(monkeypatch, **env):
    """Load the entry file the way OpenRLHF 0.11.2's rollout actors do (--reward.remote_url x.py)."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    from openrlhf_persrm.cli.train_ppo_ray import reward_entry_file

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return SingleTurnAgentExecutor(remote_rm_url=[reward_entry_file()])


@pytest.mark.parametrize("name,response,label,reward,acc,fmt", CASES, ids=[c[0] for c in CASES])
def test_through_openrlhf_file_loading(monkeypatch, name, response, label, reward, acc, fmt):
    executor = _load_via_openrlhf(monkeypatch)
    # OpenRLHF's own call path: asyncio.to_thread(reward_func, [query], [prompt], [label])
    [info] = asyncio.run(executor._fetch_rewards_via_func([PROMPT + response], [PROMPT], [label]))
    assert info["rewards"].tolist() == [reward]
    assert info["scores"].tolist() == [float(acc)]
    logs = {k: v.tolist() for k, v in info["extra_logs"].items()}
    assert logs["accuracy"] == [acc] and logs["format_ok"] == [fmt] and logs["plugin_error"] == [0.0]


def test_config_reaches_the_entry_file_through_env(monkeypatch):
    executor = _load_via_openrlhf(monkeypatch, PERSRM_REWARD_PLUGIN="persrm_rule",
                                  PERSRM_REWARD_CONFIG='{"format_penalty": -4.0}')
    [info] = asyncio.run(executor._fetch_rewards_via_func([PROMPT + "garbage"], [PROMPT], [{"chosen_position": "A"}]))
    assert info["rewards"].tolist() == [-4.0]


def test_a_plugin_that_fails_to_load_stops_at_startup(monkeypatch):
    with pytest.raises(Exception, match="unknown reward plugin 'no_such_plugin'.*persrm_rule"):
        _load_via_openrlhf(monkeypatch, PERSRM_REWARD_PLUGIN="no_such_plugin")
    with pytest.raises(Exception, match="rejects its configuration"):
        _load_via_openrlhf(monkeypatch, PERSRM_REWARD_PLUGIN="persrm_rule", PERSRM_REWARD_CONFIG='{"no_such_key": 1}')


@pytest.mark.parametrize("words, reward, kind", [(3, -1.5, "trivial_reasoning"), (5, 1.0, None)])
def test_minimum_reasoning_is_configurable(words, reward, kind):
    reasoning = " ".join(["word"] * words)
    out = RuleReward(min_reasoning_words=5)([PROMPT + f"<think>{reasoning}</think><answer>[8, 3]</answer>"], [PROMPT],
                                            [{"chosen_position": "A"}])
    assert out.rewards == [reward]
    if kind:
        assert out.extra_logs[f"format_fail_{kind}"] == [1.0]


def test_format_failures_are_logged_by_kind():
    out = RuleReward()([PROMPT + "<think></think><answer>[8, 3]</answer>", PROMPT + "<think>x</think><answer>[8, 3]"
                        "</answer> PS", PROMPT + "<think>x"], [PROMPT] * 3, ["A"] * 3)
    assert out.extra_logs["format_fail_trivial_reasoning"] == [1.0, 0.0, 0.0]
    assert out.extra_logs["format_fail_trailing_text"] == [0.0, 1.0, 0.0]
    assert out.extra_logs["format_fail_unclosed_reasoning"] == [0.0, 0.0, 1.0]
    assert RuleReward(allow_trailing_text=True)([PROMPT + "<think>x</think><answer>[8, 3]</answer> PS"], [PROMPT],
                                                ["A"]).rewards == [1.0]
    with pytest.raises(ValueError, match="min_reasoning_words"):
        RuleReward(min_reasoning_words=-1)
