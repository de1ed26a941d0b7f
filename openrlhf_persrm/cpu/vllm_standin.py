"""A CPU stand-in for the parts of vLLM that OpenRLHF 0.11.2 drives.

Written against OpenRLHF 0.11.2, which imports exactly these vLLM names:

* ``vllm.__version__`` -- compared at ``trainer/ray/vllm_engine.py`` (``> 0.8.5``, ``>= 0.9.0``,
  ``> 0.10.0`` when ``logprobs_mode`` is set) and ``trainer/ray/ppo_actor.py`` (``< 0.16``);
* ``vllm.AsyncEngineArgs(**kwargs)`` and ``vllm.AsyncLLMEngine.from_engine_args(args)``, then on
  the engine: ``generate(TokensPrompt, SamplingParams, request_id=...)`` (async generator of
  ``RequestOutput``), ``is_sleeping``, ``sleep(level)``, ``wake_up(tags)``, ``reset_prefix_cache``,
  ``pause_generation(mode="keep")``, ``resume_generation``, ``collective_rpc(name, args=...)`` for
  ``init_process_group`` / ``update_weight`` / ``update_weight_cuda_ipc``, and
  ``output_processor.get_num_unfinished_requests()``;
* ``vllm.SamplingParams`` (``temperature, top_p, top_k, max_tokens, min_tokens,
  skip_special_tokens, logprobs``; the agent code later assigns ``max_tokens``);
* ``vllm.inputs.TokensPrompt``, ``vllm.utils.random_uuid``;
* outputs read as ``request_output.outputs[0].{token_ids, text, finish_reason, logprobs}`` with
  ``logprobs[i][token_id].logprob``;
* ``vllm.distributed.utils.StatelessProcessGroup.create(host, port, rank, world_size)`` and
  ``vllm.distributed.device_communicators.pynccl.PyNcclCommunicator(pg, device)`` whose
  ``broadcast(tensor, src, stream)`` OpenRLHF's ``broadcast_to_vllm`` calls on the trainer side.

:func:`install` puts a module tree with those names into ``sys.modules``. Generation is done by
:class:`openrlhf_persrm.cpu.engine.BatchedEngine`; weight sync runs over a gloo process group
instead of NCCL. Importing this module does not import torch.

Refused with a ``ValueError`` naming the option, because they cannot work on CPU:
tensor/pipeline parallelism, CUDA-IPC weight sync, multimodal prompts, ``--vllm.sync_with_ray``.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import logging
import os
import pickle
import sys
import types
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

# The request and response types live in vllm_types (plain data the engine uses too, so that the
# engine never imports this module); they are re-exported here as the stand-in's public names.
from openrlhf_persrm.cpu.vllm_types import (  # noqa: F401 -- re-exported
    LOGPROBS_MODES,
    CompletionOutput,
    Logprob,
    RequestOutput,
    SamplingParams,
    TextPrompt,
    TokensPrompt,
    random_uuid,
)

logger = logging.getLogger(__name__)

#: Reported as ``vllm.__version__``: the release OpenRLHF 0.11.2 pins (``openrlhf[vllm]``), so
#: every version gate in OpenRLHF takes its modern-vLLM branch. The local label marks the fake.
VLLM_VERSION = "0.29.0+cpu.standin"

#: Set to a folder to have each engine record sha256 digests of the weights it receives.
ENV_DIGEST_DIR = "PERSRM_CPU_ENGINE_DIGEST_DIR"

# ----------------------------------------------------------------------------------------------
# Engine arguments and the async engine
# ----------------------------------------------------------------------------------------------


@dataclass
class AsyncEngineArgs:
    """The ``vllm.AsyncEngineArgs`` fields OpenRLHF's ``create_vllm_engines`` passes, plus a few.

    GPU-only knobs (``enforce_eager``, ``gpu_memory_utilization``, ``enable_prefix_caching``,
    ``worker_extension_cls``, ...) are accepted and ignored. ``dtype`` is ignored too: the CPU
    engine always computes in float32 (bf16 matmuls on CPU are slow, and float32 keeps batched
    greedy decoding equal to one-at-a-time decoding); received weights are cast on copy.
    ``max_num_seqs`` bounds how many sequences decode together in one batch.
    """

    model: str
    tokenizer: str | None = None
    seed: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    enforce_eager: bool = False
    enable_prefix_caching: bool | None = None
    gpu_memory_utilization: float | None = 0.9
    trust_remote_code: bool = False
    worker_extension_cls: str = ""
    enable_sleep_mode: bool = False
    limit_mm_per_prompt: dict[str, int] | None = None
    logprobs_mode: str = "raw_logprobs"
    max_logprobs: int = 20
    disable_log_stats: bool = False

    def __post_init__(self) -> None:
        if self.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size}: the CPU vLLM stand-in runs each "
                "engine as one process; set --vllm.tensor_parallel_size 1"
            )
        if self.pipeline_parallel_size != 1:
            raise ValueError(
                f"pipeline_parallel_size={self.pipeline_parallel_size}: not supported by the CPU vLLM "
                "stand-in; use 1"
            )
        if self.limit_mm_per_prompt and any(v > 0 for v in self.limit_mm_per_prompt.values()):
            raise ValueError(
                f"limit_mm_per_prompt={self.limit_mm_per_prompt}: the CPU vLLM stand-in serves text-only "
                "models; drop --data.max_images_per_prompt"
            )
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(
                f"logprobs_mode={self.logprobs_mode!r} is not supported by the CPU vLLM stand-in; "
                f"use one of {LOGPROBS_MODES}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


class _OutputProcessor:
    """Just enough of vLLM's output processor for ``get_num_unfinished_requests``."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def get_num_unfinished_requests(self) -> int:
        return self._engine.num_unfinished_requests()


