"""CPU mode for ``train_ppo_ray``: OpenRLHF 0.11.2's own launcher, unmodified, on a CPU-only machine.

What it takes (measured; see ``shared/notes/openrlhf-0.11.2-internals.md``):

1. a local Ray started here with *declared* GPU resources, so OpenRLHF's ``num_gpus=1`` actors and
   ``{"GPU": 1, "CPU": 1}`` placement bundles schedule; with a CPU-only torch nothing touches CUDA;
2. the vLLM stand-in (:mod:`openrlhf_persrm.cpu.vllm_standin`) in the driver and in every Ray
   worker, behind OpenRLHF's own ``RolloutRayActor``; weights sync over gloo after each step;
3. the torch/CUDA shims and OpenRLHF device patches of :mod:`openrlhf_persrm.compat`, applied in
   every worker by Ray's ``worker_process_setup_hook`` (:func:`worker_setup`).

Flags that cannot work on CPU are refused before any Ray actor starts (:func:`check_flags`).
Ray and its workers are shut down when the run ends, on an error and on Ctrl-C or SIGTERM.
A real vLLM is never replaced outside CPU mode.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from typing import Any, Sequence

logger = logging.getLogger("openrlhf_persrm")

ENV_CPU_MODE = "PERSRM_CPU_MODE"
SETUP_HOOK = "openrlhf_persrm.cpu.mode.worker_setup"

#: Actor groups whose ``--X.num_gpus_per_node`` defaults to 8 upstream; on CPU each "GPU" is a
#: process, so unless the flag is given we use 1.
GPU_GROUPS = ("actor", "ref", "critic", "reward")


class CpuModeError(ValueError):
    """A flag that cannot work in CPU mode; the message names it and what to use instead."""


# --------------------------------------------------------------------------- CPU or GPU

def _ray_temp_dir() -> str:
    # Where `ray start` records the address of the cluster it started on this machine (Ray 2.x).
    return os.path.join(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir(), "ray")


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of a Ray address (``10.0.0.1:6379``, ``ray://h:10001``, ``http://h:8265``)."""
    rest = address.split("://", 1)[-1].strip().rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep:
        return (rest, 6379) if rest else None
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


def _reachable(address: str, timeout: float = 2.0) -> bool:
    import socket

    hp = _host_port(address)
    if hp is None:
        return False
    try:
        with socket.create_connection(hp, timeout=timeout):
            return True
    except OSError:
        return False


def ray_cluster() -> tuple[str | None, str, bool]:
    """The Ray cluster this driver would join: ``(address, where it came from, reachable)``.

    ``RAY_ADDRESS`` first (as ``ray.init`` reads it; ``auto`` and unset mean "a cluster started
    with ``ray start`` on this machine"), then the address file ``ray start`` writes.
    ``RAY_ADDRESS=local`` means no cluster.
    """
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env == "local":
        return None, "RAY_ADDRESS=local", False
    if env and env != "auto":
        return env, "RAY_ADDRESS", _reachable(env)
    path = os.path.join(_ray_temp_dir(), "ray_current_cluster")
    try:
        with open(path, encoding="utf-8") as fh:
            address = fh.read().strip()
    except OSError:
        return None, "RAY_ADDRESS unset, no `ray start` cluster on this machine", False
    return (address or None), path, bool(address) and _reachable(address)


def choose_cpu(launcher: str, *, cpu: bool, gpu: bool, uses_ray: bool) -> bool:
    """Whether a launcher runs in CPU mode; the choice and its reason are logged at WARNING.

    ``--cpu`` forces CPU mode and ``--gpu`` insists on GPUs. Otherwise CPU mode is chosen only
    when this process sees no GPU and (for Ray launchers) no Ray cluster is reachable: on a
    CPU-only head node of a GPU cluster, the run goes to the cluster, never quietly to CPU.
    Raises :class:`CpuModeError` for ``--gpu`` without GPUs and for a ``RAY_ADDRESS`` that
    names a cluster nobody answers at.
    """
    from .. import compat

    if cpu and gpu:
        raise CpuModeError("--cpu and --gpu contradict each other; keep one")
    if cpu:
        logger.warning("%s: CPU mode (--cpu given)", launcher)
        return True
    if compat.has_cuda():
        return False
    address, source, reachable = ray_cluster() if uses_ray else (None, "", False)
    if reachable:
        logger.warning("%s: no GPU visible to this process, but the Ray cluster at %s (%s) answers: running on "
                       "the cluster's GPUs (pass --cpu for a local CPU run)", launcher, address, source)
        return False
    if address and source == "RAY_ADDRESS":
        raise CpuModeError(f"RAY_ADDRESS={address} names a Ray cluster that does not answer; start it "
                           "(`ray start --head` ...), fix RAY_ADDRESS, or unset it and pass --cpu for a CPU run")
    where = "torch.cuda.is_available() is False"
    if uses_ray:
        where += ("; no Ray cluster reachable (" + (f"stale address {address} in {source}" if address else source)
                  + ")")
    if gpu:
        raise CpuModeError(f"--gpu: no GPU available to {launcher} ({where}); run on a GPU machine, start or "
                           "join a Ray cluster with GPUs (RAY_ADDRESS / `ray start`), or drop --gpu")
    logger.warning("%s: running in CPU mode: %s. Pass --gpu to insist on GPUs, --cpu to choose CPU mode "
                   "explicitly", launcher, where)
    return True


