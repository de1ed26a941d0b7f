"""Launcher wrappers: plugin flags in, OpenRLHF flags out, OpenRLHF's own parser as the judge."""

import json
import os
import subprocess
import sys

import pytest
from conftest import make_pair, write_rows

from openrlhf_persrm.cli import train_ppo_ray, train_sft
from openrlhf_persrm.cli._wrapper import WrapperError


CPU = ["--vllm.num_engines", "1"]  # CPU mode needs an engine for rollouts


def _flag(tokens, flag):
    return tokens[tokens.index(flag) + 1]


def test_reward_plugin_becomes_remote_url_and_env(tmp_path, tiny_model, pairs_file):
    prep = train_ppo_ray.prepare(CPU + [
        "--reward_plugin", "persrm_rule", "--reward_plugin_config", '{"format_penalty": -2}',
        "--dataset_plugin", "persrm_rl", "--data.prompt_dataset", str(pairs_file),
        "--actor.model_name_or_path", tiny_model, "--data.max_len", "4096",
        "--persrm.cache_dir", str(tmp_path / "cache")])
    tokens, env = prep.tokens, prep.env
    assert _flag(tokens, "--reward.remote_url") == train_ppo_ray.reward_entry_file()
    assert env == {"PERSRM_REWARD_PLUGIN": "persrm_rule", "PERSRM_REWARD_CONFIG": '{"format_penalty": -2}'}
    rows_path = _flag(tokens, "--data.prompt_dataset")
    assert rows_path.startswith(str(tmp_path / "cache")) and os.path.exists(rows_path)
    assert _flag(tokens, "--data.input_key") == "prompt" and _flag(tokens, "--data.label_key") == "label"
    assert "--data.apply_chat_template" in tokens
    row = json.loads(open(rows_path).readline())
    assert row["label"]["chosen_position"] in ("A", "B")


def test_converted_datasets_are_cached_by_content(tmp_path, tiny_model, pairs_file):
    args = CPU + ["--dataset_plugin", "persrm_rl", "--data.prompt_dataset", str(pairs_file),
            "--actor.model_name_or_path", tiny_model, "--persrm.cache_dir", str(tmp_path / "c")]
    first = _flag(train_ppo_ray.prepare(args).tokens, "--data.prompt_dataset")
    mtime = os.path.getmtime(first)
    assert _flag(train_ppo_ray.prepare(args).tokens, "--data.prompt_dataset") == first
    assert os.path.getmtime(first) == mtime  # reused, not rewritten
    write_rows(pairs_file, [make_pair(i) for i in range(3)])
    assert _flag(train_ppo_ray.prepare(args).tokens, "--data.prompt_dataset") != first


@pytest.mark.parametrize("extra,match", [
    (["--reward_plugin", "persrm_rule", "--reward.remote_url", "http://x/get_reward"], "keep one"),
    (["--reward_plugin", "no_such"], "unknown reward plugin 'no_such'; known:"),
    (["--reward_plugin_config", "{}"], "--reward_plugin_config needs --reward_plugin"),
    (["--reward_plugin", "persrm_rule", "--reward_plugin_config", "[1]"], "expected a JSON object"),
    (["--reward_plugin", "persrm_rule", "--reward_plugin_config", "{bad"], "not valid JSON"),
    (["--dataset_plugin", "persrm_sft", "--data.prompt_dataset", "PAIRS"], "use a rl dataset plugin"),
    (["--dataset_plugin", "persrm_rl", "--data.prompt_dataset", "PAIRS", "--data.input_key", "question"],
     "--data.input_key 'question' conflicts with --dataset_plugin persrm_rl"),
    (["--dataset_plugin", "persrm_rl", "--data.prompt_dataset", "missing.jsonl"], "give a file path"),
])
def test_ppo_wrapper_errors_name_the_flag(tmp_path, pairs_file, extra, match):
    extra = [str(pairs_file) if e == "PAIRS" else e for e in extra]
    with pytest.raises((WrapperError, ValueError, LookupError), match=match):
        train_ppo_ray.prepare(CPU + extra + ["--persrm.cache_dir", str(tmp_path)])


