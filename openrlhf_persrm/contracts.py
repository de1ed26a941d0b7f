"""The whole extension contract of openrlhf-persrm, in one file of typed, documented stubs.

Three kinds of plugin exist, each with a registry (``openrlhf_persrm.registry``) fed by an
entry-point group:

=================  ===============================  ==========================================
kind               entry-point group                what the entry point names
=================  ===============================  ==========================================
reward plugin      ``openrlhf_persrm.rewards``      a :class:`RewardPlugin` class (or factory)
dataset plugin     ``openrlhf_persrm.datasets``     a :class:`DatasetPlugin` class (or factory)
judge backend      ``openrlhf_persrm.judges``       a :class:`JudgeBackend` class (or factory)
=================  ===============================  ==========================================

A plugin class is constructed with keyword arguments only (its configuration, from
``--reward_plugin_config`` / ``--dataset_plugin_config`` JSON), so it must be a class or
factory whose parameters all have defaults. Instances must pickle: Ray ships them to
workers, so use small callable classes, not closures.

Plugins are checked when they register (:func:`check_reward_plugin`,
:func:`check_dataset_plugin`); a bad one is rejected with an error naming the plugin and
the signature it should have.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable


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


# --------------------------------------------------------------------------- checks

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
