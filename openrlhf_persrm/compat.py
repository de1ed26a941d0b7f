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
  (:func:`apply_cpu_shims`) and the upstream Ray environment defaults (:data:`RAY_ENV_DEFAULTS`).

``tests/test_compat.py`` pins each of these facts so an OpenRLHF upgrade fails loudly there.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import os
import re
import runpy
import sys
import types
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Iterator, Sequence

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
