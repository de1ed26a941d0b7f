"""The whole extension contract of openrlhf-persrm, in one file of typed, documented stubs.

Four kinds of plugin exist, each with a registry (``openrlhf_persrm.registry``) fed by an
entry-point group:

=================  ===============================  ==========================================
kind               entry-point group                what the entry point names
=================  ===============================  ==========================================
reward plugin      ``openrlhf_persrm.rewards``      a :class:`RewardPlugin` class (or factory)
dataset plugin     ``openrlhf_persrm.datasets``     a :class:`DatasetPlugin` class (or factory)
judge backend      ``openrlhf_persrm.judges``       a :class:`JudgeBackend` class (or factory)
trainer plugin     ``openrlhf_persrm.trainers``     a :class:`TrainerPlugin` subclass (or factory)
=================  ===============================  ==========================================

A plugin class is constructed with keyword arguments only (its configuration, from
``--reward_plugin_config`` / ``--dataset_plugin_config`` / ``--trainer_plugin_config`` JSON), so it must be a class or
factory whose parameters all have defaults. Instances must pickle: Ray ships them to
workers, so use small callable classes, not closures.

Plugins are checked when they register (:func:`check_reward_plugin`,
:func:`check_dataset_plugin`, :func:`check_trainer_plugin`); a bad one is rejected with an error naming the plugin and
the signature it should have.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Protocol, Sequence, runtime_checkable


class PluginError(TypeError):
    """A plugin does not honour its contract; raised when it registers or loads."""


# --------------------------------------------------------------------------- rewards

@dataclass
class RewardOutput:
    """What a reward plugin returns for a batch: one entry per sample.

    ``rewards`` feed the advantage estimator; ``scores`` lie in [0, 1] (OpenRLHF uses them
    for dynamic filtering and logging); ``extra_logs`` map a metric name to one value per
    sample and are averaged into OpenRLHF's logs.
    """

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.rewards)
        if len(self.scores) != n or any(len(v) != n for v in self.extra_logs.values()):
            raise ValueError("rewards, scores and every extra_logs entry need one value per sample")


@runtime_checkable
class RewardPlugin(Protocol):
    """A reward over a batch of rollouts, in OpenRLHF 0.11.2's reward-function shape.

    Called as ``plugin(queries, prompts, labels)`` where ``query`` is prompt + response
    (decoded with special tokens kept), ``prompt`` the prompt text and ``label`` the row's
    label (any JSON value; dicts pass through). OpenRLHF calls it one sample at a time, in
    threads, inside the rollout actors: it must be synchronous and thread-safe, and it must
    not raise (an exception silently becomes a missing reward upstream). Return a
    :class:`RewardOutput`.
    """

    name: str

    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any],
                 **kwargs: Any) -> RewardOutput: ...

    # Optional, on the class: ``remote_reward_urls(config) -> list[str] | None``. When it returns
    # URLs for a configuration, the launcher wrapper gives them to OpenRLHF as
    # ``--reward.remote_url`` (OpenRLHF's own HTTP client, remote-RM protocol) instead of loading
    # the plugin in the rollout actors: the plugin is served elsewhere (``persrm serve``).


# --------------------------------------------------------------------------- datasets

@dataclass(frozen=True)
class DatasetFlags:
    """The OpenRLHF data flags that make its own dataset classes read a converted file."""

    input_key: str
    output_key: str | None = None
    label_key: str | None = None
    apply_chat_template: bool = True

    def as_argv(self) -> dict[str, str | bool]:
        out: dict[str, str | bool] = {"--data.input_key": self.input_key}
        if self.output_key:
            out["--data.output_key"] = self.output_key
        if self.label_key:
            out["--data.label_key"] = self.label_key
        if self.apply_chat_template:
            out["--data.apply_chat_template"] = True
        return out


@runtime_checkable
class DatasetPlugin(Protocol):
    """Turns PersRM pair JSONL into rows that OpenRLHF's own dataset classes read.

    ``stage`` is ``"sft"`` (rows for ``SFTDataset``) or ``"rl"`` (rows for
    ``PromptDataset``). ``convert`` reads ``src`` and writes ``dst`` (atomically), and
    returns the number of rows; ``tokenizer`` is the model's tokenizer (or None) so the
    plugin can fit prompts into ``max_len`` tokens. ``flags`` are the OpenRLHF data flags
    that make its dataset classes read ``dst``.
    """

    name: str
    stage: str
    flags: DatasetFlags

    def convert(self, src: str, dst: str, *, tokenizer: Any = None, max_len: int | None = None) -> int: ...


# --------------------------------------------------------------------------- judges

@dataclass(frozen=True)
class JudgeRequest:
    """One pairwise judgment to make: chat messages in the judge format."""

    messages: list[dict[str, str]]
    max_new_tokens: int = 512
    temperature: float = 0.0
    seed: int | None = None


class JudgeError(RuntimeError):
    """No judge output for a request: a timeout, a transport error after retries, a prompt the
    backend cannot take. Backends return it in place of the text (see :class:`JudgeBackend`)."""


@runtime_checkable
class JudgeBackend(Protocol):
    """Produces judge output text for judge-format prompts (a served model or a local one).

    ``generate`` returns one entry per request, in order: the output text, or a
    :class:`JudgeError` *instance* for a request that could not be served, so one timeout
    does not cost the other judgments of the batch. Raising fails the whole batch and is
    for a backend that cannot serve at all. Backends are called from many threads at once
    (OpenRLHF scores samples in threads) and should batch concurrent calls together; they
    are constructed with keyword arguments only and must pickle, so models and clients are
    created on first use.
    """

    name: str

    def generate(self, requests: Sequence[JudgeRequest]) -> list[str | JudgeError]: ...


# --------------------------------------------------------------------------- trainers

@dataclass
class RolloutSample:
    """One sample of a rollout step, as the experience maker holds it before advantages.

    ``response`` is decoded without special tokens; ``group`` numbers the prompt group (the
    ``--rollout.n_samples_per_prompt`` samples of one prompt share it).
    """

    prompt: str
    response: str
    label: Any
    reward: float
    truncated: bool = False
    group: int = 0


@dataclass
class RolloutStep:
    """A whole rollout step: every sample with its prompt, label, response and current reward.

    Samples of one prompt are contiguous and share ``group``. ``global_step`` is the step the
    update from these samples will be (1 for the first).
    """

    global_step: int
    samples: list[RolloutSample]
    n_samples_per_prompt: int = 1
    max_new_tokens: int | None = None

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]

    def groups(self) -> list[list[int]]:
        """Sample indices by prompt group, in order of first appearance."""
        out: dict[int, list[int]] = {}
        for i, s in enumerate(self.samples):
            out.setdefault(s.group, []).append(i)
        return list(out.values())

    def pairs(self) -> dict[str, dict[str, list[int]]]:
        """Sample indices by pair and A/B order: ``{pair_id: {"A": [...], "B": [...]}}``.

        A pair is identified by its label's ``pair_id`` and the order by ``chosen_position`` (the
        ``persrm_rl`` label); samples whose label has neither are left out.
        """
        out: dict[str, dict[str, list[int]]] = {}
        for i, s in enumerate(self.samples):
            label = s.label
            if isinstance(label, str):
                try:
                    import json

                    label = json.loads(label)
                except ValueError:
                    continue
            if not isinstance(label, dict):
                continue
            pid, pos = label.get("pair_id"), label.get("chosen_position")
            if pid is None or pos not in ("A", "B"):
                continue
            out.setdefault(str(pid), {"A": [], "B": []})[pos].append(i)
        return out


@dataclass
class StepResult:
    """What :meth:`TrainerPlugin.on_rollout_step` changes: new rewards (one per sample, or None to
    keep them) and metrics logged with the step (scalars, in OpenRLHF's per-step logs)."""

    rewards: list[float] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class GenerateFn(Protocol):
    """Greedy generation with the model being trained: chat messages in, response texts out."""

    def __call__(self, prompts: Sequence[list[dict[str, str]]], *, max_new_tokens: int,
                 batch_size: int = 8) -> list[str]: ...


#: Hook name -> the keyword arguments it is called with.
TRAINER_HOOKS: dict[str, tuple[str, ...]] = {
    "on_rollout_step": ("step",),
    "on_evaluate": ("stage", "global_step", "generate"),
    "twin_key": ("label",),
}


class TrainerPlugin:
    """Hooks into OpenRLHF's training loops; one class of named events with no-op defaults.

    Subclass it and override only what you need (the shape of transformers' ``TrainerCallback``).
    Every hook is called with keyword arguments and returns what it changes, never mutating its
    inputs. A plugin is constructed with its ``--trainer_plugin_config`` as keyword arguments, in
    the process that runs the loop (the PPO trainer Ray actor for ``train_ppo_ray``, every rank for
    ``train_sft``), so it must pickle and defer heavy imports.

    Class attributes:

    ``name``
        short name (also the registry name of the built-ins);
    ``stages``
        the stages it works in: ``"sft"`` (``train_sft``), ``"rl"`` (``train_ppo_ray``);
    ``provides_rewards``
        its :meth:`on_rollout_step` sets every reward, so ``train_ppo_ray`` needs no
        ``--reward_plugin`` (the wrapper gives OpenRLHF a zero placeholder reward);
    ``eval_steps`` (instance)
        :meth:`on_evaluate` runs every this many steps (0: never);
    ``best_metric`` (instance)
        a key of :meth:`on_evaluate`'s metrics; the checkpoint where it is highest is kept as the
        best one (OpenRLHF's own best-checkpoint tracking in ``train_ppo_ray``).
    """

    name: ClassVar[str] = "trainer_plugin"
    stages: ClassVar[tuple[str, ...]] = ("sft", "rl")
    provides_rewards: ClassVar[bool] = False
    eval_steps: int = 0
    best_metric: str | None = None

    def twin_key(self, *, label: Any) -> str | None:
        """Rows whose labels share a key land in the same rollout step (e.g. both A/B orders of a
        pair). None: no constraint. ``train_ppo_ray`` only."""
        return None

    def on_rollout_step(self, *, step: RolloutStep) -> StepResult | None:
        """A whole rollout step before advantages: return new rewards and/or metrics, or None."""
        return None

    def on_evaluate(self, *, stage: str, global_step: int, generate: GenerateFn) -> dict[str, float] | None:
        """Every ``eval_steps`` steps: metrics (scalars) for OpenRLHF's logs, or None."""
        return None


# --------------------------------------------------------------------------- checks

def accepts_keyword(fn: Any, name: str) -> bool:
    """Whether ``fn`` takes the keyword argument ``name`` (by name or through ``**kwargs``); False
    when its signature cannot be read. The one check callers use before passing an optional keyword.

    >>> accepts_keyword(lambda requests, deadline=None: None, "deadline"), accepts_keyword(print, "deadline")
    (True, False)
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return (name in params and params[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     inspect.Parameter.KEYWORD_ONLY)) \
        or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _factory_ok(obj: Any) -> bool:
    """A plugin must be constructible with keyword arguments only (all defaults)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return True
    return all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
               for p in sig.parameters.values())


