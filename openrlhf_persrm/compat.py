"""Everything that relies on OpenRLHF internals, in one place. Written for OpenRLHF 0.11.2.

OpenRLHF has no plugin registry and its launchers build their argparse parsers inline
under ``if __name__ == "__main__":``. To extend it without copying it, this module:

* checks the installed version (:func:`check_openrlhf_version`);
* captures a launcher's real parser by running its ``__main__`` block until it calls
  ``parse_args`` (:func:`launcher_parser`), so our wrappers validate and read OpenRLHF's
  own flags with OpenRLHF's own parser and defaults;
* runs the launcher's ``__main__`` unmodified with a rewritten ``sys.argv``
  (:func:`run_launcher`);
* holds the CPU shims that let ``train_sft`` run on DeepSpeed's CPU accelerator
  (:func:`apply_cpu_shims`) and the upstream Ray environment defaults (:data:`RAY_ENV_DEFAULTS`);
* puts subclasses of OpenRLHF's ``PPOTrainer`` and ``SFTTrainer`` in their modules before the
  launcher runs, which call the trainer plugins' hooks and the GRPO step health check
  (:func:`install_trainer_hooks`).

``tests/test_compat.py`` pins each of these facts so an OpenRLHF upgrade fails loudly there.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import contextvars
import logging
import os
import re
import runpy
import sys
import types
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Iterator, Sequence

from . import OPENRLHF_VERSION

logger = logging.getLogger(__name__)

#: Our launcher name -> the OpenRLHF module whose ``__main__`` we run.
LAUNCHERS = {
    "train_sft": "openrlhf.cli.train_sft",
    "train_ppo_ray": "openrlhf.cli.train_ppo_ray",
}

#: Env vars upstream ``train_ppo_ray.train`` passes to ``ray.init``; a wrapper that starts Ray
#: itself must pass them too, since ``train`` skips its own ``ray.init`` when Ray is up.
RAY_ENV_DEFAULTS = {
    "TOKENIZERS_PARALLELISM": "true",
    "NCCL_DEBUG": "WARN",
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
}

ENV_ALLOW_MISMATCH = "PERSRM_ALLOW_OPENRLHF_MISMATCH"


class OpenRLHFVersionError(RuntimeError):
    pass


def installed_openrlhf_version() -> str | None:
    try:
        return version("openrlhf")
    except PackageNotFoundError:
        return None


def check_openrlhf_version() -> str:
    """Return the installed OpenRLHF version; raise unless it is the one this layer knows."""
    found = installed_openrlhf_version()
    if found is None:
        raise OpenRLHFVersionError(
            f"OpenRLHF is not installed; openrlhf-persrm needs openrlhf=={OPENRLHF_VERSION} "
            "(see the README for CPU and GPU installs)")
    if found != OPENRLHF_VERSION:
        msg = (f"openrlhf {found} is installed but openrlhf_persrm.compat is written for {OPENRLHF_VERSION}; "
               f"install openrlhf=={OPENRLHF_VERSION}, or set {ENV_ALLOW_MISMATCH}=1 to try anyway")
        if os.environ.get(ENV_ALLOW_MISMATCH) != "1":
            raise OpenRLHFVersionError(msg)
        logger.warning(msg)
    return found


# --------------------------------------------------------------------------- launchers

class _ParserCaptured(BaseException):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def _module_for(launcher: str) -> str:
    try:
        return LAUNCHERS[launcher]
    except KeyError:
        raise ValueError(f"unknown launcher {launcher!r}; known: {', '.join(LAUNCHERS)}") from None


_PARSERS: dict[str, argparse.ArgumentParser] = {}


def launcher_parser(launcher: str) -> argparse.ArgumentParser:
    """OpenRLHF's own, complete argparse parser for ``launcher``.

    The launcher's ``__main__`` block builds the parser inline; we run that block and stop
    it at its ``parse_args`` call, before any training starts.
    """
    if launcher in _PARSERS:
        return _PARSERS[launcher]
    check_openrlhf_version()
    install_flash_attn_stub()
    if launcher == "train_ppo_ray":
        ensure_vllm_importable()
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _ParserCaptured(self)

    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        with _argv([_module_for(launcher)]):
            runpy.run_module(_module_for(launcher), run_name="__main__", alter_sys=False)
    except _ParserCaptured as captured:
        _PARSERS[launcher] = captured.parser
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise OpenRLHFVersionError(f"{_module_for(launcher)} never called parse_args(); the launcher layout "
                               f"changed from OpenRLHF {OPENRLHF_VERSION}")


@contextlib.contextmanager
def _argv(argv: Sequence[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = list(argv)
    try:
        yield
    finally:
        sys.argv = saved


def run_launcher(launcher: str, argv: Sequence[str]) -> None:
    """Run OpenRLHF's own launcher ``__main__`` (parsing, validation, ``train``) on ``argv``."""
    check_openrlhf_version()
    install_flash_attn_stub()
    module = _module_for(launcher)
    logger.info("running %s %s", module, " ".join(argv))
    with _argv([module, *argv]):
        runpy.run_module(module, run_name="__main__", alter_sys=True)


