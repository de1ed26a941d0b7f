"""The file OpenRLHF 0.11.2 loads as ``--reward.remote_url <this file>``.

OpenRLHF imports it by path inside every rollout actor (so only absolute imports work
here) and calls ``reward_func([query], [prompt], [label])`` from threads. The reward
plugin and its configuration come from environment variables, which the launcher wrapper
sets for the driver and every Ray worker:

``PERSRM_REWARD_PLUGIN``
    plugin name, dotted path or file (default ``persrm_rule``);
``PERSRM_REWARD_CONFIG``
    JSON object of keyword arguments for the plugin (default ``{}``);
``PERSRM_REWARD_ON_ERROR``
    reward given if the plugin itself raises unexpectedly (default: the plugin's own
    ``failure_reward`` when it has one, else ``-1.0``; such samples are also counted in the
    ``plugin_error`` log).

The plugin is built when this file is imported, so a plugin that fails to load stops
the run at start-up instead of turning every reward into ``None`` later; a plugin with a
``probe()`` (the ``persrm`` reward: one judgment) is probed then too, so a dead or
misconfigured judge stops the run before training. A plugin that declares its judge down
(:class:`~openrlhf_persrm.judges.faults.JudgeUnavailable`, the stop rule) is not given a
failure reward: the error propagates and OpenRLHF stops the run.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, Sequence

from openrlhf_persrm.contracts import RewardOutput
from openrlhf_persrm.judges.faults import JudgeUnavailable
from openrlhf_persrm.registry import instantiate, reward_plugins

logger = logging.getLogger("openrlhf_persrm.reward")

ENV_PLUGIN = "PERSRM_REWARD_PLUGIN"
ENV_CONFIG = "PERSRM_REWARD_CONFIG"
ENV_ON_ERROR = "PERSRM_REWARD_ON_ERROR"


def load_plugin_from_env(environ: dict[str, str] | None = None) -> Any:
    env = os.environ if environ is None else environ
    name = env.get(ENV_PLUGIN, "persrm_rule")
    raw = env.get(ENV_CONFIG, "") or "{}"
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_CONFIG} is not valid JSON ({exc}): {raw[:200]!r}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{ENV_CONFIG} must be a JSON object, got {raw[:200]!r}")
    return instantiate(reward_plugins, name, config)


def probe_plugin(plugin: Any) -> None:
    """Run the plugin's start-up probe if it has one and wants it (raises when the judge is down)."""
    probe = getattr(plugin, "probe", None)
    if callable(probe) and getattr(plugin, "probe_on_start", False):
        probe()


def on_error_reward(plugin: Any, environ: dict[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    if ENV_ON_ERROR in env:
        return float(env[ENV_ON_ERROR])
    value = getattr(plugin, "failure_reward", None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else -1.0


_PLUGIN = load_plugin_from_env()
probe_plugin(_PLUGIN)
_ON_ERROR = on_error_reward(_PLUGIN)
_KEYS_LOCK = threading.Lock()
_KEYS: tuple[str, ...] | None = None  # extra_logs keys, kept identical for every sample


def _as_output(result: Any, n: int) -> RewardOutput:
    if isinstance(result, RewardOutput):
        return result
    if isinstance(result, dict):  # a plain OpenRLHF-style reward_func
        def as_list(v: Any) -> list[float]:
            if hasattr(v, "tolist"):
                v = v.tolist()
            return [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
        rewards = as_list(result["rewards"])
        scores = as_list(result.get("scores", rewards))
        extra = {k: as_list(v) for k, v in (result.get("extra_logs") or {}).items()}
        return RewardOutput(rewards, scores, extra)
    raise TypeError(f"reward plugin returned {type(result).__name__}; expected RewardOutput")


def as_tensors(out: RewardOutput, keys: Sequence[str], error: float) -> dict:
    """OpenRLHF's answer: ``rewards``, ``scores`` and each ``extra_logs`` key (``keys``, zeros where the
    plugin gave none, plus ``plugin_error``) as float32 tensors of one value per sample.

    All of them are rows of one tensor built in one call: OpenRLHF calls the entry once per
    sample, and a tensor per key (about 20 of them) cost more than the plugin itself.
    """
    import torch

    n = len(out.rewards)
    zeros = [0.0] * n
    logs = out.extra_logs
    rows = torch.tensor([out.rewards, out.scores, *[logs.get(k, zeros) for k in keys], [error] * n],
                        dtype=torch.float32).unbind(0)
    extra = dict(zip(keys, rows[2:-1]))
    extra["plugin_error"] = rows[-1]
    return {"rewards": rows[0], "scores": rows[1], "extra_logs": extra}


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any) -> dict:
    """OpenRLHF's reward-function contract; never raises."""
    global _KEYS
    n = len(queries)
    try:
        out = _as_output(_PLUGIN(queries, prompts, labels, **kwargs), n)
        error = 0.0
    except JudgeUnavailable:
        raise  # the stop rule: the run must end, with the cause (already logged) in the error
    except Exception:
        logger.exception("reward plugin %s raised; giving %s to %d sample(s)",
                         getattr(_PLUGIN, "name", _PLUGIN), _ON_ERROR, n)
        out, error = RewardOutput([_ON_ERROR] * n, [0.0] * n, {}), 1.0
    keys = _KEYS
    if keys is None:
        with _KEYS_LOCK:
            if _KEYS is None and not error:
                _KEYS = tuple(out.extra_logs)
            keys = _KEYS or tuple(out.extra_logs)
    return as_tensors(out, keys, error)
