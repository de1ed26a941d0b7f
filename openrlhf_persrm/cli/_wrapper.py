"""What both launcher wrappers share: plugin flags, translating them into OpenRLHF flags,
and handing over to OpenRLHF's own launcher.

A wrapper accepts every flag of the OpenRLHF launcher unchanged (they are parsed by
OpenRLHF's own parser, see :func:`openrlhf_persrm.compat.launcher_parser`) plus:

``--dataset_plugin NAME`` / ``--dataset_plugin_config JSON``
    converts the PersRM pair JSONL given to the launcher's dataset flags into rows its
    dataset classes read (cached under ``--persrm.cache_dir``) and sets the data keys;
``--reward_plugin NAME`` / ``--reward_plugin_config JSON`` (``train_ppo_ray`` only)
    points ``--reward.remote_url`` at the installed entry file and passes the plugin's name
    and configuration to every Ray worker through environment variables;
``--trainer_plugin NAME[,NAME...]`` / ``--trainer_plugin_config JSON``
    trainer plugins (hooks into OpenRLHF's training loop, see
    :class:`openrlhf_persrm.contracts.TrainerPlugin`); their names and configuration reach the
    process that runs the loop (every Ray worker for ``train_ppo_ray``) through environment variables;
``--cpu`` / ``--gpu``
    runs on CPU / insists on GPUs (CPU mode is chosen automatically only when no GPU is
    visible and, for ``train_ppo_ray``, no Ray cluster is reachable; see
    :func:`openrlhf_persrm.cpu.mode.choose_cpu`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import __version__

logger = logging.getLogger("openrlhf_persrm")

DEFAULT_CACHE_DIR = os.environ.get("PERSRM_CACHE_DIR", os.path.join(".cache", "persrm"))


class WrapperError(ValueError):
    """A flag combination the wrapper cannot honour; the message names the flag and the fix."""


def plugin_parser(launcher: str, *, reward: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m openrlhf_persrm.cli.{launcher}", add_help=False,
        description=f"OpenRLHF {launcher} with openrlhf-persrm plugins. Every OpenRLHF 0.11.2 "
                    f"{launcher} flag is accepted unchanged (listed below the plugin flags).")
    from ..registry import dataset_plugins, reward_plugins, trainer_plugins

    g = p.add_argument_group("openrlhf-persrm plugins")
    g.add_argument("--dataset_plugin", default=None, metavar="NAME",
                   help=f"dataset plugin ({', '.join(dataset_plugins.available())}, pkg.mod:Class or file.py) "
                        "that converts PersRM pair JSONL given to the dataset flags into OpenRLHF rows")
    g.add_argument("--dataset_plugin_config", default=None, metavar="JSON",
                   help="JSON object (or @file.json) of keyword arguments for the dataset plugin")
    if reward:
        g.add_argument("--reward_plugin", default=None, metavar="NAME",
                       help=f"reward plugin ({', '.join(reward_plugins.available())}, pkg.mod:Class or "
                            "file.py) given to OpenRLHF as --reward.remote_url; its settings reach every Ray worker")
        g.add_argument("--reward_plugin_config", default=None, metavar="JSON",
                       help="JSON object (or @file.json) of keyword arguments for the reward plugin")
    g.add_argument("--trainer_plugin", default=None, metavar="NAME[,NAME...]",
                   help=f"trainer plugins ({', '.join(trainer_plugins.available())}, pkg.mod:Class or "
                        "file.py), comma-separated; their hooks run in OpenRLHF's training loop")
    g.add_argument("--trainer_plugin_config", default=None, metavar="JSON",
                   help="JSON object (or @file.json) of keyword arguments for the trainer plugin; with several "
                        "plugins, one object per plugin keyed by its name")
    g.add_argument("--cpu", action="store_true",
                   help="run on CPU (chosen automatically, with a warning, only when no GPU is visible"
                        + (" and no Ray cluster is reachable: RAY_ADDRESS or a `ray start` cluster)" if reward
                           else ")"))
    g.add_argument("--gpu", action="store_true",
                   help="insist on GPUs: fail instead of falling back to CPU mode when none is available")
    g.add_argument("--persrm.cache_dir", dest="cache_dir", default=DEFAULT_CACHE_DIR, metavar="DIR",
                   help="where converted datasets are cached (default: %(default)s)")
    return p


def load_json_config(raw: str | None, flag: str) -> dict[str, Any]:
    if not raw:
        return {}
    text = raw
    if raw.startswith("@"):
        try:
            text = Path(raw[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise WrapperError(f"{flag}: cannot read {raw[1:]!r}: {exc}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WrapperError(f"{flag}: not valid JSON ({exc.msg}): {text[:120]!r}; "
                           "pass an object such as '{\"format_penalty\": -1.5}'") from None
    if not isinstance(value, dict):
        raise WrapperError(f"{flag}: expected a JSON object, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- argv editing

@dataclass
class Argv:
    """OpenRLHF flags as a token list, edited in place (``--flag value`` or ``--flag=value``)."""

    tokens: list[str]
    changed: dict[str, Any] = field(default_factory=dict)

    def _find(self, flag: str) -> int | None:
        for i, tok in enumerate(self.tokens):
            if tok == flag or tok.startswith(flag + "="):
                return i
        return None

    def given(self, flag: str) -> bool:
        return self._find(flag) is not None

    def set(self, flag: str, value: Any) -> None:
        """Set ``flag`` to ``value`` (``True`` for a switch), replacing any value given."""
        i = self._find(flag)
        if value is True:
            if i is None:
                self.tokens.append(flag)
        elif i is None:
            self.tokens += [flag, str(value)]
        elif "=" in self.tokens[i]:
            self.tokens[i] = f"{flag}={value}"
        else:
            self.tokens[i + 1] = str(value)
        self.changed[flag] = value


# --------------------------------------------------------------------------- datasets

def file_digest(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_datasets(plugin_name: str, config: dict[str, Any], stage: str, ns: dict[str, Any],
                     argv: Argv, flags: Sequence[str], model_path: str | None, cache_dir: str) -> None:
    """Convert every pair file named by ``flags`` with the dataset plugin; point the flags at the rows."""
    from ..registry import dataset_plugins, instantiate

    plugin = instantiate(dataset_plugins, plugin_name, config)
    if plugin.stage != stage:
        raise WrapperError(f"--dataset_plugin {plugin_name} makes {plugin.stage!r} rows but this launcher "
                           f"trains on {stage!r} rows; use a {stage} dataset plugin "
                           f"({'persrm_sft' if stage == 'sft' else 'persrm_rl'})")
    tokenizer = None
    if model_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    max_len = ns.get("data.max_len")
    extra: dict[str, Any] = {}
    if stage == "rl" and _accepts(plugin.convert, "max_new_tokens"):
        # What OpenRLHF truncates prompts by: the plugin budgets prompts from it.
        extra["max_new_tokens"] = ns.get("rollout.max_new_tokens")
    for flag in flags:
        value = ns.get(flag.lstrip("-"))
        if not value:
            continue
        outs = []
        for src in str(value).split(","):
            src = src.strip()
            if "@" in src or not os.path.isfile(src):
                raise WrapperError(f"{flag} {src!r}: --dataset_plugin {plugin_name} reads local PersRM pair "
                                   "JSONL files; give a file path (comma-separated for several)")
            key = hashlib.sha256(json.dumps(
                [file_digest(src), plugin_name, config, model_path, max_len, __version__, *extra.values()],
                sort_keys=True, default=str).encode()).hexdigest()[:16]
            dst = os.path.join(cache_dir, "datasets", f"{Path(src).stem}.{plugin.name}.{key}.jsonl")
            if os.path.exists(dst):
                logger.info("%s: reusing %s (converted earlier from %s)", plugin.name, dst, src)
            else:
                n = plugin.convert(src, dst, tokenizer=tokenizer, max_len=max_len, **extra)
                if n == 0:
                    if os.path.exists(dst):
                        os.unlink(dst)
                    raise WrapperError(f"{flag} {src!r}: --dataset_plugin {plugin_name} wrote no rows; see "
                                       f"{dst}.report.json for what was skipped and why")
                logger.info("%s: converted %s -> %s (%d rows)", plugin.name, src, dst, n)
            outs.append(dst)
        argv.set(flag, ",".join(outs))
    for flag, value in plugin.flags.as_argv().items():
        given = ns.get(flag.lstrip("-"))
        if argv.given(flag) and given != value:
            raise WrapperError(f"{flag} {given!r} conflicts with --dataset_plugin {plugin_name}, which writes "
                               f"rows for {flag} {value!r}; drop {flag}")
        argv.set(flag, value)


def prepare_trainer_plugins(specs: str | None, raw_config: str | None, stage: str,
                            ns: dict[str, Any]) -> tuple[dict[str, str], list[Any]]:
    """Check ``--trainer_plugin`` / ``--trainer_plugin_config`` here, before any worker starts; return the
    environment variables that carry them to the training loop, and the plugins."""
    from ..trainers.hooks import ENV_CONFIG, ENV_PLUGINS, configs_for, load_plugins, split_specs

    names = split_specs(specs)
    if not names:
        if raw_config:
            raise WrapperError("--trainer_plugin_config needs --trainer_plugin")
        return {}, []
    config = load_json_config(raw_config, "--trainer_plugin_config")
    try:
        plugins = load_plugins(names, config, stage)
    except (TypeError, LookupError) as exc:
        raise WrapperError(f"--trainer_plugin: {exc}") from None
    # Relative file paths in a configuration mean files where the launcher starts, not in a worker.
    if len(names) == 1:
        config = _absolute_paths(configs_for(names, config)[0])
    else:
        config = {n: _absolute_paths(c) for n, c in zip(names, configs_for(names, config))}
    if stage == "rl":
        if ns.get("train.async_enable"):
            raise WrapperError("--trainer_plugin needs the synchronous PPO trainer; drop --train.async_enable")
        if any(type(p).twin_key is not _base_twin_key() for p in plugins):
            batch = int(ns.get("rollout.batch_size") or 0)
            if batch % 2:
                raise WrapperError(f"--rollout.batch_size {batch}: --trainer_plugin {specs} keeps both orders of a "
                                   "pair in one step; use an even --rollout.batch_size")
            if ns.get("algo.dynamic_filtering_enable"):
                raise WrapperError(f"--algo.dynamic_filtering_enable drops prompts one by one and would split pairs "
                                   f"that --trainer_plugin {specs} keeps together; drop it")
            gen = ns.get("rollout.vllm_generate_batch_size")
            if gen and int(gen) != batch:
                raise WrapperError(f"--rollout.vllm_generate_batch_size {gen}: with --trainer_plugin {specs} it must "
                                   f"equal --rollout.batch_size ({batch}) so that pairs stay in one step")
    return {ENV_PLUGINS: ",".join(names), ENV_CONFIG: json.dumps(config)}, plugins


def _base_twin_key() -> Any:
    from ..contracts import TrainerPlugin

    return TrainerPlugin.twin_key


def _absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (os.path.abspath(v) if isinstance(v, str) and v and not os.path.isabs(v) and os.path.isfile(v)
                else v) for k, v in config.items()}
def _accepts(fn: Callable[..., Any], name: str) -> bool:
    import inspect

    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_reparse(parser: argparse.ArgumentParser, argv: Argv) -> dict[str, Any]:
    """Re-parse the edited argv with OpenRLHF's parser: our edits must read back as we meant them."""
    final = namespace_dict(parser, argv.tokens)
    for flag, value in argv.changed.items():
        got = final[flag.lstrip("-")]
        if got != value and str(got) != str(value):
            raise WrapperError(f"{flag}: OpenRLHF's parser read {got!r}, expected {value!r}")
    return final