_STEP_LOG = re.compile(r"Global step (\d+): (\{.*?\})\s*$", re.MULTILINE)


def parse_step_logs(text: str) -> dict[int, dict[str, float]]:
    """The per-step metrics ``train_ppo_ray`` prints (``ppo_trainer.py``: "Global step N: {...}").

    Includes the reward plugin's ``extra_logs`` (OpenRLHF averages each key over the step).
    """
    out: dict[int, dict[str, float]] = {}
    for m in _STEP_LOG.finditer(text):
        try:
            out[int(m.group(1))] = ast.literal_eval(m.group(2))
        except (ValueError, SyntaxError):
            continue
    return out


# --------------------------------------------------------------------------- rewards that cannot be computed
#
# OpenRLHF 0.11.2 facts (pinned in tests/test_compat.py):
# * ``utils/agent.py: SingleTurnAgentExecutor.execute`` (in each rollout actor) gets a sample's reward from
#   ``_fetch_rewards_via_func`` (the ``--reward.remote_url`` .py file) or ``_fetch_rewards_via_http`` (5 tries,
#   then RuntimeError) inside ``try/except Exception``, which logs the error at INFO and leaves the reward None;
#   the step then fails in ``trainer/ppo_utils/experience_maker.py`` with "reward_model_group is required when
#   rewards are not precomputed": the cause (a judge declared down, a 503 from ``persrm serve``) is lost.
# * ``_fetch_rewards_via_http`` posts through ``aiohttp.ClientSession(timeout=...)`` looked up on the module's
#   ``aiohttp`` name, in tasks it creates (they inherit the caller's context variables), and keeps no body of an
#   HTTP error (``raise_for_status``).

#: Ray ``worker_process_setup_hook`` of ``train_ppo_ray`` outside CPU mode (CPU mode's hook calls it too).
REWARD_FAILURES_HOOK = "openrlhf_persrm.compat.surface_reward_failures"


class RewardUnavailable(RuntimeError):
    """A sample's reward could not be computed, so OpenRLHF cannot train on the step; names the cause."""


_REWARD_ERRORS: contextvars.ContextVar = contextvars.ContextVar("persrm_reward_errors", default=None)
_HTTP_ANSWERS: contextvars.ContextVar = contextvars.ContextVar("persrm_http_answers", default=None)


def surface_reward_failures() -> None:
    """In a rollout actor: a reward OpenRLHF cannot get raises :class:`RewardUnavailable` with the cause (the
    reward function's exception, or the reward server's last error answer) instead of leaving the reward
    None, which ends the run later with an unrelated message. Idempotent; the Ray worker setup hook of
    ``train_ppo_ray`` (both modes) calls it. Samples whose reward arrives are untouched."""
    install_flash_attn_stub()
    from openrlhf.utils import agent

    cls = agent.SingleTurnAgentExecutor
    if getattr(cls, "_persrm_surfaced", False):
        return
    execute, via_func, via_http = cls.execute, cls._fetch_rewards_via_func, cls._fetch_rewards_via_http

    def note(cause: str) -> None:
        errors = _REWARD_ERRORS.get()
        if errors is not None:
            errors.append(cause)

    async def fetch_via_func(self, *args, **kwargs):
        try:
            return await via_func(self, *args, **kwargs)
        except Exception as exc:
            note(f"{type(exc).__name__}: {exc}")
            raise

    async def fetch_via_http(self, *args, **kwargs):
        answers: list[str] = []
        token = _HTTP_ANSWERS.set(answers)
        try:
            return await via_http(self, *args, **kwargs)
        except Exception as exc:
            note(f"{exc} The reward server's last answer: {answers[-1]}" if answers else str(exc))
            raise
        finally:
            _HTTP_ANSWERS.reset(token)

    async def surfacing_execute(self, *args, **kwargs):
        errors: list[str] = []
        token = _REWARD_ERRORS.set(errors)
        try:
            out = await execute(self, *args, **kwargs)
        finally:
            _REWARD_ERRORS.reset(token)
        if errors and out.get("reward") is None:
            raise RewardUnavailable(f"no reward for a sample: {errors[-1]}")
        return out

    cls.execute, cls._fetch_rewards_via_func, cls._fetch_rewards_via_http = (surfacing_execute, fetch_via_func,
                                                                               fetch_via_http)
    agent.aiohttp = _aiohttp_keeping_error_answers(agent.aiohttp)
    cls._persrm_surfaced = True


