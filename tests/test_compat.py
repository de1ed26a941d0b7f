"""Pins every OpenRLHF 0.11.2 fact openrlhf_persrm.compat relies on: an upgrade fails here, loudly."""

import inspect

import pytest

from openrlhf_persrm import OPENRLHF_VERSION, compat

# Flags the wrappers read or set, per launcher.
REQUIRED_FLAGS = {
    "train_sft": ["data.dataset", "eval.dataset", "data.input_key", "data.output_key", "data.apply_chat_template",
                  "data.max_len", "model.model_name_or_path", "ds.attn_implementation", "ds.packing_samples",
                  "ckpt.output_dir"],
    "train_ppo_ray": ["data.prompt_dataset", "eval.dataset", "data.input_key", "data.label_key",
                      "data.apply_chat_template", "data.max_len", "actor.model_name_or_path", "reward.remote_url",
                      "train.agent_func_path", "rollout.n_samples_per_prompt", "algo.advantage.estimator",
                      "vllm.num_engines", "vllm.tensor_parallel_size", "vllm.sync_backend", "train.colocate_all",
                      "train.async_enable"],
}


def test_installed_version_is_the_one_compat_is_written_for():
    assert compat.check_openrlhf_version() == OPENRLHF_VERSION == "0.11.2"


def test_version_mismatch_fails_clearly(monkeypatch):
    monkeypatch.setattr(compat, "installed_openrlhf_version", lambda: "0.12.0")
    monkeypatch.delenv(compat.ENV_ALLOW_MISMATCH, raising=False)
    with pytest.raises(compat.OpenRLHFVersionError, match="0.12.0 is installed but .* written for 0.11.2"):
        compat.check_openrlhf_version()
    monkeypatch.setenv(compat.ENV_ALLOW_MISMATCH, "1")
    assert compat.check_openrlhf_version() == "0.12.0"
    monkeypatch.setattr(compat, "installed_openrlhf_version", lambda: None)
    with pytest.raises(compat.OpenRLHFVersionError, match="not installed"):
        compat.check_openrlhf_version()


@pytest.mark.parametrize("launcher", sorted(REQUIRED_FLAGS))
def test_launcher_parser_is_captured_with_the_flags_we_use(launcher):
    parser = compat.launcher_parser(launcher)
    dests = {a.dest for a in parser._actions}
    missing = [f for f in REQUIRED_FLAGS[launcher] if f not in dests]
    assert not missing, f"OpenRLHF {launcher} no longer has flags {missing}"
    ns = vars(parser.parse_args([]))  # parsing is side-effect free: no training started
    assert ns["data.max_len"] == 2048


def test_ray_env_defaults_match_upstream_train():
    import openrlhf.cli.train_ppo_ray as upstream

    src = inspect.getsource(upstream.train)
    assert "if not ray.is_initialized():" in src, "train() no longer skips ray.init when Ray is up"
    for key, default in compat.RAY_ENV_DEFAULTS.items():
        assert f'"{key}", "{default}"' in src, f"upstream train() no longer sets {key}={default}"


def test_reward_file_contract_upstream():
    """OpenRLHF loads `--reward.remote_url *.py` by path and calls `reward_func` from a thread."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    init = inspect.getsource(SingleTurnAgentExecutor.__init__)
    assert 'endswith(".py")' in init and "reward_module.reward_func" in init
    fetch = inspect.getsource(SingleTurnAgentExecutor._fetch_rewards_via_func)
    assert "asyncio.to_thread" in fetch


def test_unknown_launcher():
    with pytest.raises(ValueError, match="unknown launcher 'train_xyz'; known: train_sft, train_ppo_ray"):
        compat.launcher_parser("train_xyz")