def test_unknown_openrlhf_flag_is_rejected_by_openrlhfs_parser(capsys):
    with pytest.raises(SystemExit):
        train_sft.prepare(["--no_such_flag", "1"])
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err


def test_sft_cpu_mode_sets_sdpa_and_rejects_flash(tmp_path):
    tokens, cpu = train_sft.prepare(["--cpu"])
    assert cpu and _flag(tokens, "--ds.attn_implementation") == "sdpa"
    with pytest.raises(ValueError, match="flash_attention_2 needs a GPU"):
        train_sft.prepare(["--cpu", "--ds.attn_implementation", "flash_attention_2"])


def test_help_shows_plugin_and_openrlhf_flags():
    for mod in ("train_sft", "train_ppo_ray"):
        out = subprocess.run([sys.executable, "-m", f"openrlhf_persrm.cli.{mod}", "--help"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert "--dataset_plugin" in out.stdout and "--cpu" in out.stdout
        assert ("--reward_plugin" in out.stdout) == (mod == "train_ppo_ray")
        assert "--data.max_len" in out.stdout  # OpenRLHF's own flags follow


@pytest.mark.parametrize("extra,match", [
    ([], "--vllm.num_engines is unset"),
    (CPU + ["--vllm.tensor_parallel_size", "2"], "tensor_parallel_size 2"),
    (CPU + ["--vllm.sync_with_ray"], "--vllm.sync_with_ray"),
    (CPU + ["--train.colocate_all"], "add --vllm.sync_backend gloo"),
    (CPU + ["--data.max_images_per_prompt", "1"], "multimodal"),
    (CPU + ["--ds.packing_samples"], "packing_samples"),
    (CPU + ["--ds.attn_implementation", "flash_attention_2"], "needs a GPU"),
    (CPU + ["--train.enable_ema"], "enable_ema"),
])
def test_cpu_mode_refuses_what_cannot_work_before_ray(extra, match):
    import ray

    with pytest.raises(ValueError, match=match):
        train_ppo_ray.prepare(["--cpu"] + extra)
    assert not ray.is_initialized()


def test_cpu_mode_defaults():
    prep = train_ppo_ray.prepare(["--cpu"] + CPU)
    assert prep.cpu
    assert _flag(prep.tokens, "--ds.attn_implementation") == "sdpa"
    assert _flag(prep.tokens, "--actor.num_gpus_per_node") == "1"
    assert _flag(prep.tokens, "--vllm.sync_backend") == "gloo"
    kept = train_ppo_ray.prepare(["--cpu", "--actor.num_gpus_per_node", "2"] + CPU)
    assert _flag(kept.tokens, "--actor.num_gpus_per_node") == "2"


def test_persrm_served_reward_points_openrlhf_at_the_server(tmp_path, monkeypatch):
    prep = train_ppo_ray.prepare(CPU + ["--reward_plugin", "persrm", "--reward_plugin_config",
                                        '{"serve_url": "http://127.0.0.1:5000/, http://127.0.0.1:5001"}'])
    assert _flag(prep.tokens, "--reward.remote_url") == \
        "http://127.0.0.1:5000/get_reward,http://127.0.0.1:5001/get_reward"
    assert prep.env == {}  # nothing to load in the rollout actors


def test_judge_api_key_stays_out_of_rays_runtime_env(monkeypatch):
    monkeypatch.setenv("PERSRM_JUDGE_API_KEY", "sk-test")
    prep = train_ppo_ray.prepare(CPU + ["--reward_plugin", "persrm", "--reward_plugin_config",
                                        '{"endpoint": "http://127.0.0.1:8000"}'])
    assert "PERSRM_JUDGE_API_KEY" not in prep.env and "sk-test" not in repr(prep.env)  # the dashboard shows env_vars
    assert _flag(prep.tokens, "--reward.remote_url") == train_ppo_ray.reward_entry_file()
