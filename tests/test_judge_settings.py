"""One judge-settings type: the persrm reward, the persrm_group plugin and persrm serve take the same
fields with the same defaults, documented once, checked once (openrlhf_persrm/judge_settings.py)."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from _judge_stubs import StubJudge
from openrlhf_persrm.judge_settings import JudgeSettings, get_reward_urls, settings_table
from openrlhf_persrm.rewards.persrm import PersRMReward
from openrlhf_persrm.serve import config_from_args, make_parser
from openrlhf_persrm.trainers.group import PersRMGroup

README = Path(__file__).resolve().parent.parent / "README.md"
GROUP_OWN = {"strategy", "k", "include_reference", "combine", "weight", "serve_batch"}


def _defaults(cls) -> dict:
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls) if f.init}


def test_the_reward_the_group_plugin_and_the_server_take_the_same_settings_and_defaults():
    judge = _defaults(JudgeSettings)
    assert _defaults(PersRMReward) == judge
    group = _defaults(PersRMGroup)
    assert set(group) - set(judge) == GROUP_OWN
    assert {k: group[k] for k in judge} == judge
    assert judge["timeout"] == 60.0 and judge["deadline_s"] == 90.0 and judge["failure_reward"] == -1.0
    flags = {a.dest[len("reward__"):]: a for a in make_parser()._actions if a.dest.startswith("reward__")}
    assert set(flags) == set(judge) - {"serve_url"}  # serve_url only points a training run at a server
    for f in dataclasses.fields(JudgeSettings):
        if f.name in flags:
            assert f.metadata["help"] in flags[f.name].help  # the one description


def test_every_setting_has_help_and_the_readme_table_is_generated_from_them():
    for f in dataclasses.fields(PersRMGroup):
        if f.init:
            assert f.metadata.get("help"), f.name
    table = settings_table()
    assert table.count("\n") == len(dataclasses.fields(JudgeSettings)) + 1
    assert "| `failure_reward` | `-1.0` |" in table and "| `backend_config` | `{}` |" in table
    assert table in README.read_text(encoding="utf-8"), \
        "README's judge-settings table is stale: paste `python -m openrlhf_persrm.judge_settings`"


@pytest.mark.parametrize("cls", [PersRMReward, PersRMGroup])
@pytest.mark.parametrize("config, match", [
    ({"backend": "x", "timeout": -1}, r"timeout=-1; use a positive number"),
    ({"backend": "x", "deadline_s": float("inf")}, r"deadline_s=inf; use a positive number"),
    ({"backend": "x", "mode": "elo"}, r"mode='elo'; use one of score_diff, win_rate, pointwise"),
    ({"backend": "x", "votes": 0}, r"votes=0; use 1 or more"),
    ({"backend": "x", "votes": 3}, r"votes=3 with temperature=0.0 .* set temperature > 0"),
    ({"backend": "x", "stop_window": 0}, r"stop_window=0; use a positive number"),
    ({"backend": "x", "parse_retries": -1}, r"parse_retries=-1; use 0 or more"),
    ({"backend": "x", "stop_failure_rate": 1.0}, r"stop_failure_rate=1.0; use a share in \[0, 1\)"),
    ({"backend": "x", "failure_reward": -2}, r"failure_reward=-2; use a number in \[-1, 1\]"),
    ({"backend": "x", "neutral_reward": True}, r"neutral_reward=True; use a number in \[-1, 1\]"),
    ({"backend": "x", "backend_config": [1]}, r"backend_config=\[1\]; give a JSON object"),
    ({}, r"set exactly one judge source, got none"),
    ({"backend": "x", "model": "smollm2"}, r"set exactly one judge source, got \['model', 'backend'\]"),
    ({"backend": "local"}, r"backend='local' without a checkpoint; set model=PATH"),
    ({"backend": "local", "backend_config": {"model_path": "/no/such"}},
     r"backend_config.model_path='/no/such' is not a local checkpoint folder"),
    ({"model": "/no/such"}, r"model='/no/such' is not a local checkpoint folder"),
    ({"endpoint": "judge-host:8000"}, r"endpoint='judge-host:8000'; give the judge server's http\(s\) URL"),
    ({"serve_url": "rm-host:8765"}, r"serve_url entry 'rm-host:8765' is not an http\(s\) URL"),
])
def test_a_bad_setting_is_refused_naming_the_field_the_value_and_the_fix(cls, config, match):
    with pytest.raises(ValueError, match=match) as err:
        cls(**config)
    assert str(err.value).startswith(f"{cls.name}: ")


@pytest.mark.parametrize("cls", [PersRMReward, PersRMGroup])
def test_failure_reward_and_its_former_name_are_one_setting(cls):
    for failure in (-0.5, -1.0):  # even the default's value, when given, is a second value
        with pytest.raises(ValueError, match="are one setting .* give only failure_reward"):
            cls(backend="x", failure_reward=failure, neutral_reward=-0.25)
    old = cls(backend="x", neutral_reward=-0.25)
    assert old.failure_reward == -0.25 and old.neutral_reward is None
    assert dataclasses.replace(old, seed=3).failure_reward == -0.25  # rebuilt from its fields: still valid
    assert type(cls(backend="x").failure_reward) is float


def test_the_openai_backend_by_name_needs_a_server(monkeypatch):
    monkeypatch.delenv("PERSRM_JUDGE_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="backend='openai' without a server; set endpoint=URL"):
        PersRMReward(backend="openai")
    assert PersRMReward(backend="openai", backend_config={"base_url": "http://127.0.0.1:9"})._judge is None
    monkeypatch.setenv("PERSRM_JUDGE_BASE_URL", "http://127.0.0.1:9")
    PersRMGroup(backend="openai")


def test_with_serve_url_each_component_keeps_only_what_it_decides():
    with pytest.raises(ValueError, match=r"persrm: with serve_url .* deadline_s=5 .*--reward.deadline_s"):
        PersRMReward(serve_url="http://127.0.0.1:9", deadline_s=5)  # the server's deadline
    group = PersRMGroup(serve_url="http://127.0.0.1:9", deadline_s=5, failure_reward=-0.5, mode="win_rate")
    assert (group.deadline_s, group.failure_reward, group.mode) == (5, -0.5, "win_rate")  # the step's own
    with pytest.raises(ValueError, match=r"persrm_group: with serve_url .* timeout=5 .*--reward.timeout"):
        PersRMGroup(serve_url="http://127.0.0.1:9", timeout=5)


def test_serve_urls_are_normalised_in_one_place():
    assert get_reward_urls(" http://a:1/ ,http://b:2/get_reward,") == ["http://a:1/get_reward", "http://b:2/get_reward"]
    assert PersRMReward.remote_reward_urls({"serve_url": "http://a:1"}) == ["http://a:1/get_reward"]
    assert PersRMReward.remote_reward_urls({"backend": "x"}) is None


@pytest.mark.parametrize("cls", [PersRMReward, PersRMGroup])
def test_both_components_pickle_without_their_backend_or_health(cls):
    plugin = cls(backend="_judge_stubs:StubJudge", backend_config={"bias_a": 1})
    assert plugin.judge.bias_a == 1
    plugin.health.record(1, 1, 2, {"timeout": 2}, {"timeout": "x"})
    clone = pickle.loads(pickle.dumps(plugin))
    assert clone == plugin and clone._runner is not plugin._runner
    assert clone._runner.built_judge is None and clone.health.samples == 0  # rebuilt in the worker
    assert isinstance(clone.judge, StubJudge)


def test_the_server_flags_parse_to_plain_values():
    _, reward = config_from_args(make_parser().parse_args(["--reward.failure_reward", "-0.5",
                                                           "--reward.backend", "x"]))
    assert reward == {"failure_reward": -0.5, "backend": "x"} and type(reward["failure_reward"]) is float
    assert PersRMReward(**reward).failure_reward == -0.5