def namespace_dict(parser: argparse.ArgumentParser, tokens: Sequence[str]) -> dict[str, Any]:
    return vars(parser.parse_args(list(tokens)))


def setup_logging() -> None:
    # The project's records under "[persrm]", other libraries' warnings under their own names.
    from ..logs import setup_logging as _setup

    _setup("persrm", stream=sys.stderr)


def print_help(launcher: str, ours: argparse.ArgumentParser) -> None:
    from ..compat import launcher_parser

    ours.print_help()
    print(f"\nOpenRLHF 0.11.2 {launcher} flags (passed through unchanged):\n")
    launcher_parser(launcher).print_help()


def wrapper_main(launcher: str, argv: Sequence[str] | None, *, reward: bool,
                 prepare: Callable[[list[str]], Any], run: Callable[[Any], int]) -> int:
    """The shared shape of both wrappers: help, translate flags (errors exit 2), run."""
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help(launcher, plugin_parser(launcher, reward=reward))
        return 0
    try:
        prepared = prepare(argv)
    except (WrapperError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return run(prepared)
    except Exception as exc:
        from ..compat import reward_failure

        cause = reward_failure(exc)
        if cause is None:
            raise
        # OpenRLHF and Ray wrap the reward's error in their own; the cause goes last, where one looks first
        import traceback

        traceback.print_exc()
        _stop_ray()
        print(f"error: {launcher} stopped: {cause}", file=sys.stderr, flush=True)
        return 1


def _stop_ray() -> None:
    """Shut a Ray this process started down now, so that no worker's log line follows the cause."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
