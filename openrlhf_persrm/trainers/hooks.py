"""Loading trainer plugins and running their hooks; no OpenRLHF here (that is in ``compat``).

The launcher wrappers pass ``--trainer_plugin`` and ``--trainer_plugin_config`` to the process
that runs the training loop as environment variables (``train_ppo_ray``: every Ray worker, like
the reward plugin; ``train_sft``: the process itself):

``PERSRM_TRAINER_PLUGIN``
    comma-separated plugin names, dotted paths or files;
``PERSRM_TRAINER_CONFIG``
    a JSON object: with one plugin, its keyword arguments; with several, one object per plugin,
    keyed by the name as given (``{"persrm_eval": {...}, "persrm_order_consistency": {...}}``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..contracts import GenerateFn, RolloutStep, StepResult, TrainerPlugin

logger = logging.getLogger("openrlhf_persrm.trainers")

ENV_PLUGINS = "PERSRM_TRAINER_PLUGIN"
ENV_CONFIG = "PERSRM_TRAINER_CONFIG"


def split_specs(raw: str | None) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` (empty entries dropped)."""
    return [s.strip() for s in (raw or "").split(",") if s.strip()]


def configs_for(specs: Sequence[str], config: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Each plugin's keyword arguments from one ``--trainer_plugin_config`` object.

    >>> configs_for(["persrm_eval"], {"eval_steps": 2})
    [{'eval_steps': 2}]
    >>> configs_for(["a", "b"], {"b": {"x": 1}})
    [{}, {'x': 1}]
    """
    config = dict(config or {})
    if len(specs) == 1:
        only = specs[0]
        if set(config) == {only} and isinstance(config[only], dict):
            return [dict(config[only])]
        return [config]
    unknown = [k for k in config if k not in specs]
    if unknown:
        raise ValueError(f"--trainer_plugin_config: with several trainer plugins the config is one object per "
                         f"plugin, keyed by the names given to --trainer_plugin ({', '.join(specs)}); "
                         f"unknown keys: {', '.join(unknown)}")
    out = []
    for spec in specs:
        value = config.get(spec, {})
        if not isinstance(value, dict):
            raise ValueError(f"--trainer_plugin_config: the entry for {spec!r} must be a JSON object, got {value!r}")
        out.append(dict(value))
    return out


def load_plugins(specs: Sequence[str], config: Mapping[str, Any] | None, stage: str) -> list[TrainerPlugin]:
    """Construct the plugins; one that does not support ``stage`` is refused, naming it."""
    from ..registry import instantiate, trainer_plugins

    plugins = []
    for spec, kwargs in zip(specs, configs_for(specs, config)):
        plugin = instantiate(trainer_plugins, spec, kwargs)
        stages = tuple(getattr(plugin, "stages", ()))
        if stage not in stages:
            launcher = "train_sft" if stage == "sft" else "train_ppo_ray"
            raise ValueError(f"--trainer_plugin {spec}: works in stage(s) {', '.join(stages)}, not with {launcher}")
        plugins.append(plugin)
    return plugins


def plugins_from_env(stage: str, environ: Mapping[str, str] | None = None) -> list[TrainerPlugin]:
    env = os.environ if environ is None else environ
    specs = split_specs(env.get(ENV_PLUGINS))
    if not specs:
        return []
    raw = env.get(ENV_CONFIG) or "{}"
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_CONFIG} is not valid JSON ({exc}): {raw[:200]!r}") from None
    return load_plugins(specs, config, stage)


@dataclass
class HookRunner:
    """Runs the hooks of several plugins in order; what one changes, the next sees."""

    plugins: list[TrainerPlugin]
    stage: str
    best_value: float = float("-inf")
    best_step: int | None = None
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    # ------------------------------------------------------------------ rollout steps
    def rollout_step(self, step: RolloutStep) -> StepResult:
        """Chain ``on_rollout_step`` over the plugins; the final rewards and all metrics."""
        rewards = list(step.rewards)
        metrics: dict[str, float] = {}
        changed = False
        for plugin in self.plugins:
            current = RolloutStep(step.global_step, [_with_reward(s, r) for s, r in zip(step.samples, rewards)],
                                  step.n_samples_per_prompt, step.max_new_tokens)
            result = plugin.on_rollout_step(step=current)
            if result is None:
                continue
            if not isinstance(result, StepResult):
                raise TypeError(f"trainer plugin {plugin.name}: on_rollout_step returned {type(result).__name__}; "
                                "expected StepResult or None")
            if result.rewards is not None:
                new = [float(r) for r in result.rewards]
                if len(new) != len(rewards):
                    raise ValueError(f"trainer plugin {plugin.name}: on_rollout_step returned {len(new)} rewards "
                                     f"for {len(rewards)} samples")
                bad = [r for r in new if not math.isfinite(r)]
                if bad:
                    raise ValueError(f"trainer plugin {plugin.name}: on_rollout_step returned non-finite rewards "
                                     f"{bad[:3]}")
                rewards, changed = new, True
            for key, value in (result.metrics or {}).items():
                metrics[str(key)] = float(value)
        return StepResult(rewards if changed else None, metrics)

    def twin_key(self, label: Any) -> str | None:
        keys = [k for k in (p.twin_key(label=label) for p in self.plugins) if k is not None]
        return "\x1f".join(str(k) for k in keys) if keys else None

    @property
    def wants_twins(self) -> bool:
        return any(type(p).twin_key is not TrainerPlugin.twin_key for p in self.plugins)

    # ------------------------------------------------------------------ evaluation
    def eval_due(self, global_step: int) -> list[TrainerPlugin]:
        return [p for p in self.plugins if getattr(p, "eval_steps", 0) and global_step % int(p.eval_steps) == 0]

    @property
    def best_metric(self) -> str | None:
        for p in self.plugins:
            if getattr(p, "best_metric", None):
                return str(p.best_metric)
        return None

    def evaluate(self, global_step: int, generate: GenerateFn) -> dict[str, float]:
        """Run the due ``on_evaluate`` hooks; their merged metrics (empty when none was due)."""
        metrics: dict[str, float] = {}
        for plugin in self.eval_due(global_step):
            out = plugin.on_evaluate(stage=self.stage, global_step=global_step, generate=generate)
            for key, value in (out or {}).items():
                metrics[str(key)] = float(value)
        if metrics:
            self.history.append((global_step, dict(metrics)))
        return metrics

    def is_new_best(self, global_step: int, metrics: Mapping[str, float]) -> bool:
        """Whether ``metrics`` beat every earlier evaluation on :attr:`best_metric` (strictly)."""
        key = self.best_metric
        if key is None or key not in metrics or not math.isfinite(metrics[key]):
            return False
        if metrics[key] > self.best_value:
            self.best_value, self.best_step = float(metrics[key]), global_step
            return True
        return False


def _with_reward(sample: Any, reward: float) -> Any:
    from dataclasses import replace

    return replace(sample, reward=reward)


class PendingReward:
    """The reward OpenRLHF computes per sample while a trainer plugin that ``provides_rewards`` sets the
    real one before advantages (``persrm_group``): 0 for every sample. Used by the wrapper only when no
    ``--reward_plugin`` is given."""

    name = "persrm_pending"

    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any):
        from ..contracts import RewardOutput

        n = len(queries)
        return RewardOutput([0.0] * n, [0.5] * n)


PENDING_REWARD = "openrlhf_persrm.trainers.hooks:PendingReward"