def _aiohttp_keeping_error_answers(aiohttp: Any) -> types.ModuleType:
    """``aiohttp`` as OpenRLHF's reward client sees it: its sessions keep the start of every error answer
    (the status and body, e.g. ``persrm serve``'s 503 "the judge is down: ...") for :func:`surface_reward_failures`."""
    view = types.ModuleType(aiohttp.__name__)
    view.__dict__.update(vars(aiohttp))

    async def keep_error_answer(session, context, params) -> None:
        answers = _HTTP_ANSWERS.get()
        if answers is not None and params.response.status >= 400:
            body = await params.response.read()
            answers.append(f"HTTP {params.response.status}: {body[:2000].decode('utf-8', 'replace')}")

    def client_session(*args, **kwargs):
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(keep_error_answer)
        kwargs["trace_configs"] = [*(kwargs.get("trace_configs") or []), trace]
        return aiohttp.ClientSession(*args, **kwargs)

    view.ClientSession = client_session
    return view


_ENGINE_WAIT_PATCHED = False


def stop_when_a_rollout_engine_cannot_start() -> None:
    """Driver side, before :func:`run_launcher`: the launcher's wait for the policy to start waits for the
    rollout engines too, so an engine that fails to start (e.g. the reward's start-up probe finds the judge
    down: the entry file raises in ``RolloutRayActor.__init__``) ends the run at once with that error.
    Without it the policy waits for the dead engine to join its weight-sync group until that group's
    store times out (300 s) and the run ends on a timeout, the cause far up the log. Idempotent.

    OpenRLHF 0.11.2 facts (pinned in tests/test_compat.py): ``train_ppo_ray.train`` calls
    ``RayActorGroup.async_init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)`` for the
    policy and ``ray.get``s the refs it returns (values unused); ``RolloutRayActor`` has the method
    ``get_num_unfinished_requests``, which answers once the engine has started.
    """
    global _ENGINE_WAIT_PATCHED
    if _ENGINE_WAIT_PATCHED:
        return
    install_flash_attn_stub()
    ensure_vllm_importable()
    from openrlhf.trainer.ray import launcher

    original = launcher.RayActorGroup.async_init_model_from_pretrained

    def init_and_wait_for_engines(self, *args, **kwargs):
        refs = original(self, *args, **kwargs)
        engines = kwargs.get("vllm_engines", args[3] if len(args) > 3 else None)
        # ray.get of the whole list raises as soon as one engine's start has failed
        return refs + [engine.get_num_unfinished_requests.remote() for engine in engines or ()]

    launcher.RayActorGroup.async_init_model_from_pretrained = init_and_wait_for_engines
    _ENGINE_WAIT_PATCHED = True


def reward_failure(exc: BaseException) -> str | None:
    """The cause, when ``exc`` ends a run because a reward or its judge could not serve
    (:class:`RewardUnavailable`, :class:`~openrlhf_persrm.judges.faults.JudgeUnavailable`), however Ray and
    OpenRLHF wrapped it (task and actor errors, chained exceptions, or only their text)."""
    from .judges.faults import JudgeUnavailable

    ours = (RewardUnavailable, JudgeUnavailable)
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        err = todo.pop()
        if not isinstance(err, BaseException) or id(err) in seen:
            continue
        seen.add(id(err))
        inner = [getattr(err, "cause", None), err.__cause__, err.__context__]
        if isinstance(err, ours) and not any(isinstance(e, ours) for e in inner):
            message = str(err.args[0]) if err.args else str(err)
            return message if isinstance(err, RewardUnavailable) else f"JudgeUnavailable: {message}"
        todo += inner
    # an actor that failed to start keeps only the text of its error
    found = re.findall(r"(?:RewardUnavailable: |(JudgeUnavailable: ))(.+)", str(exc))
    return "".join(found[-1]).strip() if found else None


# --------------------------------------------------------------------------- CPU