def cpu_attention(ns: dict[str, Any], argv: Any) -> None:
    """Attention on CPU: sdpa unless the user chose another non-flash kernel (both launchers)."""
    attn = str(ns.get("ds.attn_implementation"))
    if argv.given("--ds.attn_implementation") and "flash" in attn:
        raise CpuModeError(f"--ds.attn_implementation {attn} needs a GPU; use sdpa or eager with --cpu")
    if ns.get("ds.packing_samples"):
        raise CpuModeError("--ds.packing_samples needs flash-attention on a GPU; drop it with --cpu")
    if not argv.given("--ds.attn_implementation"):
        argv.set("--ds.attn_implementation", "sdpa")


def check_flags(ns: dict[str, Any], argv: Any) -> None:
    """Refuse what CPU mode cannot do and set CPU defaults, editing ``argv`` (an ``Argv``)."""
    if not ns.get("vllm.num_engines"):
        raise CpuModeError("--vllm.num_engines is unset or 0: OpenRLHF generates rollouts only through vLLM "
                           "engines; pass --vllm.num_engines 1 (CPU mode runs them in the stand-in engine)")
    if (ns.get("vllm.tensor_parallel_size") or 1) > 1:
        raise CpuModeError(f"--vllm.tensor_parallel_size {ns['vllm.tensor_parallel_size']}: vLLM tensor "
                           "parallelism needs GPUs; use --vllm.tensor_parallel_size 1 and more --vllm.num_engines")
    if ns.get("vllm.sync_with_ray"):
        raise CpuModeError("--vllm.sync_with_ray needs NCCL collectives; drop it (CPU mode syncs over gloo)")
    if ns.get("train.colocate_all") and not ns.get("train.async_enable") and ns.get("vllm.sync_backend") == "nccl":
        raise CpuModeError("--train.colocate_all with --vllm.sync_backend nccl selects CUDA-IPC weight sync; "
                           "add --vllm.sync_backend gloo")
    if (ns.get("data.max_images_per_prompt") or 0) > 0:
        raise CpuModeError("--data.max_images_per_prompt: multimodal rollouts are not supported in CPU mode")
    if ns.get("train.enable_ema"):
        raise CpuModeError("--train.enable_ema: OpenRLHF 0.11.2 averages EMA weights on 'cuda'; drop it in CPU mode")
    cpu_attention(ns, argv)
    for group in GPU_GROUPS:
        flag = f"--{group}.num_gpus_per_node"
        if not argv.given(flag):
            argv.set(flag, 1)
    if ns.get("vllm.sync_backend") == "nccl" and not argv.given("--vllm.sync_backend"):
        argv.set("--vllm.sync_backend", "gloo")


def declared_gpus(ns: dict[str, Any]) -> int:
    """How many GPUs to declare to Ray: enough for every actor group without colocation."""
    def group(name: str) -> int:
        return int(ns.get(f"{name}.num_nodes") or 1) * int(ns.get(f"{name}.num_gpus_per_node") or 1)

    total = group("actor") + group("ref") + int(ns.get("vllm.num_engines") or 0)
    if ns.get("algo.advantage.estimator") == "gae":
        total += group("critic")
    return max(4, total)


def worker_setup() -> None:
    """Ray ``worker_process_setup_hook``: CPU shims, OpenRLHF device patches and the vLLM stand-in; a reward
    that cannot be computed ends the run with its cause (:func:`~openrlhf_persrm.compat.surface_reward_failures`)."""
    if os.environ.get(ENV_CPU_MODE) != "1":
        return
    from .. import compat
    from . import vllm_standin

    compat.apply_cpu_shims()
    vllm_standin.install()
    compat.patch_openrlhf_for_cpu()
    compat.surface_reward_failures()


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_ppo(tokens: Sequence[str], env: dict[str, str], ns: dict[str, Any]) -> int:
    """Run OpenRLHF's ``train_ppo_ray`` ``__main__`` on CPU; Ray is always shut down afterwards."""
    import ray

    from .. import compat

    if ray.is_initialized():
        raise CpuModeError("Ray is already initialised in this process; CPU mode starts its own local Ray")
    env_vars = {k: os.environ.get(k, v) for k, v in compat.RAY_ENV_DEFAULTS.items()}
    env_vars.update(env)
    env_vars.update({
        ENV_CPU_MODE: "1",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        # Busy-waiting OpenMP threads of several processes on a few cores slow each other 10x.
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", compat.default_torch_extensions_dir()),
    })
    os.environ.update(env_vars)
    # The driver runs OpenRLHF's train() too: same shims and stand-in as the workers.
    worker_setup()

    gpus = declared_gpus(ns)
    temp_dir = tempfile.mkdtemp(prefix="persrm-ray-", dir="/tmp")
    logger.info("CPU mode: local Ray with %d declared GPUs (%s), vLLM stand-in engine, weight sync over gloo",
                gpus, temp_dir)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        ray.init(address="local", num_cpus=gpus, num_gpus=gpus, include_dashboard=False, _temp_dir=temp_dir,
                 runtime_env={"env_vars": env_vars, "worker_process_setup_hook": SETUP_HOOK},
                 log_to_driver=True)
        compat.run_launcher("train_ppo_ray", tokens)
        return 0
    except KeyboardInterrupt:
        logger.warning("interrupted: shutting Ray and its workers down")
        return 130
    finally:
        try:
            ray.shutdown()
        finally:
            signal.signal(signal.SIGTERM, previous)
            import shutil

            shutil.rmtree(temp_dir, ignore_errors=True)