def _reward_call_ok(fn: Any) -> str | None:
    if inspect.iscoroutinefunction(fn):
        return "is `async def`; OpenRLHF calls reward functions synchronously in threads"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_var = any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
    if len(params) < 3 and not has_var:
        return f"takes {sig}; it must accept (queries, prompts, labels, **kwargs)"
    return None


REWARD_SIGNATURE = "class Plugin(**config) -> instance; instance(queries, prompts, labels, **kwargs) -> RewardOutput"
DATASET_SIGNATURE = ("class Plugin(**config) -> instance with .name, .stage in {'sft', 'rl'}, .flags: DatasetFlags, "
                     ".convert(src, dst, *, tokenizer=None, max_len=None) -> int")


def check_reward_plugin(name: str, obj: Any) -> None:
    """Reject at registration a reward plugin that cannot honour :class:`RewardPlugin`."""
    if not callable(obj):
        raise PluginError(f"reward plugin {name!r}: {obj!r} is not callable; expected {REWARD_SIGNATURE}")
    if inspect.isclass(obj):
        if not _factory_ok(obj):
            raise PluginError(f"reward plugin {name!r}: {obj.__qualname__}{inspect.signature(obj)} has "
                              f"required arguments; expected {REWARD_SIGNATURE}")
        problem = _reward_call_ok(obj.__call__)
        if problem:
            raise PluginError(f"reward plugin {name!r}: __call__ {problem}; expected {REWARD_SIGNATURE}")
    elif not (is_reward_function(obj) or _factory_ok(obj)):
        problem = _reward_call_ok(obj) or "has required arguments"
        raise PluginError(f"reward plugin {name!r}: {problem}; expected {REWARD_SIGNATURE}, "
                          "or a plain function reward_func(queries, prompts, labels, **kwargs)")