def has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def ensure_vllm_importable() -> None:
    """``openrlhf.cli.train_ppo_ray`` imports vLLM at module level. Where vLLM is not installed
    (CPU machines), the CPU stand-in takes its place; a real vLLM is never replaced."""
    import importlib.util

    if "vllm" in sys.modules or importlib.util.find_spec("vllm") is not None:
        return
    from .cpu import vllm_standin

    vllm_standin.install()


def install_flash_attn_stub() -> None:
    """``openrlhf.models`` imports flash-attn, whose CUDA extension a CPU build lacks."""
    if "flash_attn_2_cuda" not in sys.modules:
        try:
            import flash_attn_2_cuda  # noqa: F401
        except ImportError:
            sys.modules["flash_attn_2_cuda"] = types.ModuleType("flash_attn_2_cuda")


_SHIMS_APPLIED = False


def default_torch_extensions_dir() -> str:
    """Where DeepSpeed JIT-builds its CPU ops (once, 30-50 s): a cache under the working directory."""
    return os.path.abspath(os.path.join(".cache", "torch_extensions"))


def apply_cpu_shims() -> None:
    """Make OpenRLHF 0.11.2's DeepSpeed strategy run on a CPU-only torch. Idempotent.

    What it needs, measured on 0.11.2: ``torch.cuda.set_device``/``synchronize``/
    ``empty_cache`` as no-ops; ``torch.cuda.current_device()`` returning ``"cpu"`` (it is
    used as a device argument, utils/deepspeed/deepspeed.py); DeepSpeed's CPU accelerator
    (gloo); an importable ``flash_attn_2_cuda``.
    """
    global _SHIMS_APPLIED
    if _SHIMS_APPLIED:
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_torch_extensions_dir())
    install_flash_attn_stub()
    import torch

    # One function object per shim: torch._dynamo keeps a rule per torch.cuda function and
    # refuses one object registered under two names.
    def set_device(*args, **kwargs):
        return None

    def synchronize(*args, **kwargs):
        return None

    def empty_cache(*args, **kwargs):
        return None

    def current_device():
        return "cpu"

    def current_stream(*args, **kwargs):
        return None

    torch.cuda.set_device = set_device
    torch.cuda.synchronize = synchronize
    torch.cuda.empty_cache = empty_cache
    torch.cuda.current_device = current_device
    torch.cuda.current_stream = current_stream
    if cpu_float32():
        train_in_float32()
    _SHIMS_APPLIED = True


ENV_CPU_DTYPE = "PERSRM_CPU_DTYPE"


