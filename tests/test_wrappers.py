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
        assert "--gpu" in out.stdout
        # the plugin lists come from the registries, third-party plugins included
        text = " ".join(out.stdout.split())
        for name in ("persrm_sft", "persrm_rl", "persrm_policy", "example_plain_sft"):
            assert name in text, (name, mod)
        if mod == "train_ppo_ray":
            for name in ("persrm_rule", "persrm,", "example_length"):
                assert name in text, name


def test_help_lists_match_the_registries():
    from openrlhf_persrm.cli._wrapper import plugin_parser
    from openrlhf_persrm.registry import dataset_plugins, reward_plugins

    helps = {a.dest: a.help for a in plugin_parser("train_ppo_ray", reward=True)._actions}
    assert dataset_plugins.available() == dataset_plugins.names()
    assert reward_plugins.available() == reward_plugins.names()
    for name in dataset_plugins.names():
        assert name in helps["dataset_plugin"]
    for name in reward_plugins.names():
        assert name in helps["reward_plugin"]


# ----------------------------------------------------------------- CPU or GPU: never a silent fallback

@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    """This process sees no GPU (as on this CPU machine) and no `ray start` cluster."""
    from openrlhf_persrm import compat

    monkeypatch.setattr(compat, "has_cuda", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))


@pytest.fixture
def listening_port():
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv.getsockname()[1]
    srv.close()


def test_cpu_mode_is_automatic_only_without_gpu_and_cluster(no_gpu, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="openrlhf_persrm")
    assert train_ppo_ray.prepare(CPU).cpu
    assert train_sft.prepare([])[1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("CPU mode" in r.getMessage() and "no Ray cluster reachable" in r.getMessage()
               and "--gpu" in r.getMessage() for r in warnings), [r.getMessage() for r in warnings]
    assert any("train_sft" in r.getMessage() and "torch.cuda.is_available() is False" in r.getMessage()
               for r in warnings)


def test_reachable_ray_cluster_keeps_gpu_mode(no_gpu, listening_port, monkeypatch, caplog, tmp_path):
    import logging

    caplog.set_level(logging.WARNING, logger="openrlhf_persrm")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{listening_port}")
    prep = train_ppo_ray.prepare(CPU)
    assert not prep.cpu and "--ds.attn_implementation" not in prep.tokens
    assert any(f"Ray cluster at 127.0.0.1:{listening_port}" in r.getMessage() for r in caplog.records)
    # a cluster started with `ray start` on this machine (its address file), RAY_ADDRESS unset
    monkeypatch.delenv("RAY_ADDRESS")
    (tmp_path / "raytmp" / "ray").mkdir(parents=True)
    (tmp_path / "raytmp" / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{listening_port}\n")
    assert not train_ppo_ray.prepare(CPU).cpu
    assert train_ppo_ray.prepare(["--cpu"] + CPU).cpu  # --cpu still wins


def test_gpu_flag_and_dead_ray_address_fail_clearly(no_gpu, monkeypatch):
    with pytest.raises(ValueError, match="--gpu: no GPU available to train_ppo_ray"):
        train_ppo_ray.prepare(["--gpu"] + CPU)
    with pytest.raises(ValueError, match="--gpu: no GPU available to train_sft"):
        train_sft.prepare(["--gpu"])
    with pytest.raises(ValueError, match="--cpu and --gpu contradict"):
        train_sft.prepare(["--gpu", "--cpu"])
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{dead}")
    with pytest.raises(ValueError, match=f"RAY_ADDRESS=127.0.0.1:{dead} names a Ray cluster that does not answer"):
        train_ppo_ray.prepare(CPU)
    out = subprocess.run([sys.executable, "-m", "openrlhf_persrm.cli.train_sft", "--gpu"], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 2 and "--gpu: no GPU available" in out.stderr, out.stderr[-2000:]


def test_file_plugins_travel_as_absolute_paths(tmp_path, monkeypatch):
    plugin = tmp_path / "my_reward.py"
    plugin.write_text(
        "from openrlhf_persrm.contracts import RewardOutput\n"
        "class MyReward:\n"
        "    name = 'my_reward'\n"
        "    def __call__(self, queries, prompts, labels, **kwargs):\n"
        "        return RewardOutput([0.0] * len(queries))\n")
    monkeypatch.chdir(tmp_path)
    prep = train_ppo_ray.prepare(CPU + ["--reward_plugin", "my_reward.py:MyReward"])
    assert prep.env["PERSRM_REWARD_PLUGIN"] == f"{plugin}:MyReward"
    # ... and resolve from any other working directory, as a Ray worker's
    monkeypatch.chdir("/")
    from openrlhf_persrm.registry import instantiate, reward_plugins

    assert type(instantiate(reward_plugins, prep.env["PERSRM_REWARD_PLUGIN"])).__name__ == "MyReward"


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


def test_readme_documents_the_cpu_judge_the_plugins_and_the_layout():
    """README step 4 shows the CPU path; the Layout table names every subpackage; every plugin is named."""
    import re
    from pathlib import Path

    from openrlhf_persrm.registry import dataset_plugins, judge_backends, reward_plugins

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    step4 = readme[readme.index("**4. PersRM as the generative reward"):readme.index("**5. Evaluation**")]
    assert re.search(r"--reward_plugin_config '\{\"model\": ", step4) and "--reward.model" in step4
    layout = readme[readme.index("## Layout"):]
    for pkg in sorted(p.parent.name for p in (root / "openrlhf_persrm").glob("*/__init__.py")):
        assert f"openrlhf_persrm/{pkg}/" in layout, pkg
    for module in ("serve.py", "pipeline.py", "compat.py"):
        assert module in layout, module
    for name in reward_plugins.names() + dataset_plugins.names() + judge_backends.names():
        if not name.startswith("example_"):  # tests/plugin_pkg's
            assert f"`{name}`" in layout, name
    recipes = (root / "recipes" / "README.md").read_text(encoding="utf-8")
    assert "the directory you run" in recipes and "--dry_run" in recipes


def test_a_run_that_a_reward_stopped_ends_with_the_cause_last(capsys):
    from openrlhf_persrm.cli._wrapper import wrapper_main
    from openrlhf_persrm.compat import RewardUnavailable

    def stopped(prepared):
        try:
            raise RewardUnavailable("no reward for a sample: JudgeUnavailable: the judge failed 100%")
        except RewardUnavailable as exc:
            raise ValueError("reward_model_group is required") from exc  # however OpenRLHF wraps it

    assert wrapper_main("train_ppo_ray", [], reward=True, prepare=lambda argv: None, run=stopped) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "error: train_ppo_ray stopped: no reward for a sample: JudgeUnavailable: the judge failed 100%"

    def broken(prepared):
        raise KeyError("a bug, not a reward")

    with pytest.raises(KeyError):  # anything else keeps its own traceback and exit status
        wrapper_main("train_ppo_ray", [], reward=True, prepare=lambda argv: None, run=broken)


def test_ray_workers_started_by_the_wrapper_surface_reward_failures(monkeypatch):
    import ray

    from openrlhf_persrm import compat

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    train_ppo_ray.init_ray({"PERSRM_REWARD_PLUGIN": "persrm"})
    assert seen["runtime_env"]["worker_process_setup_hook"] == compat.REWARD_FAILURES_HOOK
    assert seen["runtime_env"]["env_vars"]["PERSRM_REWARD_PLUGIN"] == "persrm"
    module, _, name = compat.REWARD_FAILURES_HOOK.rpartition(".")
    assert getattr(__import__(module, fromlist=[name]), name) is compat.surface_reward_failures