def is_reward_function(obj: Any) -> bool:
    """A plain, synchronous ``reward_func(queries, prompts, labels, **kwargs)`` (used as is)."""
    if inspect.isclass(obj) or not callable(obj) or _reward_call_ok(obj) is not None:
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return sum(p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3


def check_reward_instance(name: str, inst: Any) -> None:
    problem = _reward_call_ok(inst) if callable(inst) else "is not callable"
    if problem:
        raise PluginError(f"reward plugin {name!r}: the instance {problem}; expected {REWARD_SIGNATURE}")


def check_dataset_plugin(name: str, obj: Any) -> None:
    """Reject at registration a dataset plugin that cannot honour :class:`DatasetPlugin`."""
    if not callable(obj) or not _factory_ok(obj):
        raise PluginError(f"dataset plugin {name!r}: {obj!r} must be constructible with keyword "
                          f"arguments only; expected {DATASET_SIGNATURE}")
    if inspect.isclass(obj):
        missing = [a for a in ("convert", "stage", "flags") if not hasattr(obj, a)]
        if missing:
            raise PluginError(f"dataset plugin {name!r}: {obj.__qualname__} lacks {', '.join(missing)}; "
                              f"expected {DATASET_SIGNATURE}")
        if getattr(obj, "stage", None) not in ("sft", "rl"):
            raise PluginError(f"dataset plugin {name!r}: stage is {getattr(obj, 'stage', None)!r}, "
                              "expected 'sft' or 'rl'")


def config_error(plugin: str, cls: Any, config: Mapping[str, Any], exc: TypeError) -> ValueError:
    """A readable error for a plugin configuration its constructor rejects."""
    try:
        params = ", ".join(p for p in inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        params = "?"
    return ValueError(f"plugin {plugin!r} rejects its configuration {dict(config)!r}: {exc}. "
                      f"Accepted keys: {params}")


TRAINER_SIGNATURE = ("class Plugin(TrainerPlugin) constructible as Plugin(**config), overriding hooks with keyword "
                     "arguments: " + "; ".join(f"{h}(*, {', '.join(a)})" for h, a in TRAINER_HOOKS.items()))


def _hook_problem(fn: Any, hook: str) -> str | None:
    if not callable(fn):
        return f"{hook} is not callable"
    if inspect.iscoroutinefunction(fn):
        return f"{hook} is `async def`; trainer hooks are called synchronously"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    missing = [a for a in TRAINER_HOOKS[hook] if a not in names]
    required = [p.name for p in params if p.default is p.empty and p.name not in TRAINER_HOOKS[hook]
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing or required:
        return (f"{hook}{sig} does not take the keyword arguments ({', '.join(TRAINER_HOOKS[hook])})"
                + (f"; it requires {', '.join(required)}" if required else ""))
    return None


def check_trainer_plugin(name: str, obj: Any) -> None:
    """Reject at registration a trainer plugin that cannot honour :class:`TrainerPlugin`:
    required constructor arguments, a hook with the wrong signature, or an ``on_*`` method that is
    no hook (a misspelt hook would silently never run)."""
    if not callable(obj) or not _factory_ok(obj):
        raise PluginError(f"trainer plugin {name!r}: {obj!r} must be constructible with keyword arguments only; "
                          f"expected {TRAINER_SIGNATURE}")
    if inspect.isclass(obj):
        _check_trainer_hooks(name, obj)


def check_trainer_instance(name: str, inst: Any) -> None:
    """The same checks on a constructed plugin (a factory's product)."""
    _check_trainer_hooks(name, inst)
    stages = getattr(inst, "stages", None)
    if not stages or not set(stages) <= {"sft", "rl"}:
        raise PluginError(f"trainer plugin {name!r}: stages={stages!r}; use a subset of ('sft', 'rl')")


def _check_trainer_hooks(name: str, obj: Any) -> None:
    label = getattr(obj, "__qualname__", type(obj).__qualname__)
    for attr in dir(obj):
        if attr.startswith("on_") and attr not in TRAINER_HOOKS:
            raise PluginError(f"trainer plugin {name!r}: {label}.{attr} is not a trainer hook (known: "
                              f"{', '.join(TRAINER_HOOKS)}); expected {TRAINER_SIGNATURE}")
    found = [h for h in TRAINER_HOOKS if hasattr(obj, h)]
    if not found:
        raise PluginError(f"trainer plugin {name!r}: {label} defines none of the hooks "
                          f"{', '.join(TRAINER_HOOKS)}; expected {TRAINER_SIGNATURE}")
    for hook in found:
        problem = _hook_problem(getattr(obj, hook), hook)
        if problem:
            raise PluginError(f"trainer plugin {name!r}: {label}.{problem}; expected {TRAINER_SIGNATURE}")