def cpu_has_bf16() -> bool:
    """True if this CPU computes bf16 natively (AVX512-BF16 or AMX); else bf16 matmuls are emulated."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_float32() -> bool:
    """Whether CPU mode trains in float32: ``$PERSRM_CPU_DTYPE`` = fp32 | bf16 | auto (default:
    fp32 unless the CPU has native bf16). Measured on a 2-core x86 machine without AVX512: a
    SmolLM2-135M forward+backward on 2 x 760 tokens took 37 s in fp32 and more than 150 s in bf16."""
    choice = os.environ.get(ENV_CPU_DTYPE, "auto").lower()
    if choice not in ("auto", "fp32", "bf16"):
        raise ValueError(f"${ENV_CPU_DTYPE}={choice!r}: use fp32, bf16 or auto")
    return choice == "fp32" or (choice == "auto" and not cpu_has_bf16())


_FP32_PATCHED = False


def train_in_float32() -> None:
    """Make OpenRLHF 0.11.2 load and train models in float32 (its ``--ds.param_dtype`` allows only
    bf16 / fp16). Idempotent.

    * ``utils/utils.py: convert_to_torch_dtype`` (imported at call time by ``models/actor.py`` and
      ``models/model.py``) returns ``torch.float32``;
    * ``utils/deepspeed/deepspeed.py`` binds ``get_train_ds_config`` / ``get_eval_ds_config`` by name:
      they get ``param_dtype="fp32"``, which enables neither DeepSpeed's bf16 nor its fp16 mode.
    """
    global _FP32_PATCHED
    if _FP32_PATCHED:
        return
    install_flash_attn_stub()  # openrlhf.utils.deepspeed imports flash_attn
    import torch
    from openrlhf.utils import utils as upstream_utils
    from openrlhf.utils.deepspeed import deepspeed as ds_module

    def to_float32(param_dtype: str) -> "torch.dtype":
        return torch.float32

    upstream_utils.convert_to_torch_dtype = to_float32
    for name in ("get_train_ds_config", "get_eval_ds_config"):
        original = getattr(ds_module, name)

        def in_float32(*args, _original=original, **kwargs):
            kwargs["param_dtype"] = "fp32"
            return _original(*args, **kwargs)

        setattr(ds_module, name, in_float32)
    _FP32_PATCHED = True


_PPO_PATCHED = False


def patch_openrlhf_for_cpu() -> None:
    """Where OpenRLHF 0.11.2's PPO code builds CUDA devices, make it build CPU ones. Idempotent.

    * ``trainer/ppo_utils/replay_buffer.py``: ``NaiveReplayBuffer.__init__`` sets
      ``target_device = torch.device(f"cuda:{torch.cuda.current_device()}")``;
    * ``utils/deepspeed/deepspeed.py``: ``init_device_mesh("cuda", ...)`` (bound by name at import).
    """
    global _PPO_PATCHED
    if _PPO_PATCHED:
        return
    apply_cpu_shims()
    import torch
    from openrlhf.trainer.ppo_utils import replay_buffer
    from openrlhf.utils.deepspeed import deepspeed as ds_module

    original_init = replay_buffer.NaiveReplayBuffer.__init__

    def init_on_cpu(self, *args, **kwargs):
        current = torch.cuda.current_device
        torch.cuda.current_device = lambda: 0  # "cuda:0" is a valid device *name* without CUDA
        try:
            original_init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = current
        self.target_device = torch.device("cpu")

    replay_buffer.NaiveReplayBuffer.__init__ = init_on_cpu
    original_mesh = ds_module.init_device_mesh

    def mesh_on_cpu(device_type, *args, **kwargs):
        return original_mesh("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    ds_module.init_device_mesh = mesh_on_cpu
    _PPO_PATCHED = True


def ensure_single_process_env() -> None:
    """A one-process torch.distributed world when no launcher (torchrun, deepspeed) set one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"})
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


# --------------------------------------------------------------------------- trainer plugins
#
# OpenRLHF 0.11.2 facts these hooks rely on (pinned in tests/test_compat.py):
# * ``train_ppo_ray.train`` imports ``PPOTrainer`` from ``openrlhf.trainer.ppo_trainer`` when it runs (so a
#   subclass put there first is the one it starts); the class is a Ray actor class whose Python class is
#   ``__ray_actor_class__``; ``--train.async_enable`` uses ``ppo_trainer_async`` instead (not hooked);
# * ``RemoteExperienceMaker.make_experience_batch`` calls ``self.compute_advantages_and_returns(experiences)``
#   once per step, with every sample's ``rewards``, ``info["reward"]``, ``prompts``, ``labels``, ``truncated``,
#   ``index`` (position in the step) set; advantages are computed from ``rewards`` in there;
# * ``BasePPOTrainer.train_step(rollout_samples, global_step) -> (status, global_step + 1)`` returns the dict
#   logged as "Global step N" and given to ``save_logs_and_checkpoints(global_step, logs_dict, client_states)``
#   (wandb, TensorBoard, checkpoints); ``save_best_checkpoint(metrics, global_step, client_states)`` keeps the
#   best checkpoint by ``self.best_eval_metric_key``; the vLLM engines hold the new weights after train_step;
# * ``RolloutRayActor.generate(prompt_token_ids, sampling_params)`` returns a vLLM ``RequestOutput``;
# * ``train_sft`` imports ``SFTTrainer`` from ``openrlhf.trainer.sft_trainer`` at module level (run by runpy
#   after this patch) and calls ``save_logs_and_checkpoints(args, global_step, step_bar, logs_dict,
#   client_states)`` after every optimizer step; ``self.model.model`` is the DeepSpeed engine.

_HOOKS_INSTALLED: set[str] = set()


def install_trainer_hooks(launcher: str) -> None:
    """Driver side, before :func:`run_launcher`: OpenRLHF's trainer class becomes a subclass that runs the
    trainer plugins named in the environment (``openrlhf_persrm.trainers.hooks``) and, for
    ``train_ppo_ray``, the always-on step health check. Idempotent; the launchers stay unmodified."""
    if launcher in _HOOKS_INSTALLED:
        return
    check_openrlhf_version()
    install_flash_attn_stub()
    if launcher == "train_ppo_ray":
        ensure_vllm_importable()
        _install_ppo_hooks()
    elif launcher == "train_sft":
        _install_sft_hooks()
    else:
        raise ValueError(f"no trainer hooks for launcher {launcher!r}")
    _HOOKS_INSTALLED.add(launcher)