_SLEEP_TAGS = frozenset({"weights", "kv_cache"})


class AsyncLLMEngine:
    """An async front end over :class:`~openrlhf_persrm.cpu.engine.BatchedEngine`.

    Mirrors the vLLM ``AsyncLLM`` methods OpenRLHF's ``RolloutRayActor`` calls. Generation runs on
    the engine's own thread, so awaiting a request never blocks the actor's event loop and
    concurrent ``generate`` calls are decoded together.
    """

    def __init__(self, engine_args: AsyncEngineArgs) -> None:
        from openrlhf_persrm.cpu.engine import BatchedEngine

        self.engine_args = engine_args
        self.engine = BatchedEngine.from_pretrained(
            engine_args.model,
            tokenizer_path=engine_args.tokenizer,
            seed=engine_args.seed,
            max_num_seqs=engine_args.max_num_seqs,
            max_model_len=engine_args.max_model_len,
            logprobs_mode=engine_args.logprobs_mode,
            trust_remote_code=engine_args.trust_remote_code,
        )
        if engine_args.dtype not in ("auto", "float32"):
            logger.info("CPU vLLM stand-in: dtype=%s requested, computing in float32", engine_args.dtype)
        self.output_processor = _OutputProcessor(self.engine)
        self._worker = _CpuWorker(self.engine)
        self._asleep_tags: set[str] = set()
        # Sleep and pause_generation both stop the scheduler; it runs again only when neither holds.
        self._paused_by_caller = False

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, **_: Any) -> "AsyncLLMEngine":
        """Build the engine (loads the model now, like vLLM)."""
        return cls(engine_args)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def generate(
        self,
        prompt: TokensPrompt | TextPrompt | str,
        sampling_params: SamplingParams,
        request_id: str,
        **_: Any,
    ) -> AsyncIterator[RequestOutput]:
        """Generate for one prompt; yields a single, finished ``RequestOutput``.

        vLLM streams cumulative partial outputs; OpenRLHF keeps only the last one, so the stand-in
        yields only the final output and saves a thread hop per token.
        """
        if self._asleep_tags:
            raise RuntimeError(
                f"generate() called while the engine sleeps ({sorted(self._asleep_tags)}); call wake_up() first"
            )
        prompt_token_ids = self._prompt_token_ids(prompt)
        future = self.engine.submit(prompt_token_ids, sampling_params, request_id=request_id)
        try:
            outputs = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # vLLM aborts a request whose consumer went away; do the same so rows stop decoding.
            self.engine.abort(request_id)
            raise
        text = prompt if isinstance(prompt, str) else prompt.get("prompt")
        yield RequestOutput(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=prompt_token_ids,
            prompt_logprobs=None,
            outputs=outputs,
            finished=True,
        )

    def _prompt_token_ids(self, prompt: TokensPrompt | TextPrompt | str) -> list[int]:
        if isinstance(prompt, str):
            prompt = TextPrompt(prompt=prompt)
        if prompt.get("multi_modal_data"):
            raise ValueError(
                "multi_modal_data: the CPU vLLM stand-in serves text-only models; drop --data.max_images_per_prompt"
            )
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return self.engine.tokenizer(prompt["prompt"], add_special_tokens=True)["input_ids"]
        raise ValueError(f"prompt must be a TokensPrompt, a TextPrompt or a str, got keys {sorted(prompt)}")

    async def abort(self, request_id: str | Sequence[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            self.engine.abort(rid)

    async def is_sleeping(self) -> bool:
        return bool(self._asleep_tags)

    async def sleep(self, level: int = 1) -> None:
        """Enter sleep mode: generation pauses until everything is woken.

        vLLM frees GPU memory here (level 2 also drops the weights); on CPU nothing is freed and
        the weights stay valid, which is harmless since OpenRLHF re-syncs them after waking.
        """
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        await asyncio.to_thread(self.engine.pause)
        self._asleep_tags = set(_SLEEP_TAGS)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Wake the given parts (``weights``, ``kv_cache``; default both), like vLLM."""
        tags = list(_SLEEP_TAGS) if tags is None else tags
        unknown = set(tags) - _SLEEP_TAGS
        if unknown:
            raise ValueError(f"wake_up tags must be among {sorted(_SLEEP_TAGS)}, got {sorted(unknown)}")
        self._asleep_tags -= set(tags)
        if not self._asleep_tags and not self._paused_by_caller:
            self.engine.resume()

    async def reset_prefix_cache(self, *_: Any, **__: Any) -> bool:
        """There is no prefix cache to reset; KV caches live only as long as their batch."""
        return True

    async def pause_generation(self, mode: str = "keep", **_: Any) -> None:
        """Pause scheduling. ``keep`` freezes in-flight requests; ``wait`` lets them finish first.

        Returns once no decoding step is running, so weights may then be replaced safely.
        """
        if mode == "wait":
            await asyncio.to_thread(self.engine.wait_until_idle)
        elif mode != "keep":
            raise ValueError(f"pause_generation mode={mode!r} is not supported by the CPU stand-in; use 'keep' or 'wait'")
        self._paused_by_caller = True
        await asyncio.to_thread(self.engine.pause)

    async def resume_generation(self) -> None:
        self._paused_by_caller = False
        if not self._asleep_tags:
            self.engine.resume()

    async def is_paused(self) -> bool:
        return self.engine.paused

    async def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Run a worker method (there is one worker) and return its results as a one-item list.

        Runs on a thread: ``init_process_group`` and ``update_weight`` block on the trainer's
        broadcast, and the actor's event loop must keep serving other calls meanwhile.
        """
        fn = getattr(self._worker, method, None) if isinstance(method, str) else None
        if fn is None:
            raise ValueError(f"collective_rpc: unknown method {method!r}; the CPU worker has {_CpuWorker.RPC_METHODS}")
        call = asyncio.to_thread(fn, *args, **(kwargs or {}))
        return [await (asyncio.wait_for(call, timeout) if timeout else call)]

    def shutdown(self) -> None:
        self.engine.shutdown()


class _CpuWorker:
    """The engine's single worker: the weight-sync RPCs of OpenRLHF's ``WorkerWrap``, on CPU.

    OpenRLHF's ``WorkerWrap`` needs a CUDA device and vLLM's model runner, so it is not used
    (``worker_extension_cls`` is ignored); these methods take the same arguments.
    """

    RPC_METHODS = ("init_process_group", "update_weight", "update_weight_cuda_ipc")

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.model_update_group: PyNcclCommunicator | None = None
        self._digests: dict[str, str] = {}

    def init_process_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "nccl",
        use_ray: bool = False,
    ) -> None:
        """Join the trainer's weight-sync group as rank ``rank_offset`` (one worker per engine)."""
        if use_ray:
            raise ValueError(
                "use_ray=True: --vllm.sync_with_ray is not supported by the CPU vLLM stand-in; drop the flag "
                "(weights then travel over a gloo group)"
            )
        group = StatelessProcessGroup.create(master_address, master_port, rank_offset, world_size)
        self.model_update_group = PyNcclCommunicator(group, device="cpu")
        logger.info("joined weight-sync group %s as rank %d of %d", group_name, rank_offset, world_size)

    def update_weight(self, name: str, dtype: Any, shape: Sequence[int], empty_cache: bool = False) -> None:
        """Receive one broadcast tensor from rank 0 and copy it into the parameter ``name``."""
        import torch

        if self.model_update_group is None:
            raise RuntimeError("update_weight before init_process_group")
        buffer = torch.empty(tuple(shape), dtype=dtype)
        self.model_update_group.broadcast(buffer, src=0)
        self.engine.load_weights([(name, buffer)])
        if os.environ.get(ENV_DIGEST_DIR):
            self._record_digest(name, buffer)

    def _record_digest(self, name: str, tensor: Any) -> None:
        """Write what the engine now holds (sha256 per parameter) for tests to compare with checkpoints.

        Enabled by ``PERSRM_CPU_ENGINE_DIGEST_DIR``; one JSON file per engine process, rewritten
        atomically after every received parameter, so the file left at the end describes the
        weights after the last sync.
        """
        import hashlib
        import json

        self._digests[name] = hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()
        out_dir = os.environ[ENV_DIGEST_DIR]
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"engine-{os.getpid()}.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(self._digests, fh)
        os.replace(path + ".tmp", path)

    def update_weight_cuda_ipc(self, *_: Any, **__: Any) -> None:
        raise ValueError(
            "CUDA IPC weight sync is impossible on CPU: use --vllm.sync_backend gloo "
            "(OpenRLHF picks CUDA IPC for --train.colocate_all with the nccl backend)"
        )


# ----------------------------------------------------------------------------------------------
# vllm.distributed: a stateless group over a TCPStore, and a "PyNccl" communicator over gloo
# ----------------------------------------------------------------------------------------------


@dataclass
class StatelessProcessGroup:
    """vLLM's ``StatelessProcessGroup``: a group that does not touch ``torch.distributed``'s
    global state, so trainer rank 0 and the engines can form one next to their own groups.

    Rank 0 hosts the ``TCPStore``. Objects travel pickled through the store.
    """

    rank: int
    world_size: int
    store: Any
    data_expiration_seconds: int = 3600
    _send_counter: dict[int, int] = field(default_factory=dict)
    _recv_counter: dict[int, int] = field(default_factory=dict)
    _broadcast_counter: dict[int, int] = field(default_factory=dict)
    _barrier_counter: int = 0

    @staticmethod
    def create(
        host: str,
        port: int,
        rank: int,
        world_size: int,
        data_expiration_seconds: int = 3600,
        store_timeout: int = 300,
    ) -> "StatelessProcessGroup":
        from datetime import timedelta

        from torch.distributed import TCPStore

        store = TCPStore(
            host_name=host,
            port=port,
            world_size=world_size,
            is_master=rank == 0,
            timeout=timedelta(seconds=store_timeout),
        )
        return StatelessProcessGroup(rank, world_size, store, data_expiration_seconds)

    def _next(self, counter: dict[int, int], key: int) -> int:
        value = counter.get(key, 0)
        counter[key] = value + 1
        return value

    def send_obj(self, obj: Any, dst: int) -> None:
        n = self._next(self._send_counter, dst)
        self.store.set(f"send_to/{dst}/{self.rank}/{n}", pickle.dumps(obj))

    def recv_obj(self, src: int) -> Any:
        n = self._next(self._recv_counter, src)
        key = f"send_to/{self.rank}/{src}/{n}"
        obj = pickle.loads(self.store.get(key))
        self.store.delete_key(key)  # one reader: free the store's memory
        return obj

    def broadcast_obj(self, obj: Any | None, src: int) -> Any:
        n = self._next(self._broadcast_counter, src)
        key = f"broadcast_from/{src}/{n}"
        if self.rank == src:
            self.store.set(key, pickle.dumps(obj))
            return obj
        return pickle.loads(self.store.get(key))

    def all_gather_obj(self, obj: Any) -> list[Any]:
        return [self.broadcast_obj(obj if r == self.rank else None, src=r) for r in range(self.world_size)]

    def barrier(self) -> None:
        import time

        key = f"barrier/{self._barrier_counter}"
        self._barrier_counter += 1
        self.store.add(key, 1)
        # add(key, 0) reads the counter atomically; every rank leaves once all have arrived.
        while self.store.add(key, 0) < self.world_size:
            time.sleep(0.001)


class PyNcclCommunicator:
    """vLLM's ``PyNcclCommunicator`` API, implemented over a gloo process group on CPU tensors.

    OpenRLHF's trainer side calls ``broadcast(param, src=0, stream=...)``; ``stream`` is ignored.
    """

    def __init__(self, group: StatelessProcessGroup, device: Any = "cpu", library_path: str | None = None) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        if not isinstance(group, StatelessProcessGroup):
            raise TypeError(f"PyNcclCommunicator (CPU stand-in) needs a StatelessProcessGroup, got {type(group)!r}")
        self.group = group
        self.rank = group.rank
        self.world_size = group.world_size
        self.device = device
        self.available = True
        self.disabled = False
        # Prefix: the same store also carries StatelessProcessGroup's own keys.
        store = dist.PrefixStore("pynccl_standin", group.store)
        self._pg = dist.ProcessGroupGloo(store, self.rank, self.world_size, timedelta(seconds=1800))

    @staticmethod
    def _check_cpu(tensor: Any) -> None:
        if tensor.device.type != "cpu":
            raise ValueError(f"the CPU stand-in communicator moves CPU tensors only, got one on {tensor.device}")

    def broadcast(self, tensor: Any, src: int, stream: Any = None) -> None:
        import torch.distributed as dist

        self._check_cpu(tensor)
        if self.world_size == 1:
            return
        buffer = tensor if tensor.is_contiguous() else tensor.contiguous()
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self._pg.broadcast([buffer], opts).wait()
        if buffer is not tensor:
            tensor.copy_(buffer)

    def all_reduce(self, in_tensor: Any, out_tensor: Any = None, op: Any = None, stream: Any = None) -> Any:
        import torch.distributed as dist

        self._check_cpu(in_tensor)
        out = in_tensor.clone() if out_tensor is None else out_tensor.copy_(in_tensor)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM if op is None else op
        self._pg.allreduce([out], opts).wait()
        return out

    def send(self, tensor: Any, dst: int, stream: Any = None) -> None:
        self._check_cpu(tensor)
        self._pg.send([tensor.contiguous()], dst, 0).wait()

    def recv(self, tensor: Any, src: int, stream: Any = None) -> None:
        self._check_cpu(tensor)
        self._pg.recv([tensor], src, 0).wait()


# ----------------------------------------------------------------------------------------------
# The module tree
# ----------------------------------------------------------------------------------------------

_MARK = "__persrm_cpu_standin__"


def _module(name: str, attrs: dict[str, Any], package: bool = True) -> types.ModuleType:
    mod = types.ModuleType(name, f"CPU stand-in for {name} (openrlhf_persrm.cpu.vllm_standin)")
    # A spec keeps importlib.util.find_spec("vllm") from raising on a spec-less module.
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=package)
    if package:
        mod.__path__ = []
    mod.__dict__.update(attrs)
    setattr(mod, _MARK, True)
    return mod


