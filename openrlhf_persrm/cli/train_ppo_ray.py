"""``python -m openrlhf_persrm.cli.train_ppo_ray``: OpenRLHF's ``train_ppo_ray`` with PersRM plugins.

Stage 2 of PersRM-R1 (GRPO with the verifiable rule reward)::

    python -m openrlhf_persrm.cli.train_ppo_ray --reward_plugin persrm_rule \\
        --dataset_plugin persrm_rl --data.prompt_dataset rl.jsonl \\
        --actor.model_name_or_path ckpt/persrm-sft --algo.advantage.estimator group_norm \\
        --rollout.n_samples_per_prompt 8  [any other OpenRLHF train_ppo_ray flag]

``--reward_plugin NAME`` becomes ``--reward.remote_url <installed entry file>``; the plugin
name and ``--reward_plugin_config`` reach every Ray worker as environment variables
(``PERSRM_REWARD_PLUGIN``, ``PERSRM_REWARD_CONFIG``) through the Ray runtime environment
this wrapper starts Ray with. With an existing cluster (``ray start`` on every node), the
wrapper connects to it the same way OpenRLHF does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from ._wrapper import (Argv, WrapperError, check_reparse, convert_datasets, load_json_config, logger,
                       namespace_dict, plugin_parser, prepare_trainer_plugins, wrapper_main)

LAUNCHER = "train_ppo_ray"


def reward_entry_file() -> str:
    """Path of the file OpenRLHF loads as ``--reward.remote_url`` (found without importing it)."""
    spec = importlib.util.find_spec("openrlhf_persrm.rewards.openrlhf_entry")
    assert spec is not None and spec.origin is not None
    return spec.origin


@dataclass
class Prepared:
    """OpenRLHF's argv, env vars for every worker, whether to run on CPU, and the parsed flags."""

    tokens: list[str]
    env: dict[str, str]
    cpu: bool
    ns: dict[str, Any]


def prepare(argv: Sequence[str]) -> Prepared:
    """Translate plugin flags into OpenRLHF flags and worker env vars; check CPU-mode limits."""
    from .. import compat

    ours, rest = plugin_parser(LAUNCHER, reward=True).parse_known_args(list(argv))
    from ..cpu.mode import choose_cpu

    cpu = choose_cpu(LAUNCHER, cpu=ours.cpu, gpu=ours.gpu, uses_ray=True)
    parser = compat.launcher_parser(LAUNCHER)
    ns = namespace_dict(parser, rest)
    out = Argv(list(rest))
    env: dict[str, str] = {}

    if ours.dataset_plugin:
        convert_datasets(ours.dataset_plugin, load_json_config(ours.dataset_plugin_config, "--dataset_plugin_config"),
                         "rl", ns, out, ["--data.prompt_dataset", "--eval.dataset"],
                         ns.get("actor.model_name_or_path"), ours.cache_dir)
    elif ours.dataset_plugin_config:
        raise WrapperError("--dataset_plugin_config needs --dataset_plugin")

    if ours.reward_plugin:
        if ns.get("reward.remote_url") or out.given("--reward.remote_url"):
            raise WrapperError("--reward_plugin and --reward.remote_url both name the reward; keep one "
                               "(--reward_plugin sets --reward.remote_url itself)")
        if ns.get("train.agent_func_path"):
            raise WrapperError("--reward_plugin does not combine with --train.agent_func_path "
                               "(OpenRLHF then ignores --reward.remote_url)")
        config = load_json_config(ours.reward_plugin_config, "--reward_plugin_config")
        from ..registry import instantiate, portable_spec, reward_plugins

        # Plugin files travel to Ray workers, whose working directory is not ours: absolute paths.
        spec = portable_spec(ours.reward_plugin)
        if "backend" in config:
            config["backend"] = portable_spec(config["backend"])

        instantiate(reward_plugins, ours.reward_plugin, config)  # fail here, not inside a Ray actor
        remote = getattr(reward_plugins.resolve(ours.reward_plugin), "remote_reward_urls", None)
        urls = remote(config) if remote is not None else None
        if urls:  # the plugin is served (e.g. `persrm serve`): OpenRLHF's own HTTP client calls it
            out.set("--reward.remote_url", ",".join(urls))
            logger.info("reward plugin %s is served at %s", ours.reward_plugin, ", ".join(urls))
        else:
            out.set("--reward.remote_url", reward_entry_file())
            env["PERSRM_REWARD_PLUGIN"] = spec
            env["PERSRM_REWARD_CONFIG"] = json.dumps(config)
            # A judge's API key is never put in Ray's runtime_env (the dashboard shows it): workers of a
            # Ray started here inherit it from this process; on a `ray start` cluster use the reward's
            # api_key_file (or set the variable on every node).
    elif ours.reward_plugin_config:
        raise WrapperError("--reward_plugin_config needs --reward_plugin")

    trainer_env, trainer_plugins = prepare_trainer_plugins(ours.trainer_plugin, ours.trainer_plugin_config, "rl", ns)
    env.update(trainer_env)
    providers = [p.name for p in trainer_plugins if getattr(p, "provides_rewards", False)]
    if providers and not (ours.reward_plugin or out.given("--reward.remote_url")
                          or ns.get("reward.model_name_or_path")):
        # OpenRLHF needs a per-sample reward; the trainer plugin replaces it before advantages.
        from ..trainers.hooks import PENDING_REWARD

        out.set("--reward.remote_url", reward_entry_file())
        env["PERSRM_REWARD_PLUGIN"] = PENDING_REWARD
        env["PERSRM_REWARD_CONFIG"] = "{}"
        logger.info("trainer plugin %s sets the rewards; OpenRLHF's per-sample reward is a placeholder (0)",
                    ", ".join(providers))

    if cpu:
        from ..cpu.mode import check_flags

        check_flags(ns, out)
    final = check_reparse(parser, out)
    return Prepared(out.tokens, env, cpu, final)


def init_ray(env: dict[str, str], **ray_kwargs) -> None:
    """Start (or join) Ray with OpenRLHF's own runtime env plus ours, before OpenRLHF's ``train``.

    ``train`` skips its ``ray.init`` when Ray is up, so we pass the variables it would have.
    """
    import ray

    from .. import compat

    if ray.is_initialized():
        return
    env_vars = {k: os.environ.get(k, v) for k, v in compat.RAY_ENV_DEFAULTS.items()}
    env_vars.update(env)
    runtime_env = dict(ray_kwargs.pop("runtime_env", {}) or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env_vars}
    # a reward that cannot be computed ends the run with its cause, in every rollout actor
    runtime_env.setdefault("worker_process_setup_hook", compat.REWARD_FAILURES_HOOK)
    ray.init(runtime_env=runtime_env, **ray_kwargs)


def run(prep: Prepared) -> int:
    from .. import compat

    os.environ.update(prep.env)
    # Trainer plugins and the step health check run inside OpenRLHF's PPO trainer actor.
    compat.install_trainer_hooks(LAUNCHER)
    compat.stop_when_a_rollout_engine_cannot_start()
    if prep.cpu:
        from ..cpu import mode as cpu_mode

        return cpu_mode.run_ppo(prep.tokens, prep.env, prep.ns)
    init_ray(prep.env)
    compat.run_launcher(LAUNCHER, prep.tokens)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return wrapper_main(LAUNCHER, argv, reward=True, prepare=prepare, run=run)


if __name__ == "__main__":
    sys.exit(main())