def _install_ppo_hooks() -> None:
    import ray
    from openrlhf.trainer import ppo_trainer

    base = ppo_trainer.PPOTrainer.__ray_actor_class__

    class PPOTrainer(base):  # type: ignore[misc, valid-type]
        """OpenRLHF's PPOTrainer with openrlhf-persrm's trainer hooks."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            attach_ppo_hooks(self)

        def train_step(self, rollout_samples, global_step):
            self._persrm_step = global_step + 1
            status, global_step = super().train_step(rollout_samples, global_step)
            status.update(self._persrm_metrics)
            self._persrm_metrics = {}
            evals = ppo_evaluate(self, global_step)
            status.update(evals)
            self._persrm_evals = evals
            return status, global_step

        def save_logs_and_checkpoints(self, global_step, logs_dict=None, client_states=None):
            super().save_logs_and_checkpoints(global_step, logs_dict, client_states)
            evals, self._persrm_evals = self._persrm_evals, {}
            if evals and self._persrm_runner.best_metric in evals:
                # OpenRLHF's own best-checkpoint tracking (tag best_global_stepN, older best removed)
                self.save_best_checkpoint(evals, global_step, dict(client_states or {}))

    ppo_trainer.PPOTrainer = ray.remote(PPOTrainer)


def attach_ppo_hooks(trainer) -> None:
    """Inside the PPO trainer actor: plugins from the environment, the hook before advantages, twins
    kept in one step, and the best-checkpoint metric."""
    from .trainers.hooks import HookRunner, plugins_from_env

    runner = HookRunner(plugins_from_env("rl"), "rl")
    trainer._persrm_runner, trainer._persrm_metrics, trainer._persrm_evals, trainer._persrm_step = runner, {}, {}, 0
    maker = trainer.experience_maker
    original = maker.compute_advantages_and_returns

    def compute_advantages_and_returns(experiences):
        trainer._persrm_metrics = before_advantages(trainer, experiences)
        return original(experiences)

    maker.compute_advantages_and_returns = compute_advantages_and_returns
    if runner.wants_twins:
        keep_twins_together(trainer, runner)
    if runner.best_metric and not getattr(trainer.args.ckpt, "best_metric_key", ""):
        trainer.best_eval_metric_key = runner.best_metric
    if runner.plugins:
        logger.info("trainer plugins: %s", ", ".join(p.name for p in runner.plugins))


def rollout_step_from_experiences(experiences, tokenizer, global_step: int, n_samples_per_prompt: int,
                                  max_new_tokens: int | None):
    """The :class:`~openrlhf_persrm.contracts.RolloutStep` of a step's experiences (micro-batches), and
    where each of its samples lives: ``[(experience, row)]`` in step order."""
    from .contracts import RolloutSample, RolloutStep

    where = sorted(((idx, exp, row) for exp in experiences for row, idx in enumerate(exp.index)),
                   key=lambda t: t[0])
    samples = []
    for idx, exp, row in where:
        mask = exp.action_mask[row].bool()
        ids = exp.sequences[row][1:][mask]
        truncated = bool(exp.truncated[row]) if exp.truncated is not None else False
        samples.append(RolloutSample(prompt=exp.prompts[row], response=tokenizer.decode(ids, skip_special_tokens=True),
                                     label=exp.labels[row], reward=float(exp.rewards[row]), truncated=truncated,
                                     group=idx // max(1, n_samples_per_prompt)))
    return (RolloutStep(global_step, samples, n_samples_per_prompt, max_new_tokens),
            [(exp, row) for _, exp, row in where])


def before_advantages(trainer, experiences) -> dict[str, float]:
    """Run the plugins' ``on_rollout_step`` on the whole step, write their rewards back, and warn about
    a step that cannot teach anything. Returns the plugins' metrics."""
    from dataclasses import replace

    from .trainers.health import step_health

    args = trainer.args
    runner = trainer._persrm_runner
    step, where = rollout_step_from_experiences(experiences, trainer.tokenizer, trainer._persrm_step,
                                                args.rollout.n_samples_per_prompt, args.rollout.max_new_tokens)
    result = runner.rollout_step(step) if runner.plugins else None
    if result is not None and result.rewards is not None:
        for (exp, row), reward in zip(where, result.rewards):
            exp.rewards[row] = reward
            if "reward" in exp.info:
                exp.info["reward"][row] = reward
        step = replace(step, samples=[replace(s, reward=r) for s, r in zip(step.samples, result.rewards)])
    for warning in step_health(step, estimator=args.algo.advantage.estimator):
        _step_logger().warning("step %d: %s", step.global_step, warning)
    return dict(result.metrics) if result is not None else {}