def build_modules() -> dict[str, types.ModuleType]:
    """Build the stand-in ``vllm`` module tree, keyed by dotted module name."""
    core = {
        "__version__": VLLM_VERSION,
        "AsyncEngineArgs": AsyncEngineArgs,
        "EngineArgs": AsyncEngineArgs,
        "AsyncLLMEngine": AsyncLLMEngine,
        "SamplingParams": SamplingParams,
        "RequestOutput": RequestOutput,
        "CompletionOutput": CompletionOutput,
        "TokensPrompt": TokensPrompt,
        "TextPrompt": TextPrompt,
    }
    tree = {
        "vllm": core,
        "vllm.inputs": {"TokensPrompt": TokensPrompt, "TextPrompt": TextPrompt},
        "vllm.utils": {"random_uuid": random_uuid},
        "vllm.sampling_params": {"SamplingParams": SamplingParams},
        "vllm.outputs": {"RequestOutput": RequestOutput, "CompletionOutput": CompletionOutput},
        "vllm.logprobs": {"Logprob": Logprob},
        "vllm.sequence": {"Logprob": Logprob},
        "vllm.engine": {},
        "vllm.engine.arg_utils": {"AsyncEngineArgs": AsyncEngineArgs, "EngineArgs": AsyncEngineArgs},
        "vllm.engine.async_llm_engine": {"AsyncLLMEngine": AsyncLLMEngine},
        "vllm.distributed": {},
        "vllm.distributed.utils": {"StatelessProcessGroup": StatelessProcessGroup},
        "vllm.distributed.device_communicators": {},
        "vllm.distributed.device_communicators.pynccl": {"PyNcclCommunicator": PyNcclCommunicator},
    }
    modules = {name: _module(name, attrs) for name, attrs in tree.items()}
    # Submodules as attributes too, so `vllm.distributed.utils` resolves after `import vllm`.
    for name, mod in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, mod)
    return modules


def is_installed() -> bool:
    """Whether ``sys.modules["vllm"]`` is this stand-in."""
    return getattr(sys.modules.get("vllm"), _MARK, False)


def install() -> None:
    """Put the stand-in ``vllm`` tree into ``sys.modules``. Idempotent.

    Refuses to replace a real, already imported vLLM: mixing the two in one process would leave
    some modules bound to each.
    """
    if is_installed():
        return
    if "vllm" in sys.modules:
        raise RuntimeError("a real vllm is already imported in this process; install() the CPU stand-in before it")
    sys.modules.update(build_modules())


def uninstall() -> None:
    """Remove the stand-in modules from ``sys.modules`` (modules already bound to them keep them)."""
    for name in [n for n, m in sys.modules.items() if n == "vllm" or n.startswith("vllm.")]:
        if getattr(sys.modules[name], _MARK, False):
            del sys.modules[name]
