"""--trainer_plugin and --trainer_plugin_config on both launcher wrappers (no training)."""

import json
import os

import pytest
from conftest import make_pair, write_rows

from openrlhf_persrm.cli import train_ppo_ray, train_sft
from openrlhf_persrm.cli._wrapper import WrapperError
from openrlhf_persrm.trainers.hooks import ENV_CONFIG, ENV_PLUGINS, PENDING_REWARD, plugins_from_env

CPU = ["--vllm.num_engines", "1"]


def _flag(tokens, flag):
    return tokens[tokens.index(flag) + 1]


def test_trainer_plugins_reach_the_workers_with_absolute_paths(tmp_path, monkeypatch):
    write_rows(tmp_path / "val.jsonl", [make_pair(0)])
    monkeypatch.chdir(tmp_path)
    config = {"persrm_eval": {"pairs": "val.jsonl", "eval_steps": 3}, "persrm_order_consistency": {"bonus": 1}}
    prep = train_ppo_ray.prepare(CPU + ["--reward_plugin", "persrm_rule", "--trainer_plugin",
                                        "persrm_eval, persrm_order_consistency", "--trainer_plugin_config",
                                        json.dumps(config), "--rollout.batch_size", "4"])
    assert prep.env[ENV_PLUGINS] == "persrm_eval,persrm_order_consistency"
    shipped = json.loads(prep.env[ENV_CONFIG])
    assert shipped["persrm_eval"]["pairs"] == str(tmp_path / "val.jsonl")
    assert prep.env["PERSRM_REWARD_PLUGIN"] == "persrm_rule"
    # what a worker builds from those variables, wherever it runs
    monkeypatch.chdir("/")
    plugins = plugins_from_env("rl", prep.env)
    assert [p.name for p in plugins] == ["persrm_eval", "persrm_order_consistency"]
    assert plugins[0].eval_steps == 3 and plugins[1].bonus == 1


def test_group_plugin_without_a_reward_gets_the_placeholder():
    config = {"endpoint": "http://127.0.0.1:9", "served_model": "persrm", "strategy": "all_pairs"}
    prep = train_ppo_ray.prepare(CPU + ["--trainer_plugin", "persrm_group", "--trainer_plugin_config",
                                        json.dumps(config)])
    assert _flag(prep.tokens, "--reward.remote_url") == train_ppo_ray.reward_entry_file()
    assert prep.env["PERSRM_REWARD_PLUGIN"] == PENDING_REWARD


@pytest.mark.parametrize("extra, match", [
    (["--trainer_plugin", "persrm_order_consistency", "--rollout.batch_size", "3"], "even --rollout.batch_size"),
    (["--trainer_plugin", "persrm_order_consistency", "--algo.dynamic_filtering_enable",
      "--rollout.batch_size", "2"], "dynamic_filtering"),
    (["--trainer_plugin", "persrm_order_consistency", "--train.async_enable"], "synchronous PPO trainer"),
    (["--trainer_plugin", "no_such_plugin"], "unknown trainer plugin 'no_such_plugin'; known: .*persrm_eval"),
    (["--trainer_plugin_config", "{}"], "needs --trainer_plugin"),
    (["--trainer_plugin", "persrm_eval", "--trainer_plugin_config", '{"eval_steps": 2}'], "persrm_eval: set pairs"),
    (["--trainer_plugin", "persrm_group", "--trainer_plugin_config", '{"backend": "x", "kk": 1}'],
     "rejects its configuration.*Accepted keys"),
    # a judge that cannot start is refused here, not by every judgment later inside Ray
    (["--trainer_plugin", "persrm_group", "--trainer_plugin_config", '{"backend": "local"}'],
     "backend='local' without a checkpoint; set model=PATH"),
    (["--trainer_plugin", "persrm_group", "--trainer_plugin_config", '{"model": "/no/such/judge"}'],
     "model='/no/such/judge' is not a local checkpoint folder"),
    (["--trainer_plugin", "persrm_group", "--trainer_plugin_config", '{"backend": "x", "timeout": 0}'],
     "persrm_group: timeout=0; use a positive number"),
])
def test_bad_trainer_flags_fail_in_the_wrapper(extra, match):
    with pytest.raises((WrapperError, ValueError), match=match):
        train_ppo_ray.prepare(CPU + ["--reward_plugin", "persrm_rule"] + extra)


def test_sft_wrapper_sets_the_plugins_for_its_own_process(tmp_path, monkeypatch):
    val = write_rows(tmp_path / "val.jsonl", [make_pair(0)])
    monkeypatch.delenv(ENV_PLUGINS, raising=False)
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    train_sft.prepare(["--cpu", "--trainer_plugin", "persrm_eval", "--trainer_plugin_config",
                       json.dumps({"pairs": str(val)})])
    assert os.environ[ENV_PLUGINS] == "persrm_eval"
    with pytest.raises(ValueError, match="persrm_group: works in stage.*rl, not with train_sft"):
        train_sft.prepare(["--cpu", "--trainer_plugin", "persrm_group", "--trainer_plugin_config",
                           '{"backend": "x"}'])
    train_sft.prepare(["--cpu"])
    assert ENV_PLUGINS not in os.environ  # no stale plugins from an earlier call