def _step_logger():
    from openrlhf.utils.logging_utils import init_logger

    return init_logger("openrlhf_persrm.step_health")


class TwinSampler:
    """Prompt order that keeps rows with the same twin key inside one rollout batch: units (a row, or rows
    sharing a key) are shuffled each epoch and packed first-fit into batches of ``batch_size``; full batches
    come first, so no unit straddles two steps."""

    def __init__(self, keys, batch_size: int, seed: int = 0):
        units: dict[Any, list[int]] = {}
        for i, key in enumerate(keys):
            units.setdefault(("row", i) if key is None else ("key", key), []).append(i)
        self.units = list(units.values())
        self.batch_size, self.seed, self.epoch = max(1, int(batch_size)), seed, 0

    def __len__(self) -> int:
        return sum(len(u) for u in self.units)

    def order(self, epoch: int) -> list[int]:
        import random

        units = list(self.units)
        random.Random(self.seed + epoch).shuffle(units)
        batches: list[list[int]] = []
        for unit in units:
            for batch in batches:
                if len(batch) + len(unit) <= self.batch_size:
                    batch.extend(unit)
                    break
            else:
                batches.append(list(unit))
        full = [b for b in batches if len(b) == self.batch_size]
        rest = [b for b in batches if len(b) != self.batch_size]
        return [i for b in full + rest for i in b]

    def __iter__(self):
        order = self.order(self.epoch)
        self.epoch += 1
        return iter(order)


def keep_twins_together(trainer, runner) -> None:
    """Replace the PPO trainer's prompt dataloader with one whose order keeps twins in one step."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    args = trainer.args
    old = trainer.prompts_dataloader
    dataset = old.dataset
    keys = [runner.twin_key(dataset[i][2]) for i in range(len(dataset))]
    sampler = TwinSampler(keys, args.rollout.batch_size, args.train.seed)
    new = StatefulDataLoader(dataset, batch_size=1, sampler=sampler, drop_last=True, collate_fn=dataset.collate_fn,
                             num_workers=0)
    trainer.prompts_dataloader = new
    trainer.samples_generator.prompts_dataloader = new
    twins = sum(len(u) > 1 for u in sampler.units)
    logger.info("trainer plugins: %d groups of twin rows kept in one rollout step each", twins)


def engine_generate(trainer):
    """A greedy :class:`~openrlhf_persrm.contracts.GenerateFn` on the trainer's vLLM (or CPU stand-in) engines."""
    def generate(prompts, *, max_new_tokens: int, batch_size: int = 8) -> list[str]:
        import ray
        from openrlhf.trainer.ray.vllm_engine import batch_vllm_engine_call
        from vllm import SamplingParams

        engines = trainer.vllm_engines or []
        if not engines:
            raise RuntimeError("persrm trainer plugins: evaluation in train_ppo_ray needs --vllm.num_engines >= 1")
        params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_new_tokens, skip_special_tokens=True)
        from .judge_format import chat_prompt_ids

        ids = [chat_prompt_ids(trainer.tokenizer, m) for m in prompts]
        if trainer.args.vllm.enable_sleep:
            batch_vllm_engine_call(engines, "wake_up")
        try:
            outs = []
            step = max(1, batch_size) * len(engines)
            for start in range(0, len(ids), step):
                refs = [engines[n % len(engines)].generate.remote(p, params)
                        for n, p in enumerate(ids[start:start + step])]
                outs += ray.get(refs)
        finally:
            if trainer.args.vllm.enable_sleep:
                batch_vllm_engine_call(engines, "sleep")
        return [o.outputs[0].text if o is not None and o.outputs else "" for o in outs]

    return generate


def ppo_evaluate(trainer, global_step: int) -> dict[str, float]:
    runner = trainer._persrm_runner
    if not runner.eval_due(global_step):
        return {}
    metrics = runner.evaluate(global_step, engine_generate(trainer))
    logger.info("persrm eval at global step %d: %s", global_step, metrics)
    if metrics:
        if trainer.wandb_logger:
            trainer.wandb_logger.log_eval(global_step, metrics)
        if trainer.tensorboard_logger:
            trainer.tensorboard_logger.log_eval(global_step, metrics)
    return metrics


def _install_sft_hooks() -> None:
    from openrlhf.trainer import sft_trainer

    base = sft_trainer.SFTTrainer

    class SFTTrainer(base):  # type: ignore[misc, valid-type]
        """OpenRLHF's SFTTrainer with openrlhf-persrm's trainer hooks."""

        def __init__(self, *args, **kwargs):
            from .trainers.hooks import HookRunner, plugins_from_env

            super().__init__(*args, **kwargs)
            self._persrm_runner = HookRunner(plugins_from_env("sft"), "sft")

        def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
            logs_dict = dict(logs_dict or {})
            runner = self._persrm_runner
            metrics = runner.evaluate(global_step, hf_generate(self)) if runner.eval_due(global_step) else {}
            logs_dict.update(metrics)  # through OpenRLHF's own wandb / TensorBoard logging
            super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)
            if metrics:
                self.strategy.print(f"[persrm] Global step {global_step}: {logs_dict}")
                if runner.is_new_best(global_step, metrics):
                    save_best_sft(self, args, global_step, runner.best_metric, metrics[runner.best_metric])

    sft_trainer.SFTTrainer = SFTTrainer


def hf_generate(trainer):
    """A greedy :class:`~openrlhf_persrm.contracts.GenerateFn` on the SFT model (every rank runs it whole,
    so their metrics and best-checkpoint decisions agree)."""
    def generate(prompts, *, max_new_tokens: int, batch_size: int = 8) -> list[str]:
        import torch

        tokenizer = trainer.tokenizer
        engine = trainer.model.model
        model = getattr(engine, "module", engine)
        device = next(model.parameters()).device
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        was_training = model.training
        model.eval()
        out: list[str] = []
        try:
            with torch.no_grad():
                for start in range(0, len(prompts), max(1, batch_size)):
                    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                             for m in prompts[start:start + batch_size]]
                    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                    out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        finally:
            tokenizer.padding_side = side
            if was_training:
                model.train()
        return out

    return generate


def save_best_sft(trainer, args, global_step: int, key: str, value: float) -> None:
    """Keep one best SFT checkpoint (HF format) at ``<ckpt.path>/best_global_step<N>_hf``, and
    ``best_checkpoint.json`` beside it; the previous best is removed."""
    import json
    import shutil

    path = os.path.join(args.ckpt.path, f"best_global_step{global_step}_hf")
    trainer.strategy.save_model(trainer.model, trainer.tokenizer, path)
    if trainer.strategy.is_rank_0():
        for name in os.listdir(args.ckpt.path):
            old = os.path.join(args.ckpt.path, name)
            if name.startswith("best_global_step") and old != path and os.path.isdir(old):
                shutil.rmtree(old, ignore_errors=True)
        with open(os.path.join(args.ckpt.path, "best_checkpoint.json"), "w", encoding="utf-8") as fh:
            json.dump({"global_step": global_step, "metric": key, "value": value, "path": path}, fh)
        trainer.strategy.print(f"[persrm] New best checkpoint: {key}={value:.4f} at step {global_step}: {path}")
# --------------------------------------------------------------------------- prompt budgets

def prompt_token_counter(tokenizer) -> Callable[[list[dict[str, str]]], int]:
    """Tokens of a chat prompt exactly as OpenRLHF 0.11.2's rollouts count them.

    ``datasets/prompts_dataset.py: preprocess_data`` renders the messages with the chat template
    (``add_generation_prompt=True``); ``utils/agent.py: SingleTurnAgentExecutor.execute``
    tokenizes that text with ``add_special_tokens=False`` and keeps only the last
    :func:`max_prompt_tokens` tokens.
    """
    install_flash_attn_stub()
    from openrlhf.datasets.prompts_dataset import preprocess_data

    def count(messages: list[dict[str, str]]) -> int:
        text, _ = preprocess_data({"prompt": messages}, None, "prompt", None, tokenizer.apply_chat_template)
        return len(tokenizer(text=text, add_special_tokens=False)["input_ids"])

    return count


def max_prompt_tokens(max_len: int, max_new_tokens: int | None) -> int:
    """The longest prompt OpenRLHF 0.11.2 leaves uncut (``utils/agent.py``: ``max_prompt_length =
    max_len - max_tokens``, where ``max_tokens`` is ``--rollout.max_new_tokens`` or, unset,
    ``max(1, max_len - prompt_len)``)."""
    return max_len - max_new_tokens if max_new_tokens else max_len - 1
